//! Living under systemd: readiness, status and watchdog notifications (sd_notify, through
//! `libsystemd`), and logs in the journal's native protocol with their priority and fields.
//!
//! Everything here is a no-op outside systemd: without `NOTIFY_SOCKET` nothing is sent, and
//! logs go to stdout as text or JSON unless stdout is the journal's stream (`JOURNAL_STREAM`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use libsystemd::daemon::{self, NotifyState};
use libsystemd::logging::{journal_send, JournalStream, Priority};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

fn notify(states: &[NotifyState]) {
    if let Err(e) = daemon::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `STATUS=`: what runed is doing, shown by `systemctl status`.
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text.to_string())]);
}

/// `READY=1` with a status line: start-up is complete.
pub fn ready(text: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(text.to_string())]);
}

/// `STOPPING=1` with a status line.
pub fn stopping(text: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(text.to_string())]);
}

/// `WATCHDOG=1`: runed's loops made progress.
pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

/// The unit's `WatchdogSec=`, when systemd watches this process.
pub fn watchdog_interval() -> Option<Duration> {
    daemon::watchdog_enabled(false).filter(|d| !d.is_zero())
}

/// Whether stdout is connected to the journal (systemd sets `JOURNAL_STREAM` to its
/// device:inode), so that logs can be sent natively instead.
pub fn stdout_is_journal() -> bool {
    match (
        JournalStream::from_env(),
        JournalStream::from_fd(std::io::stdout()),
    ) {
        (Ok(env), Ok(out)) => env == out,
        _ => false,
    }
}

/// Prints an error to stderr before logging is set up; on the journal each line carries the
/// `<3>` (err) prefix, so `journalctl -p err` shows it.
pub fn print_error(text: &str) {
    let on_journal = match (
        JournalStream::from_env(),
        JournalStream::from_fd(std::io::stderr()),
    ) {
        (Ok(env), Ok(err)) => env == err,
        _ => false,
    };
    let mut err = std::io::stderr().lock();
    for line in text.lines() {
        let _ = if on_journal {
            writeln!(err, "<3>{line}")
        } else {
            writeln!(err, "{line}")
        };
    }
}

/// The journal priority of a tracing level: ERROR is `err`, WARN is `warning`, INFO is `info`,
/// DEBUG and TRACE are `debug`, so `journalctl -p err` shows exactly the errors.
pub fn priority(level: &Level) -> Priority {
    match *level {
        Level::ERROR => Priority::Error,
        Level::WARN => Priority::Warning,
        Level::INFO => Priority::Info,
        _ => Priority::Debug,
    }
}

/// Sends every event to the journal natively: PRIORITY from the level, MESSAGE as the text line
/// would read (message, then `key=value` fields), and each field as `RUNE_<FIELD>` so that
/// `journalctl RUNE_SERVICE=api` finds it.
pub struct JournalLayer;

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, value.to_string(), true);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.add(field, format!("{value:?}"), false);
    }
}

impl Fields {
    fn add(&mut self, field: &Field, value: String, is_str: bool) {
        if field.name() == "message" {
            self.message = value;
            return;
        }
        if is_str && value.contains(char::is_whitespace) {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
        let name: String = field
            .name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        self.pairs.push((format!("RUNE_{name}"), value));
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let meta = event.metadata();
        let text = format!("{}{}", f.message, f.rest);
        let extra = [
            ("SYSLOG_IDENTIFIER".to_string(), "runed".to_string()),
            ("RUNE_TARGET".to_string(), meta.target().to_string()),
        ];
        let fields = extra.into_iter().chain(f.pairs);
        if journal_send(priority(meta.level()), &text, fields).is_err() {
            // The journal went away (or never was): the line still reaches stdout.
            let _ = writeln!(std::io::stdout(), "{} {}: {text}", meta.level(), meta.target());
        }
    }
}

/// A writer for the formatted lines of `tracing_subscriber::fmt` that puts the sd-daemon
/// priority prefix (`<3>` for errors) in front of each line, for JSON logs on the journal.
pub struct PrefixedStdout;

/// One event's line, with its prefix.
pub struct PrefixedLine(u8);

impl std::io::Write for PrefixedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = format!("<{}>", self.0).into_bytes();
        line.extend_from_slice(buf);
        std::io::stdout().lock().write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for PrefixedStdout {
    type Writer = PrefixedLine;

    fn make_writer(&'a self) -> Self::Writer {
        PrefixedLine(Priority::Info as u8)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        PrefixedLine(priority(meta.level()) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(&Level::ERROR) as u8, 3);
        assert_eq!(priority(&Level::WARN) as u8, 4);
        assert_eq!(priority(&Level::INFO) as u8, 6);
        assert_eq!(priority(&Level::TRACE) as u8, 7);
    }
}
