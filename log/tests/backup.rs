//! Online backup under concurrent writers, restore into a new data dir, and the free-space
//! reserve, against real redb files.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod common;

use common::{init, svc};
use rune_log::backup::{self, BackupError};
use rune_log::replay::Replay;
use rune_log::{Log, LogConfig, ProposeError};
use rune_statemachine::store::{get_record, service_key, ServiceRecord};
use rune_statemachine::{Command, STATE_TABLE};

fn has_service(log: &Log, name: &str) -> bool {
    let txn = log.read().unwrap();
    let t = txn.open_table(STATE_TABLE).unwrap();
    get_record::<ServiceRecord, _>(&t, &service_key("default", name))
        .unwrap()
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_writers_restores_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(LogConfig::new(dir.path().join("a"))).await.unwrap());
    log.propose(init()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (log, stop) = (log.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                let p = log.propose(svc(&name, 0)).await.unwrap();
                acked.push((name, p.index));
                i += 1;
            }
            acked
        }));
    }
    // Let the writers get going, then back up while they write.
    while log.positions().2 < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let file = dir.path().join("state.backup");
    let source = log.backup().unwrap();
    let index = source.header().index;
    let f2 = file.clone();
    let header = source.header().clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&f2).unwrap();
        source
            .write_chunks(64 << 10, |c| f.write_all(&c).map_err(|e| e.to_string()))
            .unwrap();
    })
    .await
    .unwrap();
    assert_eq!(header.index, index);
    while log.positions().2 < index + 100 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(
        acked.iter().any(|(_, i)| *i > index),
        "writes went on during the backup"
    );

    // Restore into a new dir and open it as a node.
    let restored = dir.path().join("b");
    let h = backup::restore(&file, &restored, |_| Ok(()), |_| Ok(vec![])).unwrap();
    assert_eq!(h.index, index);
    let log2 = Log::open(LogConfig::new(&restored)).await.unwrap();
    let mut before = 0;
    for (name, i) in &acked {
        if *i <= index {
            assert!(
                has_service(&log2, name),
                "{name} (index {i}) acknowledged before {index} is missing"
            );
            before += 1;
        } else {
            assert!(
                !has_service(&log2, name),
                "{name} (index {i}) is after the backup's index {index}"
            );
        }
    }
    assert!(before > 0);
    // The restored node takes writes and replays cleanly.
    log2.propose(svc("after-restore", 0)).await.unwrap();
    log2.close().await.unwrap();
    let v = Replay::open(&restored).unwrap().verify().unwrap();
    assert_eq!(v.live_digest, v.rebuilt_digest, "{:?}", v.first_difference);

    // A second restore into the same dir is refused; so are a cut file and a changed byte.
    let e = backup::restore(&file, &restored, |_| Ok(()), |_| Ok(vec![])).unwrap_err();
    assert!(matches!(e, BackupError::NotEmpty(..)), "{e}");
    let bytes = std::fs::read(&file).unwrap();
    for (name, b) in [
        ("cut", bytes[..bytes.len() * 2 / 3].to_vec()),
        ("flipped", {
            let mut b = bytes.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0x20;
            b
        }),
        ("empty", vec![]),
    ] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, b).unwrap();
        let target = dir.path().join(format!("{name}-dir"));
        let e = backup::restore(&bad, &target, |_| Ok(()), |_| Ok(vec![])).unwrap_err();
        assert!(matches!(e, BackupError::Invalid { .. }), "{name}: {e}");
        assert!(
            !target.join(rune_log::LOG_DIR).exists(),
            "{name}: nothing written"
        );
    }
    // A refusing check writes nothing.
    let target = dir.path().join("refused");
    let e = backup::restore(&file, &target, |_| Err("wrong KEK".into()), |_| Ok(vec![])).unwrap_err();
    assert!(e.to_string().contains("wrong KEK"));
    assert!(!target.join(rune_log::STATE_FILE).exists());
    // A failing last step (installing the KEK) leaves nothing a runed could start from.
    let e = backup::restore(&file, &target, |_| Ok(()), |_| Err("no room for the KEK".into())).unwrap_err();
    assert!(e.to_string().contains("no room"));
    for f in [rune_log::STATE_FILE, rune_log::LOG_DIR, backup::RESTORING] {
        assert!(!target.join(f).exists(), "{f} left behind");
    }
    // An interrupted restore (killed after moving the state in) blocks runed, and the next
    // restore clears it and completes.
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join(backup::RESTORING), "").unwrap();
    std::fs::copy(
        restored.join(rune_log::STATE_FILE),
        target.join(rune_log::STATE_FILE),
    )
    .unwrap();
    let e = Log::open(LogConfig::new(&target)).await.err().unwrap();
    assert!(e.to_string().contains("interrupted restore"), "{e}");
    backup::restore(&file, &target, |_| Ok(()), |_| Ok(vec![])).unwrap();
    assert!(!target.join(backup::RESTORING).exists());
    Log::open(LogConfig::new(&target))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    Arc::try_unwrap(log).ok().unwrap().close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_below_the_reserve_are_refused_and_deletes_may_use_half() {
    let dir = tempfile::tempdir().unwrap();
    let free = rune_log::space::Space::new(dir.path(), 0).free();
    // New objects need the whole reserve, deletes half of it: a reserve between free and
    // twice free tells them apart.
    let reserve = free + free / 2;
    let cfg = LogConfig {
        reserve_bytes: reserve,
        ..LogConfig::new(dir.path())
    };
    let log = Log::open(cfg).await.unwrap();
    log.propose(init()).await.unwrap();
    match log.propose(svc("x", 0)).await {
        Err(ProposeError::NoSpace(n)) => {
            assert_eq!(n.reserve, reserve);
            assert!(n.to_string().contains(&dir.path().display().to_string()), "{n}");
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    let delete = Command::DeleteService {
        namespace: "default".into(),
        name: "x".into(),
        force: false,
    };
    assert!(log.propose(delete).await.is_ok(), "deletes use half the reserve");
    log.close().await.unwrap();
}
