//! `runed`: the Rune daemon.

use clap::Parser;
use runed::config::{Flags, Settings};

fn main() -> std::process::ExitCode {
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
            std::process::ExitCode::FAILURE
        }
    }
}
