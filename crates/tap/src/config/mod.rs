//! Configuration: the `tap` command line and `TAP_*` environment, parsed once into types.
//!
//! Precedence is flag > environment (first listed variable wins, then aliases) > `.env`
//! file > default, as in the Go tap. Invalid combinations cannot be represented in
//! [`Config`]: delivery mode, tracking scope and database URL are enums.

mod goparse;
pub mod remote;
pub mod settings;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Command, parser::ValueSource};
use tap_atproto::record_filter::RuleSet;
use tap_atproto::syntax::{CollectionFilter, Nsid};
use url::Url;

pub use goparse::{parse_bool, parse_duration};
pub use remote::{Remote, Repos, ReposCommand, StatusCommand};
use settings::{Kind, SETTINGS, Setting};

use crate::store::DatabaseUrl;

/// A configuration error: one line that names the offending flag and variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag} ({env}): {message}")]
pub struct ConfigError {
    /// Flag name without dashes.
    pub flag: &'static str,
    /// The documented environment variable of that flag.
    pub env: &'static str,
    /// What is wrong, including the rejected value.
    pub message: String,
}

/// How events reach the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryMode {
    /// `/channel` WebSocket; an event is done when the client acks it.
    WebSocketAck,
    /// `/channel` WebSocket; an event is done once written (`--disable-acks`).
    FireAndForget,
    /// HTTP POST of each event; any 2xx is the ack (`--webhook-url`, wins over `--disable-acks`).
    Webhook {
        /// Receiver URL (http or https).
        url: Url,
    },
    /// Published into a NATS JetStream stream; an event is done when JetStream acknowledges
    /// it (`--nats-url`).
    Nats(NatsTarget),
}

/// Where and how events are published in NATS mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsTarget {
    /// `--nats-url`.
    pub url: String,
    /// `--nats-stream`.
    pub stream: String,
    /// `--nats-subject-prefix`.
    pub subject_prefix: String,
    /// `--nats-max-age` (zero: kept until deleted), for a stream tap creates.
    pub max_age: Duration,
    /// `--nats-duplicate-window`, for a stream tap creates.
    pub duplicate_window: Duration,
}

impl DeliveryMode {
    /// Name used in logs and metrics.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::WebSocketAck => "websocket-ack",
            Self::FireAndForget => "fire-and-forget",
            Self::Webhook { .. } => "webhook",
            Self::Nats(_) => "nats",
        }
    }
}

/// Which repos tap tracks (the network boundary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackingScope {
    /// Only repos added with `/repos/add`.
    Dynamic,
    /// Repos that have a record in any of these collections, discovered by enumeration and
    /// by firehose commits touching them.
    SignalCollections(Vec<Nsid>),
    /// Every repo on the network. When signal collections are also given (the Go tap
    /// accepts both), full-network tracking wins: it is a superset.
    FullNetwork,
}

/// Where live events come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveSource {
    /// The relay's `subscribeRepos` firehose (`--relay-url`).
    Relay,
    /// A Jetstream (`--jetstream-url`), asked only for the wanted collections.
    Jetstream(JetstreamConfig),
}

/// `--jetstream-url`, `--jetstream-verify`, `--jetstream-proof-rate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetstreamConfig {
    /// `ws(s)://host[:port]/subscribe`, without query; also the key of the stored cursor.
    pub url: Url,
    /// Whether each record is proven against its PDS before delivery.
    pub verify: JetstreamVerify,
    /// Most `getRecord` requests per second to one PDS host.
    pub proof_rate: u32,
    /// A connection silent this long is replaced: [`crate::jetstream::reader::WATCHDOG`]
    /// (not a flag; tests shorten it).
    pub watchdog: Duration,
}

/// `--jetstream-verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JetstreamVerify {
    /// Every record checked against a `getRecord` proof from its PDS.
    Proof,
    /// Delivered as Jetstream sends it, marked unverified.
    None,
}

