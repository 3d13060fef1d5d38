//! Sequential propose latency through the log alone (no gRPC): `cargo run --release -p rune-log
//! --example propose_latency`. Splits the API's single-client latency into log and the rest.

use std::time::Instant;

use rune_log::{Log, LogConfig};
use rune_statemachine::spec::ServiceSpec;
use rune_statemachine::{Command, Resource};

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let log = Log::open(LogConfig::new(dir.path())).await.expect("open");
        log.propose(Command::Init {
            cluster_cidr: None,
            cluster_id: None,
            claim_hosts: false,
            policies: vec![],
            namespaces: vec!["default".into()],
        })
        .await
        .expect("init");
        let n = 2000;
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let spec = ServiceSpec {
                name: format!("s{i}"),
                image: Some("busybox".into()),
                scale: Some(1),
                ..Default::default()
            };
            let cmd = Command::Apply {
                resources: vec![Resource::Service(spec)],
                create_namespace: false,
                force: false,
                history_limit: 10,
                release: None,
            };
            let t = Instant::now();
            log.propose(cmd).await.expect("propose");
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "sequential propose: p50 {:?} p99 {:?} over {n}",
            lat[n / 2],
            lat[n * 99 / 100]
        );
        log.close().await.expect("close");
    });
}
