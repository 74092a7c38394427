//! The `tap` binary: command line → [`tap::Config`] → [`tap::App`]; nothing else.

use std::process::ExitCode;

use tap::config::{self, CliError, Environment, Invocation};

fn main() -> ExitCode {
    let env = Environment::from_process_and_dotenv();
    let config = match config::parse(std::env::args_os(), &env) {
        Ok(Invocation::Run(config)) => *config,
        Ok(Invocation::Help(help)) => {
            print!("{help}");
            return ExitCode::SUCCESS;
        }
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
