//! The log against real redb files: durability across restart, group commit, snapshots and
//! purge, and replay rebuilding the live state byte for byte.

use std::sync::Arc;

mod common;

use common::{init, svc};
use rune_log::replay::Replay;
use rune_log::{Log, LogConfig};
use rune_statemachine::store::{get_record, service_key, ServiceRecord};
use rune_statemachine::{Action, Command, STATE_TABLE};

fn read_service(log: &Log, name: &str) -> Option<ServiceRecord> {
    let txn = log.read().unwrap();
    let t = txn.open_table(STATE_TABLE).unwrap();
    get_record(&t, &service_key("default", name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_restart_and_replay_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogConfig::new(dir.path())).await.unwrap();
    log.propose(init()).await.unwrap();
    let p = log.propose(svc("api", 1)).await.unwrap();
    assert_eq!(p.outcome.as_ref().unwrap()[0].action, Action::Created);
    let p = log.propose(svc("api", 1)).await.unwrap();
    assert_eq!(p.outcome.as_ref().unwrap()[0].action, Action::Unchanged);
    let p = log.propose(svc("api", 3)).await.unwrap();
    assert_eq!(p.outcome.as_ref().unwrap()[0].generation, 2);
    let missing_ns = Command::DeleteService {
        namespace: "nope".into(),
        name: "x".into(),
        force: false,
    };
    assert!(log.propose(missing_ns).await.unwrap().outcome.is_err());
    log.close().await.unwrap();

    let log = Log::open(LogConfig::new(dir.path())).await.unwrap();
    let rec = read_service(&log, "api").expect("service survives restart");
    assert_eq!(rec.spec.scale, Some(3));
    assert_eq!(rec.meta.generation, 2);
    log.close().await.unwrap();

    let replay = Replay::open(dir.path()).unwrap();
    let mut kinds = Vec::new();
    replay.run(None, |l| kinds.push(l.kind)).unwrap();
    assert!(kinds.contains(&"apply".to_string()), "{kinds:?}");
    let v = replay.verify().unwrap();
    assert_eq!(v.live_digest, v.rebuilt_digest);
    assert_eq!(v.first_difference, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_are_all_applied_and_replay_works_after_purge() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        snapshot_every: 50,
        keep_after_snapshot: 5,
        ..LogConfig::new(dir.path())
    };
    let log = Arc::new(Log::open(cfg.clone()).await.unwrap());
    log.propose(init()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.propose(svc(&format!("s{i}"), 1)).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap().outcome.is_ok());
    }
    for i in 0..200 {
        assert!(read_service(&log, &format!("s{i}")).is_some());
    }
    log.snapshot().await.unwrap();
    let log = Arc::try_unwrap(log).ok().expect("sole owner");
    log.close().await.unwrap();

    let replay = Replay::open(dir.path()).unwrap();
    assert!(replay.snapshot_index().is_some());
    let v = replay.verify().unwrap();
    assert_eq!(v.first_difference, None, "{v:?}");

    let log = Log::open(cfg).await.unwrap();
    assert!(read_service(&log, "s199").is_some());
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_racing_a_shutdown_are_all_answered() {
    // The batcher has no task of its own: the entry in flight answers its proposers and submits
    // what queued. A shutdown must still answer every queued proposal, and later ones at once.
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(LogConfig::new(dir.path())).await.unwrap());
    log.propose(init()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            (i, log.propose(svc(&format!("r{i}"), 1)).await)
        }));
    }
    log.shutdown().await.unwrap();
    let mut acknowledged = Vec::new();
    for t in tasks {
        let answered = tokio::time::timeout(std::time::Duration::from_secs(20), t)
            .await
            .expect("a proposal racing the shutdown was never answered");
        match answered.unwrap() {
            (i, Ok(p)) => {
                assert!(p.outcome.is_ok());
                acknowledged.push(i);
            }
            (_, Err(e)) => assert!(matches!(e, rune_log::ProposeError::Unavailable(_)), "{e}"),
        }
    }
    let late = tokio::time::timeout(std::time::Duration::from_secs(20), log.propose(svc("late", 1)))
        .await
        .expect("a proposal after the shutdown was never answered");
    assert!(
        matches!(late, Err(rune_log::ProposeError::Unavailable(_))),
        "{late:?}"
    );
    for i in acknowledged {
        assert!(
            read_service(&log, &format!("r{i}")).is_some(),
            "acknowledged r{i} is missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposers_that_give_up_midway_never_stall_the_others() {
    // A proposer that finds the log idle submits its entry and waits on raft's answer itself.
    // Callers give up (a client disconnects, a deadline passes): one that gives up holding an
    // entry must still start the next, so the writes queued behind it are answered, and what
    // was acknowledged is there.
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(LogConfig::new(dir.path())).await.unwrap());
    log.propose(init()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            // Every other proposer gives up after 0 to 2 ms, most of them mid-flight.
            let patience = std::time::Duration::from_micros((i % 8) * 250);
            let propose = log.propose(svc(&format!("g{i}"), 1));
            if i % 2 == 0 {
                (i, tokio::time::timeout(patience, propose).await.ok())
            } else {
                (i, Some(propose.await))
            }
        }));
    }
    let mut acknowledged = Vec::new();
    let mut gave_up = 0;
    for t in tasks {
        let (i, answer) = tokio::time::timeout(std::time::Duration::from_secs(20), t)
            .await
            .expect("a proposal queued behind one whose proposer gave up was never answered")
            .unwrap();
        match answer {
            Some(Ok(p)) => {
                assert!(p.outcome.is_ok());
                acknowledged.push(i);
            }
            Some(Err(e)) => panic!("r{i} refused: {e}"),
            None => {
                assert_eq!(i % 2, 0, "only the impatient give up");
                gave_up += 1;
            }
        }
    }
    assert!(gave_up > 0, "no proposer gave up: the test did not test it");
    for i in acknowledged {
        assert!(
            read_service(&log, &format!("g{i}")).is_some(),
            "acknowledged g{i} is missing"
        );
    }
    let after = tokio::time::timeout(std::time::Duration::from_secs(20), log.propose(svc("after", 1)))
        .await
        .expect("the log stalled after proposers gave up");
    assert!(after.is_ok(), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_first_key_that_differs() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogConfig::new(dir.path())).await.unwrap();
    log.propose(init()).await.unwrap();
    log.propose(svc("api", 1)).await.unwrap();
    log.close().await.unwrap();
    // Tamper with the live state behind the log's back, as a bug or a bad disk would.
    {
        let db = redb::Database::create(dir.path().join(rune_log::STATE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(STATE_TABLE).unwrap();
            t.insert(service_key("default", "api").as_str(), b"{}".as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let v = Replay::open(dir.path()).unwrap().verify().unwrap();
    assert_eq!(v.first_difference.as_deref(), Some("services/default/api"));
    assert_ne!(v.live_digest, v.rebuilt_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_kept_in_redb_by_an_earlier_runed_moves_into_the_wal() {
    use rune_log::types::TypeConfig;
    use rune_log::wal::{self, MetaKey};

    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogConfig::new(dir.path())).await.unwrap();
    log.propose(init()).await.unwrap();
    log.propose(svc("api", 2)).await.unwrap();
    log.close().await.unwrap();

    // Turn the data dir into one an earlier runed wrote: the same entries and meta in redb.
    let wal_dir = dir.path().join(rune_log::LOG_DIR);
    let legacy = dir.path().join(rune_log::LEGACY_LOG_FILE);
    {
        let old = wal::ReadOnly::read(&wal_dir).unwrap();
        let entries: Vec<openraft::Entry<TypeConfig>> = old
            .reader()
            .read(..)
            .unwrap()
            .into_iter()
            .map(|(_, b)| serde_json::from_slice(&b).unwrap())
            .collect();
        assert!(entries.len() >= 3, "{} entries", entries.len());
        let guard = old.reader().lock();
        let meta: Vec<(&str, Vec<u8>)> = [
            ("vote", MetaKey::Vote),
            ("committed", MetaKey::Committed),
            ("last_purged", MetaKey::LastPurged),
        ]
        .into_iter()
        .filter_map(|(n, k)| Some((n, guard.meta().get(k)?.to_vec())))
        .collect();
        rune_log::log_store::write_legacy(&legacy, &entries, &meta).unwrap();
    }
    std::fs::remove_dir_all(&wal_dir).unwrap();

    // Replay reads it without changing it.
    let v = Replay::open(dir.path()).unwrap().verify().unwrap();
    assert_eq!(v.first_difference, None);
    assert!(legacy.exists() && !wal_dir.exists());

    let log = Log::open(LogConfig::new(dir.path())).await.unwrap();
    assert!(wal_dir.is_dir(), "the log moved into {}", wal_dir.display());
    assert!(!legacy.exists(), "the redb log is removed once moved");
    assert_eq!(read_service(&log, "api").unwrap().spec.scale, Some(2));
    log.propose(svc("web", 1)).await.unwrap();
    log.close().await.unwrap();

    // A crash after the move but before the removal leaves both: the WAL wins.
    std::fs::write(&legacy, b"left over").unwrap();
    let log = Log::open(LogConfig::new(dir.path())).await.unwrap();
    assert!(!legacy.exists());
    assert!(read_service(&log, "api").is_some() && read_service(&log, "web").is_some());
    log.close().await.unwrap();
    let v = Replay::open(dir.path()).unwrap().verify().unwrap();
    assert_eq!(v.first_difference, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_log_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogConfig::new(dir.path())).await.unwrap();
    let second = Log::open(LogConfig::new(dir.path())).await;
    assert!(
        matches!(second, Err(rune_log::LogError::Locked(_))),
        "{:?}",
        second.err()
    );
    assert!(matches!(
        Replay::open(dir.path()),
        Err(rune_log::replay::ReplayError::InUse(_))
    ));
    log.close().await.unwrap();
    assert!(Replay::open(dir.path()).is_ok());
}
