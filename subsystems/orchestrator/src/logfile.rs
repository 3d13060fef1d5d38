//! Process output with a time on every line, kept by a small writer process.
//!
//! A process instance writes into a pipe whose other end belongs to `runed __log-writer FILE`
//! (this module's [`writer_main`]), not to runed: so the instance keeps running and logging
//! while runed restarts, and every line still gets the time it was written, which
//! `rune logs --timestamps` and `--since` need. Lines are stored as `<RFC 3339 time> <line>`.

use std::io::{BufRead, Write};
use std::time::SystemTime;

/// Size at which the log file is rotated (one previous file is kept as `.1`).
pub const MAX_LOG_BYTES: u64 = 10 * 1024 * 1024;

/// The hidden argument that turns the runed binary into a log writer.
pub const WRITER_ARG: &str = "__log-writer";

/// Copies stdin to `path`, prefixing each line with the current time, until end of input.
/// Returns the process exit code.
pub fn writer_main(path: &str) -> i32 {
    // Stopping an instance signals its process group; the writer must outlive the process to
    // store its last words, and ends on end of input instead.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: setting a signal to SIG_IGN installs no handler code.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let file = match std::fs::OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("log writer: cannot open {path}: {e}");
            return 1;
        }
    };
    let mut written = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = std::io::BufWriter::new(file);
    let mut input = std::io::BufReader::with_capacity(64 * 1024, std::io::stdin());
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                let ts = humantime::format_rfc3339_nanos(SystemTime::now());
                let _ = write!(out, "{ts} ");
                let _ = out.write_all(&line);
                if line.last() != Some(&b'\n') {
                    let _ = out.write_all(b"\n");
                }
                written += line.len() as u64 + 32;
                if written > MAX_LOG_BYTES {
                    // Keep one previous file, like a minimal logrotate.
                    let _ = out.flush();
                    let _ = std::fs::rename(path, format!("{path}.1"));
                    if let Ok(f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                        out = std::io::BufWriter::new(f);
                        written = 0;
                    }
                }
                // Flush when nothing more is waiting, so `logs -f` sees lines as they come.
                if input.buffer().is_empty() {
                    let _ = out.flush();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = out.flush();
    0
}

/// Splits a stored line into its time (Unix seconds) and text; lines written without a writer
/// have no time.
pub fn split(line: &[u8]) -> (Option<i64>, &[u8]) {
    let Some(sp) = line.iter().position(|b| *b == b' ') else {
        return (None, line);
    };
    let Ok(ts) = std::str::from_utf8(&line[..sp]) else {
        return (None, line);
    };
    match humantime::parse_rfc3339(ts) {
        Ok(t) => {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            (Some(secs), &line[sp + 1..])
        }
        Err(_) => (None, line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_reads_the_time_and_keeps_the_text() {
        let (t, text) = split(b"2026-11-22T18:40:18.123456789Z hello world\n");
        assert_eq!(t, Some(1_795_372_818));
        assert_eq!(text, b"hello world\n");
        let (t, text) = split(b"plain line\n");
        assert_eq!((t, text), (None, &b"plain line\n"[..]));
    }
}
