//! `runed`: the Rune daemon.

use clap::Parser;
use runed::config::{Flags, Settings};

/// jemalloc, as TiKV and other Rust servers use, rather than glibc's malloc: a write allocates
/// on one thread (the gRPC handler, the apply) and frees on another, where glibc's per-thread
/// arenas pay for consolidation and grow a page at a time. In alternating runs of
/// `cargo bench --bench writes` at 64 clients, jemalloc took about a tenth less CPU per write
/// (8 of 10 pairs), for about 2.5 MiB more resident memory at idle.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // Raw, as clap reads them: a path that is not UTF-8 is an argument, not a panic.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let arg = |i: usize| args.get(i).and_then(|a| a.to_str());
    if arg(1) == Some(rune_orchestrator::logfile::WRITER_ARG) {
        let code = rune_orchestrator::logfile::writer_main(arg(2).unwrap_or(""));
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    if arg(1) == Some("restore") {
        return runed::restore::main(&args[2..]);
    }
    let flags = match Flags::try_parse() {
        Ok(f) => f,
        Err(e) => {
            let _ = e.print();
            use clap::error::ErrorKind::{DisplayHelp, DisplayVersion};
            if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                return std::process::ExitCode::SUCCESS;
            }
            // A bad flag is configuration too: systemd must not restart into it.
            runed::systemd::status("configuration error: bad command line (see the log)");
            return std::process::ExitCode::from(runed::daemon::EXIT_CONFIG);
        }
    };
    let settings = match Settings::resolve(&flags) {
        Ok(s) => s,
        Err(e) => {
            // Before logging exists: stderr (the journal under systemd) and the unit's status.
            runed::systemd::print_error(&format!("runed: configuration error: {e}"));
            runed::systemd::status(&format!("configuration error: {}", first_line(&e.0)));
            return std::process::ExitCode::from(runed::daemon::EXIT_CONFIG);
        }
    };
    runed::daemon::init_logging(&settings);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(runed::daemon::run(settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = runed::daemon::exit_code(&e);
            let text = format!("{e:#}");
            tracing::error!(error = %text, exit_code = code, "runed failed");
            runed::systemd::status(&format!("failed: {}", first_line(&text)));
            if !runed::systemd::stdout_is_journal() {
                eprintln!("runed: {text}");
            }
            std::process::ExitCode::from(code)
        }
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}
