//! `rune`: the Rune CLI.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = runed::cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    std::process::ExitCode::from(rt.block_on(runed::cli::run(cli)))
}
