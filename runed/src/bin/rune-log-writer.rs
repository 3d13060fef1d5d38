//! `rune-log-writer PATH`: stamps each line of stdin with the time and appends it to PATH.
//!
//! runed starts one per process instance (see `rune_orchestrator::logfile`). It is its own small
//! binary so that hundreds of them cost little memory; `runed __log-writer PATH` is the fallback
//! when it is not installed beside runed.

fn main() -> std::process::ExitCode {
    // Accepts `PATH` and `__log-writer PATH`, so runed can call either binary the same way.
    let path = std::env::args()
        .skip(1)
        .find(|a| a != rune_orchestrator::logfile::WRITER_ARG);
    let Some(path) = path else {
        eprintln!("usage: rune-log-writer PATH");
        return std::process::ExitCode::from(2);
    };
    let code = rune_orchestrator::logfile::writer_main(&path);
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