/// Turns a `--jetstream-url` (http, https, ws or wss; any path) into the `/subscribe`
/// WebSocket URL.
///
/// # Errors
/// Not a URL, or another scheme.
pub fn jetstream_subscribe_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        _ => return Err(format!("{raw:?} must start with http, https, ws or wss")),
    };
    let authority = &url[url::Position::BeforeHost..url::Position::AfterPort];
    Url::parse(&format!("{scheme}://{authority}/subscribe"))
        .map_err(|e| format!("{raw:?} is not a URL: {e}"))
}

/// How resyncs download a repo (`--fetch-strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchStrategy {
    /// Sparse when the collection filters narrow the repo, full otherwise.
    Auto,
    /// Always the whole repo, as the Go tap does (and no skipping of unchanged repos).
    Full,
    /// Always sparse, even unfiltered (then every node comes through `getBlocks`).
    Sparse,
}

impl FetchStrategy {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "full" => Some(Self::Full),
            "sparse" => Some(Self::Sparse),
            _ => None,
        }
    }
}

/// Log verbosity. Unknown values fall back to `info`, as in the Go tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Per-event detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something is wrong but tap copes.
    Warn,
    /// An operator must act.
    Error,
}

impl LogLevel {
    fn parse(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "debug" => Self::Debug,
            "warn" | "warning" => Self::Warn,
            "error" => Self::Error,
            _ => Self::Info,
        }
    }

    /// The matching `tracing` level.
    #[must_use]
    pub fn as_tracing(self) -> tracing::Level {
        match self {
            Self::Debug => tracing::Level::DEBUG,
            Self::Info => tracing::Level::INFO,
            Self::Warn => tracing::Level::WARN,
            Self::Error => tracing::Level::ERROR,
        }
    }
}

/// Everything `tap run` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--env`: free-form deployment name, logged at start-up.
    pub env_name: String,
    /// `--db-url`.
    pub database: DatabaseUrl,
    /// `--max-db-conn` (PostgreSQL pool size).
    pub max_db_conns: usize,
    /// `--bind`, as a `host:port` string (`:2480` means every interface).
    pub bind: String,
    /// `--plc-url`.
    pub plc_url: Url,
    /// `--relay-url` exactly as configured (the key of stored cursors).
    pub relay_url: Url,
    /// `--firehose-parallelism`.
    pub firehose_parallelism: usize,
    /// `--resync-parallelism`.
    pub resync_parallelism: usize,
    /// `--resync-parallelism-per-host`.
    pub resync_parallelism_per_host: usize,
    /// `--max-connections`, `--http-header-timeout`: inbound limits of the HTTP servers.
    pub http_limits: crate::api::server::HttpLimits,
    /// `--max-channel-sessions`.
    pub max_channel_sessions: usize,
    /// `--repo-fetch-min-rate`, bytes per second (0: none).
    pub repo_fetch_min_rate: u64,
    /// `--max-spill-bytes`: disk shared by the resync workers' spill files.
    pub max_spill_bytes: u64,
    /// `--jetstream-url` and its settings: where live events come from.
    pub live_source: LiveSource,
    /// `--light-rail-url`: where signal collections are enumerated, all in one listing;
    /// `None`: the relay, one listing per collection.
    pub light_rail_url: Option<Url>,
    /// `--cursor-save-interval`.
    pub cursor_save_interval: Duration,
    /// `--no-replay` (applies at start-up only).
    pub no_replay: bool,
    /// `--repo-fetch-timeout`.
    pub repo_fetch_timeout: Duration,
    /// `--ident-cache-size`.
    pub ident_cache_size: u64,
    /// `--handle-resolver-url`: a `com.atproto.identity.resolveHandle` endpoint that replaces
    /// DNS and HTTPS handle resolution; `None` when empty (the normal, public resolution).
    pub handle_resolver_url: Option<Url>,
    /// `--outbox-capacity`.
    pub outbox_capacity: usize,
    /// `--full-network` / `--signal-collection`.
    pub scope: TrackingScope,
    /// `--collection-filters`; empty means every collection.
    pub collection_filters: Vec<CollectionFilter>,
    /// `--record-filters`: the record-content rules.
    pub record_filters: RuleSet,
    /// `--webhook-url` / `--disable-acks`.
    pub delivery: DeliveryMode,
    /// `--max-repo-bytes`: largest repo CAR accepted from a PDS.
    pub max_repo_bytes: u64,
    /// `--fetch-strategy`.
    pub fetch_strategy: FetchStrategy,
    /// `--allow-private-network`: hosts learned from the network may be non-public.
    pub allow_private_network: bool,
    /// `--webhook-parallelism`: concurrent webhook requests.
    pub webhook_parallelism: usize,
    /// `--webhook-secret`: HMAC key for signing webhook bodies; `None` when empty.
    pub webhook_secret: Option<String>,
    /// `--channel-timeout`: how long a `/channel` write may block, and how long a client
    /// may stay silent (pings included), before its session is dropped.
    pub channel_timeout: Duration,
    /// `--durable-backfill-events`: a first backfill's events are outbox rows too.
    pub durable_backfill_events: bool,
    /// `--outbox-only`.
    pub outbox_only: bool,
    /// `--admin-password`; `None` when empty.
    pub admin_password: Option<String>,
    /// `--retry-timeout`.
    pub retry_timeout: Duration,
    /// `--log-level`.
    pub log_level: LogLevel,
    /// `--metrics-listen`; `None` when empty.
    pub metrics_listen: Option<String>,
}

