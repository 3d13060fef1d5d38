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
