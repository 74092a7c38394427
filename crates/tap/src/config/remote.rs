//! The command line of the subcommands that talk to a running tap over its HTTP API:
//! `healthcheck`, `status` and `repos …`. They share how to reach it: `--url`,
//! `--admin-password` (or `TAP_ADMIN_PASSWORD`) and `--timeout`.

use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Command};
use url::Url;

use super::{CliError, ConfigError, Environment, goparse};

/// How to reach a running tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Its base URL (`--url`).
    pub url: Url,
    /// Its admin password (`--admin-password`, `TAP_ADMIN_PASSWORD`).
    pub admin_password: Option<String>,
    /// How long to wait for each answer (`--timeout`).
    pub timeout: Duration,
}

/// `tap status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCommand {
    /// The tap to ask.
    pub remote: Remote,
    /// Print the document as JSON instead of the summary.
    pub json: bool,
    /// Refresh in place this often until interrupted (`--watch`, `--interval`).
    pub watch: Option<Duration>,
}

/// `tap repos …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReposCommand {
    /// `add DID…`: track them.
    Add(Vec<String>),
    /// `remove DID…`: stop tracking them.
    Remove(Vec<String>),
    /// `resync DID…`: re-download them whole.
    Resync(Vec<String>),
    /// `info DID`: one repo as `/info` shows it.
    Info(String),
    /// `list [--state S] [--limit N]`: tracked repos, every page.
    List {
        /// Only repos in this state.
        state: Option<String>,
        /// At most this many (all when `None`).
        limit: Option<u64>,
    },
}

/// `tap repos …` with where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repos {
    /// The tap to ask.
    pub remote: Remote,
    /// What to do.
    pub command: ReposCommand,
}

fn remote_args(cmd: Command) -> Command {
    cmd.arg(
        Arg::new("url")
            .long("url")
            .value_name("URL")
            .default_value("http://127.0.0.1:2480")
            .global(true)
            .help("the tap to ask"),
    )
    .arg(
        Arg::new("admin-password")
            .long("admin-password")
            .value_name("PASSWORD")
            .global(true)
            .help("its admin password [env: TAP_ADMIN_PASSWORD]"),
    )
    .arg(
        Arg::new("timeout")
            .long("timeout")
            .value_name("DURATION")
            .default_value("5s")
            .global(true)
            .help("how long to wait for each answer"),
    )
}

fn dids_arg() -> Arg {
    Arg::new("dids")
        .value_name("DID")
        .num_args(0..)
        .help("DIDs; when none are given, one per line from standard input")
}

/// The subcommands, for [`super::command`].
pub(super) fn commands() -> [Command; 3] {
    let healthcheck = remote_args(
        Command::new("healthcheck")
            .about("exit 0 when a running tap's /health answers ok in time, 1 otherwise"),
    );
    let status = remote_args(
        Command::new("status")
            .about(
                "summarize a running tap's /status.json; exit 0 when healthy, 1 when a \
                 diagnosis says something is wrong, 2 when it cannot be asked",
            )
            .arg(
                Arg::new("json")
                    .long("json")
                    .action(ArgAction::SetTrue)
                    .help("print the document as JSON"),
            )
            .arg(
                Arg::new("watch")
                    .long("watch")
                    .action(ArgAction::SetTrue)
                    .help("refresh in place until interrupted"),
            )
            .arg(
                Arg::new("interval")
                    .long("interval")
                    .value_name("DURATION")
                    .default_value("2s")
                    .help("how often --watch refreshes"),
            ),
    );
    let repos = remote_args(
        Command::new("repos")
            .about("list, inspect, add, remove or resync a running tap's repos")
            .subcommand_required(true)
            .subcommand(Command::new("add").about("track repos").arg(dids_arg()))
            .subcommand(
                Command::new("remove")
                    .about("stop tracking repos")
                    .arg(dids_arg()),
            )
            .subcommand(
                Command::new("resync")
                    .about("re-download repos whole")
                    .arg(dids_arg()),
            )
            .subcommand(
                Command::new("info")
                    .about("one repo's state")
                    .arg(Arg::new("did").value_name("DID").required(true)),
            )
            .subcommand(
                Command::new("list")
                    .about("tracked repos, one per line: did state records handle error")
                    .arg(
                        Arg::new("state")
                            .long("state")
                            .value_name("STATE")
                            .help("only pending, resyncing, active, desynchronized or error"),
                    )
                    .arg(
                        Arg::new("limit")
                            .long("limit")
                            .value_name("N")
                            .value_parser(clap::value_parser!(u64))
                            .help("at most N repos (default: all)"),
                    ),
            ),
    );
    [healthcheck, status, repos]
}

fn invalid(flag: &'static str, message: String) -> CliError {
    CliError::Invalid(ConfigError {
        flag,
        env: "",
        message,
    })
}

/// Reads `--url`, `--admin-password` (or `TAP_ADMIN_PASSWORD`) and `--timeout`.
pub(super) fn remote(matches: &ArgMatches, env: &Environment) -> Result<Remote, CliError> {
    let text = |id: &str| matches.get_one::<String>(id).cloned().unwrap_or_default();
    let url = Url::parse(&text("url")).map_err(|e| invalid("url", e.to_string()))?;
    let timeout = goparse::parse_duration(&text("timeout")).map_err(|e| invalid("timeout", e))?;
    let admin_password = matches
        .get_one::<String>("admin-password")
        .cloned()
        .or_else(|| env.get("TAP_ADMIN_PASSWORD").map(str::to_owned));
    Ok(Remote {
        url,
        admin_password,
        timeout,
    })
}

/// `tap status`'s options.
pub(super) fn status(matches: &ArgMatches, env: &Environment) -> Result<StatusCommand, CliError> {
    let interval = matches
        .get_one::<String>("interval")
        .map_or(Ok(Duration::from_secs(2)), |s| goparse::parse_duration(s))
        .map_err(|e| invalid("interval", e))?;
    if interval.is_zero() {
        return Err(invalid("interval", "must be more than 0".into()));
    }
    Ok(StatusCommand {
        remote: remote(matches, env)?,
        json: matches.get_flag("json"),
        watch: matches.get_flag("watch").then_some(interval),
    })
}

/// `tap repos …`'s command; DIDs are taken as given (the API validates them).
pub(super) fn repos(matches: &ArgMatches, env: &Environment) -> Result<Repos, CliError> {
    let remote = remote(matches, env)?;
    let dids = |m: &ArgMatches| -> Vec<String> {
        m.get_many::<String>("dids")
            .map(|v| v.cloned().collect())
            .unwrap_or_default()
    };
    let command = match matches.subcommand() {
        Some(("add", m)) => ReposCommand::Add(dids(m)),
        Some(("remove", m)) => ReposCommand::Remove(dids(m)),
        Some(("resync", m)) => ReposCommand::Resync(dids(m)),
        Some(("info", m)) => {
            ReposCommand::Info(m.get_one::<String>("did").cloned().unwrap_or_default())
        }
        Some(("list", m)) => ReposCommand::List {
            state: m.get_one::<String>("state").cloned(),
            limit: m.get_one::<u64>("limit").copied(),
        },
        _ => {
            return Err(invalid(
                "repos",
                "expected add, remove, resync, info or list".into(),
            ));
        }
    };
    Ok(Repos { remote, command })
}