impl Config {
    /// The defaults of every setting, for tests: they then override what they need
    /// (typically `bind`, `database`, `relay_url`, `plc_url`).
    ///
    /// # Panics
    /// Never: the built-in defaults are valid (a unit test checks it).
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "the built-in defaults are tested to be valid"
    )]
    pub fn defaults() -> Self {
        Self::from_values(&ResolvedValues::defaults()).expect("built-in defaults are valid")
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Invocation {
    /// `tap run …`.
    Run(Box<Config>),
    /// `tap healthcheck …`.
    Healthcheck(Remote),
    /// `tap status …`.
    Status(StatusCommand),
    /// `tap repos …`.
    Repos(Repos),
    /// `tap` with no subcommand: print this help and exit successfully.
    Help(String),
}

/// Why the command line could not be turned into an [`Invocation`].
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Usage error, `--help` or `--version`: clap prints and exits with the right code.
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// A value or combination is invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// A snapshot of the environment: process variables, plus a `.env` file's entries for
/// names that are not already set (the file never overrides).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: HashMap<String, String>,
}

impl Environment {
    /// The process environment plus `./.env` if it exists.
    #[must_use]
    pub fn from_process_and_dotenv() -> Self {
        let mut env = Self {
            vars: std::env::vars().collect(),
        };
        env.merge_dotenv(Path::new(".env"));
        env
    }

