//! Against the real Docker Engine (and the local `busybox` image that scripts/test-images.sh
//! builds FROM scratch): a stop whose grace period is longer than the client's request timeout
//! still succeeds, because the engine answers it only once the container is gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rune_orchestrator::runner::docker::{DockerClientConfig, DockerRunner};
use rune_orchestrator::runner::{Launch, RunHandle};
use rune_statemachine::spec::ServiceSpec;

#[tokio::test]
async fn a_grace_period_longer_than_the_request_timeout_stops_cleanly() {
    let cluster = format!("stoptest{}", std::process::id());
    let cfg = DockerClientConfig {
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let docker = DockerRunner::new("/var/run/docker.sock", "stop-test", &cluster, cfg);
    let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
        "name": "stubborn",
        "image": "busybox:latest",
        "command": "/bin/sh",
        "args": ["-c", "trap '' TERM; while true; do sleep 1; done"],
        "stopGracePeriodSeconds": 4,
    }))
    .unwrap();
    let launch = Launch {
        namespace: "default".into(),
        service: "stubborn".into(),
        id: "stubborn-0".into(),
        template: "t".into(),
        spec: Arc::new(spec),
        env: BTreeMap::new(),
        mounts: Vec::new(),
        pull_auth: BTreeMap::new(),
    };
    let run = docker
        .start(&launch)
        .await
        .expect("start (is the busybox image built? scripts/test-images.sh)");
    let RunHandle::Container { id } = &run.handle else {
        panic!("not a container: {:?}", run.handle);
    };
    let started = Instant::now();
    let stopped = docker.stop(id, Duration::from_secs(4)).await;
    let took = started.elapsed();
    let inspect = std::process::Command::new("docker")
        .args(["inspect", id])
        .output()
        .unwrap();
    // Clean up before asserting, so a failure leaves nothing behind.
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", id])
        .output();
    let _ = std::process::Command::new("docker")
        .args(["network", "rm", &docker.network_name()])
        .output();
    stopped.expect("a stop that takes its whole grace period is not a failure");
    assert!(
        took >= Duration::from_secs(3),
        "the grace period was not given: {took:?}"
    );
    assert!(!inspect.status.success(), "the container is still there");
}
