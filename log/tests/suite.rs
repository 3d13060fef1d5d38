//! openraft's storage conformance suite against the write-ahead log store and the redb state machine.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use rune_log::log_store::LogStore;
use rune_log::metrics::Metrics;
use rune_log::state_machine::StateMachine;
use rune_log::types::TypeConfig;

/// `solo`: raft's task writes the log itself, as on a single voter; otherwise the writer
/// thread does, as on a member of a larger cluster.
struct Builder {
    solo: bool,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let metrics = Metrics::new(&opentelemetry::global::meter("suite"));
        let (log, _) =
            LogStore::open(&dir.path().join(rune_log::LOG_DIR), metrics.clone()).expect("log store");
        log.solo_switch()
            .store(self.solo, std::sync::atomic::Ordering::Relaxed);
        let db = redb::Database::create(dir.path().join(rune_log::STATE_FILE)).expect("state db");
        let (sm, _) = StateMachine::new(db, dir.path().join(rune_log::SNAPSHOT_DIR), metrics);
        Ok((dir, log, sm))
    }
}

#[test]
fn storage_passes_openraft_suite_written_by_its_thread() {
    if let Err(e) = Suite::test_all(Builder { solo: false }) {
        panic!("openraft storage suite: {e}");
    }
}

#[test]
fn storage_passes_openraft_suite_written_by_raft_alone() {
    if let Err(e) = Suite::test_all(Builder { solo: true }) {
        panic!("openraft storage suite: {e}");
    }
}
