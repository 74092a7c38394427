//! The `tap` binary: command line → [`tap::Config`] → [`tap::App`], or one of the one-shot
//! clients of a running tap (`healthcheck`, `status`, `repos`); nothing else.

use std::process::ExitCode;

use tap::config::{self, CliError, Environment, Invocation, Remote};

fn main() -> ExitCode {
    let env = Environment::from_process_and_dotenv();
    let config = match config::parse(std::env::args_os(), &env) {
        Ok(Invocation::Run(config)) => *config,
        Ok(Invocation::Help(help)) => {
            print!("{help}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Healthcheck(check)) => return healthcheck(&check),
        Ok(Invocation::Status(cmd)) => {
            return one_shot(async move { Ok(tap::remote::status::run(&cmd).await) });
        }
        Ok(Invocation::Repos(cmd)) => {
            return one_shot(async move { Ok(tap::remote::repos::run(&cmd).await) });
        }
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Invalid(e)) => {
            eprintln!("tap: {e}");
            return ExitCode::from(2);
        }
    };
    tap::telemetry::init_logging(config.log_level);
    let open_files = tap::api::server::raise_open_file_limit();
    if let Some(limit) = open_files
        && limit < config.http_limits.max_connections as u64
    {
        tracing::warn!(
            limit,
            max_connections = config.http_limits.max_connections,
            "The open-file limit is below --max-connections; connections beyond it are refused by the OS."
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tap: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Install the signal handlers before anything else can be interrupted.
        let stop = tap::shutdown::signal();
        let app = tap::App::bind(config).await?;
        app.run(stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "Tap failed.");
            ExitCode::FAILURE
        }
    }
}

/// `tap healthcheck`: 0 when healthy, 1 with the reason on stderr otherwise.
fn healthcheck(check: &Remote) -> ExitCode {
    match tap::remote::block_on(tap::remote::healthcheck::run(check)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("tap healthcheck: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a client subcommand to its exit status.
fn one_shot(f: impl std::future::Future<Output = Result<ExitCode, String>>) -> ExitCode {
    tap::remote::block_on(f).unwrap_or_else(|reason| {
        eprintln!("tap: {reason}");
        ExitCode::from(2)
    })
}
