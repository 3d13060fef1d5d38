//! Durability under SIGKILL: concurrent casts against the real runed, killed at random moments,
//! restarted, and checked: every acknowledged write is there, and replay rebuilds the state.
//!
//! `CHAOS_ROUNDS` (default 20) and `CHAOS_SEED` (default: time) tune it; the seed is printed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rune_chaos_tests::{stderr, stdout, Bearer, Bins, Daemon};
use rune_proto::v1 as pb;

/// xorshift64*: enough randomness for kill timing, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn spec(name: &str, seq: u64) -> pb::ApplyRequest {
    let json =
        serde_json::json!({"name": name, "image": "busybox", "scale": 0, "env": {"SEQ": seq.to_string()}})
            .to_string();
    pb::ApplyRequest {
        resources: vec![pb::Resource {
            kind: Some(pb::resource::Kind::ServiceJson(json)),
        }],
        ..Default::default()
    }
}

/// Acknowledged writes: service name → highest sequence number acknowledged.
type Acked = Arc<Mutex<BTreeMap<String, u64>>>;

async fn writer(addr: String, bearer: Bearer, worker: usize, round: usize, acked: Acked) {
    let Ok(ch) = tonic::transport::Channel::from_shared(addr) else {
        return;
    };
    let Ok(ch) = ch.connect().await else {
        return;
    };
    let mut c = pb::service_api_client::ServiceApiClient::with_interceptor(ch, bearer);
    for i in 1u64.. {
        // Each worker creates new services and keeps raising the sequence number of its own one,
        // across rounds too.
        let seq = (round as u64 + 1) * 1_000_000 + i;
        let name = if i % 2 == 0 {
            format!("w{worker}")
        } else {
            format!("r{round}-w{worker}-{i}")
        };
        match c.apply(spec(&name, seq)).await {
            Ok(_) => {
                let mut a = acked.lock().unwrap();
                let e = a.entry(name).or_insert(0);
                *e = (*e).max(seq);
            }
            Err(_) => return,
        }
    }
}

fn check(d: &Daemon, acked: &BTreeMap<String, u64>) {
    let o = d.rune(&["get", "svc", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let stored: BTreeMap<String, u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let seq = s["spec"]["env"]["SEQ"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (s["name"].as_str().unwrap().to_string(), seq)
        })
        .collect();
    for (name, seq) in acked {
        let got = stored
            .get(name)
            .unwrap_or_else(|| panic!("acknowledged service {name} was lost"));
        // A write in flight at the kill may have committed after the last acknowledgement.
        assert!(
            got >= seq,
            "service {name}: acknowledged write {seq}, found {got}"
        );
    }
}

fn verify(d: &Daemon) {
    let data = d.data_dir.display().to_string();
    let o = d.rune(&["admin", "replay", "--data-dir", &data, "--verify"]);
    assert!(
        o.status.success(),
        "replay --verify: {}{}",
        stdout(&o),
        stderr(&o)
    );
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let rounds: usize = std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    println!("chaos: {rounds} rounds, CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let mut d = Daemon::new(&Bins::locate());
    // Small snapshot intervals, so kills also land around snapshots and log purges.
    let rf = d.scratch().join("runefile.yaml");
    std::fs::write(&rf, "storage:\n  snapshot-every: 40\n  keep-after-snapshot: 10\n").unwrap();
    d.extra = vec!["--config".into(), rf.display().to_string()];
    d.restart();
    let acked: Acked = Arc::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..rounds {
        let addr = format!("http://{}", d.grpc);
        let workers: Vec<_> = (0..8)
            .map(|w| rt.spawn(writer(addr.clone(), d.bearer(), w, round, acked.clone())))
            .collect();
        std::thread::sleep(Duration::from_millis(30 + rng.below(400)));
        d.sigkill();
        rt.block_on(async {
            for w in workers {
                let _ = w.await;
            }
        });
        if round == rounds / 2 {
            // The crashed data dir itself, before any restart repairs it, replays to its state.
            verify(&d);
        }
        d.restart();
        check(&d, &acked.lock().unwrap());
    }
    let n = acked.lock().unwrap().len();
    assert!(
        n > rounds,
        "the writers got too few acknowledgements ({n}) for the test to mean anything"
    );
    assert_eq!(d.sigterm().code(), Some(0));
    assert!(
        d.data_dir.join("snapshots/current.snap").exists(),
        "the run never crossed a snapshot"
    );
    verify(&d);
    println!("chaos: {n} services acknowledged across {rounds} kills, none lost");
}
