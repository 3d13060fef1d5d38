//! What real Rune stacks use beyond the seeds: volumes, init steps and resources, end to end on
//! the real Docker Engine (the local `busybox` image built FROM scratch by scripts/test-images.sh).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rune_chaos_tests::{stderr, stdout, wait_until, Daemon};

const LONG: Duration = Duration::from_secs(90);

/// Docker volumes this runed made.
fn volumes_of(d: &Daemon) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=rune.node={}", d.node),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn docker_inspect(id: &str, format: &str) -> String {
    let o = Command::new("docker")
        .args(["inspect", "-f", format, id])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

const DB: &str = "configmap:
  name: greeting
  data:
    msg: hello from the configmap
---
service:
  name: db
  image: busybox
  scale: 1
  env:
    ROUND: \"1\"
  command: [\"/bin/sh\", \"-c\"]
  args: [\"cat /data/seed; exec sleep 3600\"]
  stopGracePeriodSeconds: 1
  resources:
    cpu: {request: 250m, limit: 500m}
    memory: {request: 32Mi, limit: 64Mi}
  dependencies:
    - configmap:greeting
  configmapMounts:
    - name: cfg
      mountPath: /etc/cfg
      configmapName: greeting
  volumes:
    - name: data
      mountPath: /data
      claimTemplate:
        size: 1Gi
        accessMode: ReadWriteOnce
  initSteps:
    - name: seed
      image: busybox
      command: [\"/bin/sh\", \"-c\"]
      args: [\"echo seeded round $ROUND: $(cat /etc/cfg/msg) >> /data/seed; echo step ran\"]
";

#[test]
fn init_step_fills_a_volume_that_outlives_rollouts_restarts_and_the_service() {
    image();
    let mut d = Daemon::start(&bins());
    let spec = write(&d, "db.yaml", DB);
    let out = run_ok(&d, &["cast", &spec]);
    assert!(out.contains("ready: 1/1"), "{out}");
    let seed = |d: &Daemon| run_ok(d, &["exec", "db", "--", "cat", "/data/seed"]);
    assert_eq!(seed(&d), "seeded round 1: hello from the configmap\n");
    assert_eq!(volumes_of(&d).len(), 1, "one volume for the one instance");
    let logs = run_ok(&d, &["logs", "db", "--init-step", "seed"]);
    assert!(logs.contains("step ran"), "{logs}");
    let o = d.rune(&["logs", "db", "--init-step", "nope"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("init step 'nope' has not run"),
        "{}",
        stderr(&o)
    );

    // The engine got requests and limits.
    let cid = instances(&d, "db")[0]["runtimeId"].as_str().unwrap().to_string();
    assert_eq!(
        docker_inspect(
            &cid,
            "{{.HostConfig.NanoCpus}} {{.HostConfig.CpuShares}} {{.HostConfig.Memory}} {{.HostConfig.MemoryReservation}}"
        ),
        "500000000 256 67108864 33554432"
    );

    // A rollout replaces the container; the step runs again on the same volume.
    let out = run_ok(
        &d,
        &[
            "cast",
            &write(&d, "db2.yaml", &DB.replace("ROUND: \"1\"", "ROUND: \"2\"")),
        ],
    );
    assert!(out.contains("ready: 1/1"), "{out}");
    assert_ne!(instances(&d, "db")[0]["runtimeId"].as_str(), Some(cid.as_str()));
    assert_eq!(
        seed(&d),
        "seeded round 1: hello from the configmap\nseeded round 2: hello from the configmap\n"
    );

    // The volume as users see it: its claim name, the size asked for, what it holds, its user.
    let vols: serde_json::Value =
        serde_json::from_str(&run_ok(&d, &["volume", "list", "-o", "json"])).unwrap();
    let v = &vols[0];
    assert_eq!(
        (
            v["name"].as_str(),
            v["service"].as_str(),
            v["instance"].as_str(),
            v["requestedSize"].as_str()
        ),
        (Some("data-db-0"), Some("db"), Some("db-0"), Some("1Gi")),
        "{vols}"
    );
    assert_eq!(v["inUse"], true, "{vols}");
    assert!(v["usageBytes"].as_u64() > Some(50), "{vols}");
    let o = d.rune(&["volume", "delete", "data-db-0"]);
    assert_eq!(code(&o), 5, "a volume in use is not deleted: {}", stderr(&o));
    assert!(stderr(&o).contains("in use by"), "{}", stderr(&o));

    // runed dies and comes back, adopting the container: the data is where it was.
    d.sigkill();
    d.restart();
    wait_until(LONG, "db to be adopted", || {
        instances(&d, "db")
            .first()
            .is_some_and(|i| i["status"] == "Running")
    });
    assert_eq!(seed(&d).lines().count(), 2);

    // The volume outlives its service.
    run_ok(&d, &["delete", "db"]);
    wait_until(LONG, "db's instances to go", || instances_gone(&d));
    assert_eq!(volumes_of(&d).len(), 1, "the volume was deleted with its service");
    wait_until(LONG, "the last container using the volume to go", || {
        let list = run_ok(&d, &["volume", "list"]);
        assert!(list.contains("data-db-0"), "{list}");
        list.contains(" no")
    });
    // Nothing holds it any more (the init step's container went with the instance): deleted.
    assert!(run_ok(&d, &["volume", "delete", "data-db-0"]).contains("deleted"));
    assert!(volumes_of(&d).is_empty());
    let o = d.rune(&["volume", "delete", "data-db-0"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
}

fn instances_gone(d: &Daemon) -> bool {
    let o = d.rune(&["get", "instances", "-o", "json"]);
    code(&o) == 0 && stdout(&o).trim() == "[]"
}

#[test]
fn a_failing_init_step_fails_the_instance_with_its_name_and_code() {
    image();
    let d = Daemon::start(&bins());
    let spec = write(
        &d,
        "bad.yaml",
        "service:
  name: bad
  image: busybox
  scale: 1
  command: [\"sleep\", \"3600\"]
  initSteps:
    - name: migrate
      command: [\"/bin/sh\", \"-c\", \"echo no database; exit 7\"]
",
    );
    run_ok(&d, &["cast", "--detach", &spec]);
    wait_for_reason(&d, "bad", "init step 'migrate' failed: exited with code 7");
    let logs = run_ok(&d, &["logs", "bad", "--init-step", "migrate"]);
    assert!(logs.contains("no database"), "{logs}");
    // Retried: the instance is held back, not given up on.
    wait_until(LONG, "a retry", || {
        instances(&d, "bad")[0]["restarts"].as_u64() >= Some(1)
    });
    run_ok(&d, &["delete", "bad"]);
}

#[test]
fn bad_volumes_and_steps_are_refused_by_field() {
    let d = Daemon::start(&bins());
    let spec = write(
        &d,
        "v.yaml",
        "service:
  name: v
  image: busybox
  volumes:
    - name: data
      mountPath: /data
      claimTemplate: {storageClassName: ssd, size: lots}
    - name: data
      mountPath: relative
      claim: shared
      claimTemplate: {}
  initSteps:
    - name: Bad_Step
",
    );
    let o = d.rune(&["cast", "--detach", &spec]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    let err = stderr(&o);
    for want in [
        "v.yaml:7: service \"v\": volumes[0].claimTemplate.storageClassName: unknown storage class 'ssd'; this node offers: local",
        "volumes[0].claimTemplate.size: 'lots'",
        "volumes[1].name: volume name 'data' is used twice",
        "volumes[1].mountPath: 'relative' must be an absolute path",
        "volumes[1]: give exactly one of 'claim' (shared) and 'claimTemplate'",
        "initSteps[0].name: init step name",
    ] {
        assert!(err.contains(want), "{want} in:\n{err}");
    }
    assert!(stdout(&d.rune(&["get", "svc"]))
        .lines()
        .all(|l| !l.starts_with("v ")));
}
