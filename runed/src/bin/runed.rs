//! `runed`: the Rune daemon.

use clap::Parser;
use runed::config::{Flags, Settings};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(rune_orchestrator::logfile::WRITER_ARG) {
        let code = rune_orchestrator::logfile::writer_main(args.get(2).map_or("", String::as_str));
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let flags = Flags::parse();
    let settings = match Settings::resolve(&flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("runed: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    runed::daemon::init_logging(&settings);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runed: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(runed::daemon::run(settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "runed failed");
            eprintln!("runed: {e:#}");
            if e.downcast_ref::<runed::secrets_api::KekProblem>().is_some() {
                return std::process::ExitCode::from(runed::secrets_api::EXIT_KEK);
            }
            std::process::ExitCode::FAILURE
        }
    }
}
