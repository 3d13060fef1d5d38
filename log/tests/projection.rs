//! The projection contract, through the real log: for random command sequences, a view built
//! from the state at some index and then fed the deltas of every later entry equals the view
//! built from the state at the end. And the shared loop ([`Projection`]) keeps that true while
//! entries arrive, also across a rebuild forced by a reset.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rune_log::projection::{read_state, Projection, ProjectionError, View};
use rune_log::{Log, LogConfig};
use rune_statemachine::delta::Delta;
use rune_statemachine::testing::{command, fold};
use rune_statemachine::Command;

/// The simplest view: the folded state itself.
#[derive(Default)]
struct Mirror(Mutex<Vec<Delta>>);

impl View for Mirror {
    async fn reset(&self, state: Vec<Delta>) -> Result<(), ProjectionError> {
        *self.0.lock().map_err(|e| ProjectionError::View(e.to_string()))? = state;
        Ok(())
    }

    async fn apply(&self, deltas: &[&Delta]) -> Result<(), ProjectionError> {
        let mut m = self.0.lock().map_err(|e| ProjectionError::View(e.to_string()))?;
        let now = fold(m.iter().chain(deltas.iter().copied()));
        *m = now;
        Ok(())
    }
}

fn init() -> Command {
    init_with("10.96.0.0/29")
}

/// The first command, with VIPs from `cidr`.
fn init_with(cidr: &str) -> Command {
    Command::Init {
        policies: rune_statemachine::identity::builtin_policies(),
        namespaces: vec!["system".into(), "default".into()],
        cluster_cidr: Some(cidr.into()),
        cluster_id: Some("projection".into()),
        claim_hosts: false,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A cast of one service, `name`, at the default scale.
fn cast_service(name: &str) -> Command {
    let svc = rune_statemachine::spec::ServiceSpec {
        name: name.into(),
        image: Some("busybox".into()),
        ..Default::default()
    };
    Command::Apply {
        resources: vec![rune_statemachine::Resource::Service(svc)],
        create_namespace: false,
        force: false,
        history_limit: 10,
        release: None,
    }
}

async fn caught_up(log: &Log, p: &Projection) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.applied_index() < *log.applied().borrow() {
        assert!(Instant::now() < deadline, "the projection did not catch up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A log in `dir` seeded with `first`, and a [`Mirror`] projection of it, caught up.
async fn mirrored(
    dir: &std::path::Path,
    first: Command,
    stale_budget: Duration,
) -> (Arc<Log>, Arc<Mirror>, Arc<Projection>) {
    let log = Arc::new(Log::open(LogConfig::new(dir)).await.unwrap());
    log.propose(first).await.unwrap();
    let mirror = Arc::new(Mirror::default());
    let p = Projection::start(log.clone(), "mirror", mirror.clone(), stale_budget).await;
    caught_up(&log, &p).await;
    (log, mirror, p)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn fed_entry_by_entry_equals_built_from_the_state(
        cmds in prop::collection::vec(command(), 1..40),
        cut in 0usize..40,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let (fed, built, mirrored) = rt.block_on(async {
            let cfg = LogConfig { snapshot_every: 15, keep_after_snapshot: 3, ..LogConfig::new(dir.path()) };
            let log = Arc::new(Log::open(cfg).await.unwrap());
            log.propose(init()).await.unwrap();
            let mirror = Arc::new(Mirror::default());
            let p = Projection::start(log.clone(), "mirror", mirror.clone(), Duration::from_secs(5)).await;
            let mut rx = log.subscribe();
            let mut start = None;
            let cut = cut.min(cmds.len());
            for (i, c) in cmds.into_iter().enumerate() {
                if i == cut {
                    start = Some(read_state(&log).unwrap());
                }
                log.propose(c).await.unwrap();
            }
            let (from, mut state) = start.unwrap_or_else(|| read_state(&log).unwrap());
            // Every entry applied after the read, in order, on top of it.
            while let Ok(e) = rx.try_recv() {
                if e.index > from {
                    state = fold(state.iter().chain(e.deltas.iter()));
                }
            }
            let (_, built) = read_state(&log).unwrap();
            caught_up(&log, &p).await;
            let mirrored = mirror.0.lock().unwrap().clone();
            log.shutdown().await.unwrap();
            (state, built, mirrored)
        });
        prop_assert_eq!(&fed, &built);
        prop_assert_eq!(&mirrored, &built);
    }
}

#[test]
fn a_paused_projection_goes_stale_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let (log, mirror, p) = mirrored(dir.path(), init(), Duration::from_millis(300)).await;
        assert!(!p.stale());
        p.pause(true);
        log.propose(cast_service("api")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.stale() {
            assert!(Instant::now() < deadline, "a paused projection never went stale");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p.pause(false);
        caught_up(&log, &p).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.stale() {
            assert!(
                Instant::now() < deadline,
                "the projection stayed stale after catching up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let names: BTreeMap<_, _> = mirror
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|d| Some((d.service()?.1.to_string(), ())))
            .collect();
        assert!(names.contains_key("api"), "{names:?}");
        assert_eq!(p.errors(), 0);
        log.shutdown().await.unwrap();
    });
}

/// A read names the index of exactly the state it holds while entries land (the applied watch
/// can trail the state by an entry): a watch lists from such a read and streams the entries
/// after its index, so an index one short would stream a listed object a second time.
#[test]
fn a_read_names_the_index_of_the_state_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let log = Arc::new(Log::open(LogConfig::new(dir.path())).await.unwrap());
        log.propose(init_with("10.96.0.0/16")).await.unwrap();
        let is_service = |d: &Delta| matches!(d, Delta::Service { .. });
        let mut rx = log.subscribe();
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    log.propose(cast_service(&format!("s{i}"))).await.unwrap();
                }
            })
        };
        let mut reads = Vec::new();
        while !writer.is_finished() {
            let (index, state) = read_state(&log).unwrap();
            reads.push((index, state.iter().filter(|d| is_service(d)).count()));
            tokio::task::yield_now().await;
        }
        writer.await.unwrap();
        // How many services the state held after each entry.
        let (mut after, mut n) = (BTreeMap::new(), 0);
        while let Ok(e) = rx.try_recv() {
            n += e.deltas.iter().filter(|d| is_service(d)).count();
            after.insert(e.index, n);
        }
        assert_eq!(n, 300, "every entry was seen");
        assert!(reads.len() > 10, "the reads raced the writes: {}", reads.len());
        for (index, count) in reads {
            let expected = after.range(..=index).next_back().map_or(0, |(_, n)| *n);
            assert_eq!(count, expected, "the read named index {index}");
        }
        log.shutdown().await.unwrap();
    });
}