    /// An environment made of exactly these pairs (for tests).
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// Adds the entries of a dotenv file that are not already set. A missing or unreadable
    /// file is ignored, like godotenv's autoload.
    pub fn merge_dotenv(&mut self, path: &Path) {
        let Ok(iter) = dotenvy::from_path_iter(path) else {
            return;
        };
        for (key, value) in iter.flatten() {
            self.vars.entry(key).or_insert(value);
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        // An empty variable counts as unset, as with urfave/cli.
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// The clap command tree: `tap` with the `run` subcommand, built from [`SETTINGS`], and
/// `healthcheck`.
#[must_use]
pub fn command() -> Command {
    let run = SETTINGS.iter().fold(
        Command::new("run").about("start the tap server"),
        |cmd, s| cmd.arg(arg_for(s)),
    );
    Command::new("tap")
        .about(
            "tap: sync a slice of the AT Protocol network, verified, with at-least-once delivery",
        )
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand(run)
        .subcommands(remote::commands())
}

fn arg_for(s: &'static Setting) -> Arg {
    let envs = s.envs.join(", ");
    let default = if s.default.is_empty() {
        String::new()
    } else {
        format!(" [default: {}]", s.default)
    };
    let mut arg = Arg::new(s.flag)
        .long(s.flag)
        .help(format!("{}{default} [env: {envs}]", s.help));
    if !s.flag_alias.is_empty() {
        arg = arg.visible_alias(s.flag_alias);
    }
    match s.kind {
        Kind::Value => arg.value_name("VALUE").action(ArgAction::Set),
        // Go flags: `--x` means true, `--x=false` works, `--x false` does not consume `false`.
        Kind::Bool => arg
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .action(ArgAction::Set),
        Kind::List => arg.value_name("VALUE").action(ArgAction::Append),
        Kind::Rules => arg.value_name("RULES").action(ArgAction::Append),
    }
}

/// Parses a command line (including the program name) against an environment.
///
/// # Errors
/// [`CliError::Clap`] for usage errors, `--help` and `--version`; [`CliError::Invalid`] for
/// a value that fails validation.
pub fn parse<I, T>(args: I, env: &Environment) -> Result<Invocation, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(args)?;
    match matches.subcommand() {
        Some(("run", run)) => {
            let values = ResolvedValues::resolve(run, env);
            Ok(Invocation::Run(Box::new(Config::from_values(&values)?)))
        }
        Some(("healthcheck", m)) => Ok(Invocation::Healthcheck(remote::remote(m, env)?)),
        Some(("status", m)) => Ok(Invocation::Status(remote::status(m, env)?)),
        Some(("repos", m)) => Ok(Invocation::Repos(remote::repos(m, env)?)),
        _ => Ok(Invocation::Help(cmd.render_help().to_string())),
    }
}

/// Each setting's raw value(s) after applying precedence.
struct ResolvedValues {
    values: HashMap<&'static str, Vec<String>>,
}

impl ResolvedValues {
    fn defaults() -> Self {
        let values = SETTINGS
            .iter()
            .map(|s| (s.flag, split_default(s)))
            .collect();
        Self { values }
    }

    fn resolve(matches: &ArgMatches, env: &Environment) -> Self {
        let values = SETTINGS
            .iter()
            .map(|s| {
                let from_cli = matches.value_source(s.flag) == Some(ValueSource::CommandLine);
                let raw: Vec<String> = if from_cli {
                    matches
                        .get_many::<String>(s.flag)
                        .map(|vals| vals.cloned().collect())
                        .unwrap_or_default()
                } else if let Some(v) = s.envs.iter().find_map(|name| env.get(name)) {
                    vec![v.to_owned()]
                } else {
                    split_default(s)
                };
                let raw = match s.kind {
                    // Both `--f a,b` and `TAP_F=a,b` split on commas; no trimming, like Go.
                    Kind::List => raw
                        .iter()
                        .flat_map(|v| v.split(','))
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    Kind::Rules => raw
                        .iter()
                        .flat_map(|v| tap_atproto::record_filter::split_rules(v))
                        .collect(),
                    Kind::Value | Kind::Bool => raw,
                };
                (s.flag, raw)
            })
            .collect();
        Self { values }
    }

    fn one(&self, flag: &str) -> &str {
        self.values
            .get(flag)
            .and_then(|v| v.last())
            .map_or("", String::as_str)
    }

    fn many(&self, flag: &str) -> &[String] {
        self.values.get(flag).map_or(&[], Vec::as_slice)
    }
}

fn split_default(s: &Setting) -> Vec<String> {
    if s.default.is_empty() {
        Vec::new()
    } else {
        vec![s.default.to_owned()]
    }
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    let env = settings::setting(flag)
        .and_then(|s| s.envs.first().copied())
        .unwrap_or("");
    ConfigError {
        flag,
        env,
        message: message.into(),
    }
}

impl Config {
    fn from_values(v: &ResolvedValues) -> Result<Self, ConfigError> {
        let bool_of = |flag: &'static str| parse_bool(v.one(flag)).map_err(|m| invalid(flag, m));
        let duration_of =
            |flag: &'static str| parse_duration(v.one(flag)).map_err(|m| invalid(flag, m));
        let count_of = |flag: &'static str| -> Result<usize, ConfigError> {
            match v.one(flag).parse::<usize>() {
                Ok(0) => Err(invalid(flag, "must be at least 1")),
                Ok(n) => Ok(n),
                Err(_) => Err(invalid(
                    flag,
                    format!("{:?} is not a positive integer", v.one(flag)),
                )),
            }
        };
        let http_url_of = |flag: &'static str| -> Result<Url, ConfigError> {
            let raw = v.one(flag);
            let url =
                Url::parse(raw).map_err(|e| invalid(flag, format!("{raw:?} is not a URL: {e}")))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(invalid(
                    flag,
                    format!("{raw:?} must start with http:// or https://"),
                ));
            }
            Ok(url)
        };

