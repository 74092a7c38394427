//! The table of every `tap run` setting: flag, environment variables, default and help.
//!
//! This table is the single source of truth. The clap command, the environment lookup
//! (aliases included), `--help` and the README's configuration table (checked by the
//! `config_docs` test) are all derived from it, so they cannot drift apart.

/// How a setting's value is written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--flag value` or `--flag=value`.
    Value,
    /// Go-style boolean: `--flag`, `--flag=true`, `--flag=false` (env: Go `ParseBool` forms).
    Bool,
    /// Repeatable, and comma-separated both on the command line and in the environment.
    List,
    /// Repeatable, and `;`-separated (outside quotes) both on the command line and in the
    /// environment: record-content rules, whose own text holds commas.
    Rules,
}

/// One `tap run` setting.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Long flag name without dashes; also the clap id.
    pub flag: &'static str,
    /// Another accepted spelling of the flag (`""`: none).
    pub flag_alias: &'static str,
    /// Environment variables, in precedence order. The first is the documented one.
    pub envs: &'static [&'static str],
    /// Default as the user would write it; `""` means "unset".
    pub default: &'static str,
    /// Command-line syntax.
    pub kind: Kind,
    /// One-line help text.
    pub help: &'static str,
    /// `true` for settings that the Go tap does not have (documented as extensions).
    pub extension: bool,
    /// `true` for Go tap settings accepted (and validated) so existing deployments start,
    /// but without effect here; their help says [`IGNORED`].
    pub ignored: bool,
}

/// What the help and the README say of every setting that is accepted and ignored.
pub const IGNORED: &str = "accepted and ignored";

const fn value(
    flag: &'static str,
    envs: &'static [&'static str],
    default: &'static str,
    help: &'static str,
) -> Setting {
    Setting {
        flag,
        flag_alias: "",
        envs,
        default,
        kind: Kind::Value,
        help,
        extension: false,
        ignored: false,
    }
}