/// One entry carries many writes (group commit), each its own event, and the shared loop takes
/// at most [`rune_log::projection::MAX_BATCH`] events at a time: a batch that ends inside an
/// entry must not cost the view the rest of that entry. A paused projection lets a burst of
/// concurrent casts pile up, so batches end wherever the count falls.
#[test]
fn an_entry_split_across_the_loop_s_batches_reaches_the_view_whole() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let (log, mirror, p) = mirrored(dir.path(), init_with("10.0.0.0/16"), Duration::from_secs(60)).await;
        let mut rx = log.subscribe();
        p.pause(true);
        let burst: Vec<_> = (0..1500)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.propose(cast_service(&format!("s{i}"))).await })
            })
            .collect();
        for b in burst {
            assert!(b.await.unwrap().unwrap().outcome.is_ok());
        }
        // The burst went out as entries of many writes each, or this test shows nothing.
        let mut per_entry: BTreeMap<u64, usize> = BTreeMap::new();
        while let Ok(e) = rx.try_recv() {
            *per_entry.entry(e.index).or_default() +=
                e.deltas.iter().filter(|d| d.service().is_some()).count();
        }
        assert!(
            per_entry.values().filter(|n| **n > 1).count() >= 2,
            "the casts were not grouped into entries: {per_entry:?}"
        );
        p.pause(false);
        caught_up(&log, &p).await;
        let (_, built) = read_state(&log).unwrap();
        let mirrored = mirror.0.lock().unwrap().clone();
        let services = |v: &[Delta]| v.iter().filter(|d| d.service().is_some()).count();
        assert_eq!(
            services(&mirrored),
            services(&built),
            "services in the view and in the state"
        );
        assert_eq!(mirrored, built);
        log.shutdown().await.unwrap();
    });
}

/// Raft's own entries (a leader's blank entry, a membership change) change no object but are
/// applied like any other: a projection must count them as applied, or it reads as behind the
/// log (and, past its stale budget, fails closed) until some later write. A learner that never
/// answers is added and taken out again: two membership entries, nothing written after them.
#[test]
fn raft_s_own_entries_leave_no_projection_behind() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let (log, _mirror, p) = mirrored(dir.path(), init(), Duration::from_millis(300)).await;
        let before = *log.applied().borrow();
        let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = nobody.local_addr().unwrap().to_string();
        drop(nobody);
        let added = log.add_voter(9, &address, Duration::from_millis(200)).await;
        assert!(added.is_err(), "a learner that never answers was made a voter");
        assert!(
            *log.applied().borrow() > before,
            "the membership changes were not applied"
        );
        caught_up(&log, &p).await;
        assert_eq!(p.errors(), 0);
        log.shutdown().await.unwrap();
    });
}
