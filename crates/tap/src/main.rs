//! The `tap` binary: command line → [`tap::Config`] → [`tap::App`], or the one-shot
//! `tap healthcheck`; nothing else.

use std::process::ExitCode;

use tap::config::{self, CliError, Environment, Healthcheck, Invocation};

fn main() -> ExitCode {
    let env = Environment::from_process_and_dotenv();
    let config = match config::parse(std::env::args_os(), &env) {
        Ok(Invocation::Run(config)) => *config,
        Ok(Invocation::Help(help)) => {
            print!("{help}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Healthcheck(check)) => return healthcheck(&check),
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Invalid(e)) => {
            eprintln!("tap: {e}");
            return ExitCode::from(2);
        }
    };
    tap::telemetry::init_logging(config.log_level);
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
fn healthcheck(check: &Healthcheck) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
        .and_then(|rt| rt.block_on(tap::healthcheck::run(check)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("tap healthcheck: {reason}");
            ExitCode::FAILURE
        }
    }
}