const fn boolean(flag: &'static str, envs: &'static [&'static str], help: &'static str) -> Setting {
    Setting {
        flag,
        flag_alias: "",
        envs,
        default: "false",
        kind: Kind::Bool,
        help,
        extension: false,
        ignored: false,
    }
}

/// `setting`, also accepted as `--<alias>` (the plural that indigo's runtime-filters work
/// uses for the signal collections).
const fn with_alias(setting: Setting, alias: &'static str) -> Setting {
    Setting {
        flag_alias: alias,
        ..setting
    }
}

/// Every setting of `tap run`, in the order `--help` shows them.
pub const SETTINGS: &[Setting] = &[
    value(
        "env",
        &["TAP_ENV"],
        "dev",
        "deployment environment name, for observability only",
    ),
    value(
        "db-url",
        &["TAP_DATABASE_URL"],
        "sqlite://./tap.db",
        "database URL: sqlite://<path> or postgres://…",
    ),
    value(
        "max-db-conn",
        &["TAP_MAX_DB_CONNS"],
        "32",
        "maximum number of PostgreSQL connections",
    ),
    value(
        "bind",
        &["TAP_BIND"],
        ":2480",
        "HTTP listen address for the API and /channel",
    ),
    value(
        "plc-url",
        &["TAP_PLC_URL", "ATP_PLC_HOST"],
        "https://plc.directory",
        "PLC directory HTTP/HTTPS URL",
    ),
    value(
        "relay-url",
        &["TAP_RELAY_URL"],
        "https://relay1.us-east.bsky.network",
        "AT Protocol relay HTTP/HTTPS URL (firehose and repo listing)",
    ),
    Setting {
        flag: "jetstream-url",
        flag_alias: "",
        envs: &["TAP_JETSTREAM_URL"],
        default: "",
        kind: Kind::Value,
        help: "take live events from this Jetstream (http(s) or ws(s); path /subscribe) instead of the relay firehose, asking only for the wanted collections; not with --full-network (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "jetstream-verify",
        flag_alias: "",
        envs: &["TAP_JETSTREAM_VERIFY"],
        default: "proof",
        kind: Kind::Value,
        help: "proof: check every Jetstream record against its PDS (getRecord, signed commit and MST path) before delivering it; none: deliver as Jetstream sends, marked unverified (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "jetstream-proof-rate",
        flag_alias: "",
        envs: &["TAP_JETSTREAM_PROOF_RATE"],
        default: "10",
        kind: Kind::Value,
        help: "most getRecord proof requests per second to one PDS host (bursts of up to five seconds' worth) (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "light-rail-url",
        flag_alias: "",
        envs: &["TAP_LIGHT_RAIL_URL"],
        default: "",
        kind: Kind::Value,
        help: "enumerate repos by collection from this listReposByCollection service (e.g. Lightrail) instead of the relay (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "light-rail-signal-collections",
        flag_alias: "",
        envs: &["TAP_LIGHT_RAIL_SIGNAL_COLLECTIONS"],
        default: "",
        kind: Kind::List,
        help: "with --light-rail-url: also track every repo holding any of these collections, listed with one call per page (repeated collection parameters) (extension)",
        extension: true,
        ignored: false,
    },
    value(
        "firehose-parallelism",
        &["TAP_FIREHOSE_PARALLELISM"],
        "10",
        "concurrent firehose event processors",
    ),
    value(
        "resync-parallelism",
        &["TAP_RESYNC_PARALLELISM"],
        "5",
        "concurrent resync workers",
    ),
    Setting {
        flag: "outbox-parallelism",
        flag_alias: "",
        envs: &["TAP_OUTBOX_PARALLELISM"],
        default: "1",
        kind: Kind::Value,
        help: "accepted and ignored: one outbox delivers every repo's events in order (the Go tap's workers could reorder them); see --webhook-parallelism",
        extension: false,
        ignored: true,
    },
    value(
        "cursor-save-interval",
        &["TAP_CURSOR_SAVE_INTERVAL"],
        "1s",
        "how often to persist the firehose cursor",
    ),
    boolean(
        "no-replay",
        &["TAP_NO_REPLAY"],
        "ignore the saved cursor at start-up and connect at the firehose head; not with --full-network",
    ),
    value(
        "repo-fetch-timeout",
        &["TAP_REPO_FETCH_TIMEOUT"],
        "300s",
        "timeout for fetching a repo CAR from its PDS",
    ),
    value(
        "ident-cache-size",
        &["TAP_IDENT_CACHE_SIZE", "RELAY_IDENT_CACHE_SIZE"],
        "2000000",
        "size of the in-process identity cache",
    ),
    Setting {
        flag: "handle-resolver-url",
        flag_alias: "",
        envs: &["TAP_HANDLE_RESOLVER_URL"],
        default: "",
        kind: Kind::Value,
        help: "resolve handles with com.atproto.identity.resolveHandle at this URL instead of DNS and HTTPS, for test networks (extension)",
        extension: true,
        ignored: false,
    },
    value(
        "outbox-capacity",
        &["TAP_OUTBOX_CAPACITY"],
        "100000",
        "events in flight in the outbox before back-pressure is applied (their payloads are also capped at 4 MiB in all)",
    ),
    boolean(
        "full-network",
        &["TAP_FULL_NETWORK"],
        "track every repo on the network",
    ),
    with_alias(
        value(
            "signal-collection",
            &["TAP_SIGNAL_COLLECTION", "TAP_SIGNAL_COLLECTIONS"],
            "",
            "track every repo with at least one record in this collection (comma-separated for several)",
        ),
        "signal-collections",
    ),
    boolean(
        "disable-acks",
        &["TAP_DISABLE_ACKS"],
        "fire-and-forget delivery: no client acks",
    ),
    value(
        "webhook-url",
        &["TAP_WEBHOOK_URL"],
        "",
        "deliver events by POST to this URL instead of the WebSocket",
    ),
    Setting {
        flag: "nats-url",
        flag_alias: "",
        envs: &["TAP_NATS_URL"],
        default: "",
        kind: Kind::Value,
        help: "publish events into a NATS JetStream stream at this URL (nats://host:port) instead of /channel or a webhook; an event is done when JetStream acknowledges it (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "nats-stream",
        flag_alias: "",
        envs: &["TAP_NATS_STREAM"],
        default: "tap",
        kind: Kind::Value,
        help: "with --nats-url: the JetStream stream; created when missing (subjects <prefix>.>, file storage, --nats-max-age, --nats-duplicate-window), used as configured when it exists (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "nats-subject-prefix",
        flag_alias: "",
        envs: &["TAP_NATS_SUBJECT_PREFIX"],
        default: "tap",
        kind: Kind::Value,
        help: "with --nats-url: events go to <prefix>.record.<collection> and <prefix>.identity (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "nats-max-age",
        flag_alias: "",
        envs: &["TAP_NATS_MAX_AGE"],
        default: "168h",
        kind: Kind::Value,
        help: "with --nats-url, for a stream tap creates: how long events are kept; 0 = until deleted (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "nats-duplicate-window",
        flag_alias: "",
        envs: &["TAP_NATS_DUPLICATE_WINDOW"],
        default: "10m",
        kind: Kind::Value,
        help: "with --nats-url, for a stream tap creates: how long JetStream remembers event ids, so an event published again after a crash within it is dropped (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "allow-private-network",
        flag_alias: "",
        envs: &["TAP_ALLOW_PRIVATE_NETWORK"],
        default: "false",
        kind: Kind::Bool,
        help: "let PDS endpoints, did:web hosts and handle well-known files learned from the network resolve to loopback, private and link-local addresses (off: refused, against SSRF); for tests and local networks (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "fetch-strategy",
        flag_alias: "",
        envs: &["TAP_FETCH_STRATEGY"],
        default: "auto",
        kind: Kind::Value,
        help: "how repos are downloaded: full (getRepo, as the Go tap), sparse (only the signed commit, the MST paths to the wanted collections and their records), or auto (sparse when collection filters narrow the repo); an unchanged repo is never downloaded again unless full (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "max-repo-bytes",
        flag_alias: "",
        envs: &["TAP_MAX_REPO_BYTES"],
        default: "4294967296",
        kind: Kind::Value,
        help: "largest repo CAR fetched from a PDS, in bytes (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "webhook-parallelism",
        flag_alias: "",
        envs: &["TAP_WEBHOOK_PARALLELISM"],
        default: "16",
        kind: Kind::Value,
        help: "concurrent webhook requests (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "webhook-secret",
        flag_alias: "",
        envs: &["TAP_WEBHOOK_SECRET"],
        default: "",
        kind: Kind::Value,
        help: "sign webhook bodies with HMAC-SHA256 in the x-tap-signature header, and send the admin password no more (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "channel-timeout",
        flag_alias: "",
        envs: &["TAP_CHANNEL_TIMEOUT"],
        default: "30s",
        kind: Kind::Value,
        help: "a /channel client that takes no frame for this long, or answers no ping, is dropped and its unacked events go to the other clients (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "max-spill-bytes",
        flag_alias: "",
        envs: &["TAP_MAX_SPILL_BYTES"],
        default: "8589934592",
        kind: Kind::Value,
        help: "disk the resync workers' spill files may use together, in bytes; a walk that would spill beyond it is retried later (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "resync-parallelism-per-host",
        flag_alias: "",
        envs: &["TAP_RESYNC_PARALLELISM_PER_HOST"],
        default: "4",
        kind: Kind::Value,
        help: "most resyncs fetching from one PDS host at once; a repo whose host is full waits a few seconds while other hosts' repos go ahead, so one slow host cannot hold every worker (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "repo-fetch-min-rate",
        flag_alias: "",
        envs: &["TAP_REPO_FETCH_MIN_RATE"],
        default: "1024",
        kind: Kind::Value,
        help: "bytes per second a PDS must send on average over every 30 s of a repo fetch, or the fetch is cut and retried later; 0 = no minimum (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "max-connections",
        flag_alias: "",
        envs: &["TAP_MAX_CONNECTIONS"],
        default: "16384",
        kind: Kind::Value,
        help: "HTTP connections served at once (API and metrics, each); more wait in the listen backlog (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "http-header-timeout",
        flag_alias: "",
        envs: &["TAP_HTTP_HEADER_TIMEOUT"],
        default: "10s",
        kind: Kind::Value,
        help: "a client must send a whole request head within this; a silent, trickling or idle keep-alive connection is closed (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "max-channel-sessions",
        flag_alias: "",
        envs: &["TAP_MAX_CHANNEL_SESSIONS"],
        default: "1024",
        kind: Kind::Value,
        help: "/channel WebSocket sessions at once; more are refused with 503 (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "durable-backfill-events",
        flag_alias: "",
        envs: &["TAP_DURABLE_BACKFILL_EVENTS"],
        default: "false",
        kind: Kind::Bool,
        help: "store a first backfill's events in the outbox instead of delivering them from memory and re-running the backfill after a crash; slower (extension)",
        extension: true,
        ignored: false,
    },
    Setting {
        flag: "collection-filters",
        flag_alias: "",
        envs: &["TAP_COLLECTION_FILTERS"],
        default: "",
        kind: Kind::List,
        help: "comma-separated collection filters; `*` only as a whole last segment (app.bsky.*)",
        extension: false,
        ignored: false,
    },
    Setting {
        flag: "record-filters",
        flag_alias: "",
        envs: &["TAP_RECORD_FILTERS"],
        default: "",
        kind: Kind::Rules,
        help: "record-content rules, `;`-separated: `<collection>: <expression>`, e.g. `app.bsky.feed.like: $.subject.uri =~ \"feed.generator\"`; see the README (extension)",
        extension: true,
        ignored: false,
    },
    boolean(
        "outbox-only",
        &["TAP_OUTBOX_ONLY"],
        "only deliver the outbox: no firehose, resync or enumeration",
    ),
    value(
        "admin-password",
        &["TAP_ADMIN_PASSWORD"],
        "",
        "require HTTP Basic auth (user admin) on every request; also sent to the webhook",
    ),
    value(
        "retry-timeout",
        &["TAP_RETRY_TIMEOUT"],
        "60s",
        "time before an unacked event is sent again",
    ),
    value(
        "log-level",
        &["TAP_LOG_LEVEL", "LOG_LEVEL"],
        "info",
        "log verbosity: debug, info, warn, error",
    ),
    value(
        "metrics-listen",
        &["TAP_METRICS_LISTEN"],
        "",
        "address of the Prometheus /metrics server (disabled if empty)",
    ),
];

/// Looks a setting up by flag name.
#[must_use]
pub fn setting(flag: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.flag == flag)
}
