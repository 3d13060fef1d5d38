//! The log's own figures, through the OpenTelemetry metrics API; `runed` exports them to Prometheus.

use opentelemetry::metrics::{Counter, Histogram, Meter};

/// Instruments of the log. Cheap to clone; a no-op until `runed` installs a meter provider.
#[derive(Clone)]
pub struct Metrics {
    /// Commands proposed through [`crate::Log::propose`].
    pub proposals: Counter<u64>,
    /// Proposed commands that apply rejected (a decision, not a failure).
    pub rejections: Counter<u64>,
    /// Entries applied to the state machine.
    pub commits: Counter<u64>,
    /// Durable log commits (one fsync each).
    pub log_flushes: Counter<u64>,
    /// Time of each durable log commit.
    pub fsync_seconds: Histogram<f64>,
    /// Entries written per durable log commit: the group-commit factor.
    pub flush_batch_entries: Histogram<u64>,
    /// Time from propose to the applied outcome.
    pub propose_seconds: Histogram<f64>,
    /// Proposals carried by one log entry: the group-commit factor.
    pub batch_envelopes: Histogram<u64>,
    /// Time of one apply to the state: the entries raft hands over at once, up to telling the
    /// projections (the commit comes later, timed on its own).
    pub apply_seconds: Histogram<f64>,
    /// Time of one commit of the applied state (deferred, or forced by a read): applies wait
    /// while it runs.
    pub state_commit_seconds: Histogram<f64>,
    /// Writes refused because the data dir's file system was below its reserve.
    pub refused_no_space: Counter<u64>,
}

impl Metrics {
    /// Creates the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let secs = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        // Applies and state commits take tens to hundreds of microseconds.
        let fine = vec![
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
        ];
        let m = Self {
            proposals: meter
                .u64_counter("rune_log_proposals")
                .with_description("Commands proposed to the log")
                .build(),
            rejections: meter
                .u64_counter("rune_log_rejections")
                .with_description("Proposed commands that apply rejected")
                .build(),
            commits: meter
                .u64_counter("rune_log_commits")
                .with_description("Log entries applied to the state machine")
                .build(),
            log_flushes: meter
                .u64_counter("rune_log_flushes")
                .with_description("Durable log commits (fsyncs)")
                .build(),
            fsync_seconds: meter
                .f64_histogram("rune_log_fsync_duration")
                .with_unit("s")
                .with_description("Time of a durable log commit, fsync included")
                .with_boundaries(secs.clone())
                .build(),
            flush_batch_entries: meter
                .u64_histogram("rune_log_flush_batch_entries")
                .with_description("Entries made durable by one fsync")
                .with_boundaries(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
                .build(),
            propose_seconds: meter
                .f64_histogram("rune_log_propose_duration")
                .with_unit("s")
                .with_description("Time from propose to applied outcome")
                .with_boundaries(secs)
                .build(),
            apply_seconds: meter
                .f64_histogram("rune_state_apply_duration")
                .with_unit("s")
                .with_description("Time of one apply of committed log entries to the state")
                .with_boundaries(fine.clone())
                .build(),
            state_commit_seconds: meter
                .f64_histogram("rune_state_commit_duration")
                .with_unit("s")
                .with_description("Time of one commit of the applied state to its database")
                .with_boundaries(fine)
                .build(),
            batch_envelopes: meter
                .u64_histogram("rune_log_batch_proposals")
                .with_description("Proposals carried by one log entry (and so sharing one fsync)")
                .with_boundaries(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0])
                .build(),
            refused_no_space: meter
                .u64_counter("rune_storage_writes_refused")
                .with_description("Writes refused because the data dir was below its free-space reserve")
                .build(),
        };
        // Unlabelled counters start at zero, so a scrape right after start shows them.
        for c in [&m.rejections, &m.commits, &m.log_flushes] {
            c.add(0, &[]);
        }
        m
    }
}