        let database =
            DatabaseUrl::parse(v.one("db-url")).map_err(|e| invalid("db-url", e.to_string()))?;

        let full_network = bool_of("full-network")?;
        let no_replay = bool_of("no-replay")?;
        if no_replay && full_network {
            return Err(invalid(
                "no-replay",
                "cannot be combined with --full-network (a full-network mirror must not skip events)",
            ));
        }
        let signal: Vec<Nsid> = v
            .one("signal-collection")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<Nsid>()
                    .map_err(|e| invalid("signal-collection", format!("{s:?} is not an NSID: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let light_rail_signal: Vec<Nsid> = v
            .many("light-rail-signal-collections")
            .iter()
            .map(|s| {
                s.parse::<Nsid>().map_err(|e| {
                    invalid(
                        "light-rail-signal-collections",
                        format!("{s:?} is not an NSID: {e}"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let light_rail_url = match v.one("light-rail-url") {
            "" => None,
            _ => Some(http_url_of("light-rail-url")?),
        };
        if !light_rail_signal.is_empty() {
            if light_rail_url.is_none() {
                return Err(invalid(
                    "light-rail-signal-collections",
                    "needs --light-rail-url (the service that lists them)",
                ));
            }
            if full_network || !signal.is_empty() {
                return Err(invalid(
                    "light-rail-signal-collections",
                    "cannot be combined with --signal-collection or --full-network (it is the signal collection list when enumerating from Lightrail)",
                ));
            }
        }
        let signal = if light_rail_signal.is_empty() {
            signal
        } else {
            light_rail_signal
        };
        if light_rail_url.is_some() && signal.is_empty() {
            return Err(invalid(
                "light-rail-url",
                "needs signal collections to enumerate (--light-rail-signal-collections or --signal-collection)",
            ));
        }
        let live_source = match v.one("jetstream-url") {
            "" => LiveSource::Relay,
            raw => {
                if full_network {
                    return Err(invalid(
                        "jetstream-url",
                        "cannot be combined with --full-network: a full-network mirror follows the relay firehose, whose commits carry their own proofs (Jetstream's would cost a PDS request per record)",
                    ));
                }
                let verify = match v.one("jetstream-verify") {
                    "proof" => JetstreamVerify::Proof,
                    "none" => JetstreamVerify::None,
                    other => {
                        return Err(invalid(
                            "jetstream-verify",
                            format!("{other:?} is not proof or none"),
                        ));
                    }
                };
                LiveSource::Jetstream(JetstreamConfig {
                    url: jetstream_subscribe_url(raw).map_err(|m| invalid("jetstream-url", m))?,
                    verify,
                    proof_rate: u32::try_from(count_of("jetstream-proof-rate")?)
                        .unwrap_or(u32::MAX),
                    watchdog: crate::jetstream::reader::WATCHDOG,
                })
            }
        };
        let scope = if full_network {
            TrackingScope::FullNetwork
        } else if signal.is_empty() {
            TrackingScope::Dynamic
        } else {
            TrackingScope::SignalCollections(signal)
        };

        let collection_filters = v
            .many("collection-filters")
            .iter()
            .map(|f| {
                f.parse::<CollectionFilter>()
                    .map_err(|e| invalid("collection-filters", format!("{f:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let record_filters = RuleSet::parse(v.many("record-filters"))
            .map_err(|e| invalid("record-filters", e.to_string()))?;

        // Parsed even when a webhook wins, so a typo never hides until the mode changes.
        let disable_acks = bool_of("disable-acks")?;
        let delivery = if !v.one("nats-url").is_empty() {
            if !v.one("webhook-url").is_empty() || disable_acks {
                return Err(invalid(
                    "nats-url",
                    "NATS delivery replaces the webhook and /channel: drop --webhook-url and --disable-acks",
                ));
            }
            DeliveryMode::Nats(NatsTarget {
                url: nats_url_of(v.one("nats-url")).map_err(|m| invalid("nats-url", m))?,
                stream: nats_name_of(v.one("nats-stream"), false)
                    .map_err(|m| invalid("nats-stream", m))?,
                subject_prefix: nats_name_of(v.one("nats-subject-prefix"), true)
                    .map_err(|m| invalid("nats-subject-prefix", m))?,
                max_age: duration_of("nats-max-age")?,
                duplicate_window: duration_of("nats-duplicate-window")?,
            })
        } else if !v.one("webhook-url").is_empty() {
            DeliveryMode::Webhook {
                url: http_url_of("webhook-url")?,
            }
        } else if disable_acks {
            DeliveryMode::FireAndForget
        } else {
            DeliveryMode::WebSocketAck
        };

        let retry_timeout = duration_of("retry-timeout")?;
        if retry_timeout.is_zero() {
            return Err(invalid("retry-timeout", "must be greater than zero"));
        }
        let channel_timeout = duration_of("channel-timeout")?;
        if channel_timeout.is_zero() {
            return Err(invalid("channel-timeout", "must be greater than zero"));
        }
        let header_timeout = duration_of("http-header-timeout")?;
        if header_timeout.is_zero() {
            return Err(invalid("http-header-timeout", "must be greater than zero"));
        }
        let cursor_save_interval = duration_of("cursor-save-interval")?;
        if cursor_save_interval.is_zero() {
            return Err(invalid("cursor-save-interval", "must be greater than zero"));
        }
        let repo_fetch_timeout = match duration_of("repo-fetch-timeout")? {
            // The Go tap treats a non-positive timeout as 30 s.
            d if d.is_zero() => Duration::from_secs(30),
            d => d,
        };

        let ident_cache_size = v.one("ident-cache-size").parse::<u64>().map_err(|_| {
            invalid(
                "ident-cache-size",
                format!(
                    "{:?} is not a non-negative integer",
                    v.one("ident-cache-size")
                ),
            )
        })?;

        let non_empty = |flag: &str| Some(v.one(flag).to_owned()).filter(|s| !s.is_empty());

        let bind = v.one("bind").to_owned();
        validate_listen_addr(&bind).map_err(|m| invalid("bind", m))?;
        let metrics_listen = non_empty("metrics-listen");
        if let Some(addr) = &metrics_listen {
            validate_listen_addr(addr).map_err(|m| invalid("metrics-listen", m))?;
        }

        // Validated like the Go tap does, then ignored (settings.rs says why).
        count_of("outbox-parallelism")?;

        Ok(Self {
            env_name: v.one("env").to_owned(),
            database,
            max_db_conns: count_of("max-db-conn")?,
            bind,
            plc_url: http_url_of("plc-url")?,
            relay_url: http_url_of("relay-url")?,
            firehose_parallelism: count_of("firehose-parallelism")?,
            resync_parallelism: count_of("resync-parallelism")?,
            resync_parallelism_per_host: count_of("resync-parallelism-per-host")?,
            http_limits: crate::api::server::HttpLimits {
                max_connections: count_of("max-connections")?,
                header_timeout,
            },
            max_channel_sessions: count_of("max-channel-sessions")?,
            max_spill_bytes: v.one("max-spill-bytes").parse::<u64>().map_err(|_| {
                invalid(
                    "max-spill-bytes",
                    format!("{:?} is not a number of bytes", v.one("max-spill-bytes")),
                )
            })?,
            repo_fetch_min_rate: v.one("repo-fetch-min-rate").parse::<u64>().map_err(|_| {
                invalid(
                    "repo-fetch-min-rate",
                    format!(
                        "{:?} is not a number of bytes per second",
                        v.one("repo-fetch-min-rate")
                    ),
                )
            })?,
            live_source,
            light_rail_url,
            cursor_save_interval,
            no_replay,
            repo_fetch_timeout,
            ident_cache_size,
            handle_resolver_url: if v.one("handle-resolver-url").is_empty() {
                None
            } else {
                Some(http_url_of("handle-resolver-url")?)
            },
            outbox_capacity: count_of("outbox-capacity")?,
            scope,
            collection_filters,
            record_filters,
            delivery,
            allow_private_network: bool_of("allow-private-network")?,
            fetch_strategy: FetchStrategy::parse(v.one("fetch-strategy")).ok_or_else(|| {
                invalid(
                    "fetch-strategy",
                    format!("{:?} is not auto, full or sparse", v.one("fetch-strategy")),
                )
            })?,
            max_repo_bytes: v
                .one("max-repo-bytes")
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    invalid(
                        "max-repo-bytes",
                        format!(
                            "{:?} is not a positive number of bytes",
                            v.one("max-repo-bytes")
                        ),
                    )
                })?,
            webhook_parallelism: count_of("webhook-parallelism")?,
            webhook_secret: non_empty("webhook-secret"),
            durable_backfill_events: bool_of("durable-backfill-events")?,
            outbox_only: bool_of("outbox-only")?,
            admin_password: non_empty("admin-password"),
            retry_timeout,
            channel_timeout,
            log_level: LogLevel::parse(v.one("log-level")),
            metrics_listen,
        })
    }
}

/// Checks a Go-style listen address: `host:port`, `:port`, or `[v6]:port`.
fn validate_listen_addr(addr: &str) -> Result<(), String> {
    let (_, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} must be host:port or :port"))?;
    port.parse::<u16>()
        .map(|_| ())
        .map_err(|_| format!("{addr:?} has an invalid port"))
}

/// Turns a Go-style listen address into one `tokio::net::TcpListener::bind` accepts:
/// `:2480` (every interface) becomes `0.0.0.0:2480`.
#[must_use]
pub fn listen_addr(addr: &str) -> String {
    if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_owned()
    }
}

/// A `nats://` (or `tls://`) server URL, as given.
fn nats_url_of(raw: &str) -> Result<String, String> {
    let url = Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    match url.scheme() {
        "nats" | "tls" if url.host_str().is_some() => Ok(raw.to_owned()),
        _ => Err(format!("{raw:?} is not a nats:// or tls:// server URL")),
    }
}

/// A stream name (one token) or a subject prefix (tokens joined by dots): letters, digits,
/// `-` and `_`, so nothing in it is a NATS wildcard or separator by accident.
fn nats_name_of(raw: &str, dotted: bool) -> Result<String, String> {
    let token_ok = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let ok = if dotted {
        raw.split('.').all(token_ok)
    } else {
        token_ok(raw)
    };
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "{raw:?}: only letters, digits, '-' and '_'{}",
            if dotted {
                " in dot-separated tokens"
            } else {
                ""
            }
        ))
    }
}

#[cfg(test)]
mod tests;
