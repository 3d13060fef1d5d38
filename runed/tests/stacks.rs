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
    // A name no spec could give a step never reaches a path.
    let o = d.rune(&["logs", "db", "--init-step", "../../state"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("init_step"), "{}", stderr(&o));

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

    // A process service's steps run on the host and fail the same way.
    let spec = write(
        &d,
        "badproc.yaml",
        "service:
  name: badproc
  scale: 1
  process: {command: /bin/sleep, args: [\"3600\"]}
  initSteps:
    - name: migrate
      command: [/bin/sh, -c, \"echo no database; exit 7\"]
",
    );
    run_ok(&d, &["cast", "--detach", &spec]);
    wait_for_reason(&d, "badproc", "init step 'migrate' failed: exited with code 7");
    let logs = run_ok(&d, &["logs", "badproc", "--init-step", "migrate"]);
    assert!(logs.contains("no database"), "{logs}");
    run_ok(&d, &["delete", "badproc"]);
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

const SHOP_MANIFEST: &str = "name: shop
version: 1.0.0
description: a database that keeps its data
namespace: shop
defaults:
  greeting: hello
";

const SHOP_CAST: &str = "configmap:
  name: greeting
  data:
    msg: \"{{values:greeting}}\"
---
service:
  name: db
  image: busybox
  scale: 1
  command: [\"sleep\", \"3600\"]
  stopGracePeriodSeconds: 1
  volumes:
    - name: data
      mountPath: /data
      claimTemplate: {size: 1Gi}
  initSteps:
    - name: seed
      command: [\"/bin/sh\", \"-c\", \"echo seeded >> /data/seed\"]
";

#[test]
fn a_release_is_recorded_upgraded_and_deleted_with_or_without_its_volumes() {
    image();
    let d = Daemon::start(&bins());
    let dir = d.scratch().join("shop");
    std::fs::create_dir_all(dir.join("casts")).unwrap();
    std::fs::write(dir.join("runeset.yaml"), SHOP_MANIFEST).unwrap();
    std::fs::write(dir.join("casts/db.yaml"), SHOP_CAST).unwrap();
    let dir = dir.to_str().unwrap();

    // A configmap cast by hand first is not taken over unless asked.
    let by_hand = write(
        &d,
        "greeting.yaml",
        "configmap:\n  name: greeting\n  namespace: shop\n  data: {msg: old}\n",
    );
    run_ok(&d, &["cast", "--create-namespace", &by_hand]);
    let o = d.rune(&["cast", dir]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("configmap shop/greeting exists outside release shop/shop; a release only takes what it creates: cast with --adopt"),
        "{}",
        stderr(&o)
    );
    let out = run_ok(&d, &["cast", dir, "--adopt"]);
    assert!(out.contains("release/shop/shop created (generation 1)"), "{out}");
    assert!(out.contains("configmap/shop/greeting configured"), "{out}");
    assert!(out.contains("ready: 1/1"), "{out}");
    // Cast again as it is: nothing changes, the release included.
    let out = run_ok(&d, &["cast", dir]);
    assert!(out.contains("release/shop/shop unchanged"), "{out}");
    assert!(!out.contains("configured") && !out.contains("created"), "{out}");

    let list: serde_json::Value =
        serde_json::from_str(&run_ok(&d, &["-n", "shop", "release", "list", "-o", "json"])).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let r = &list[0];
    assert_eq!(
        (r["name"].as_str(), r["version"].as_str(), r["revision"].as_u64()),
        (Some("shop"), Some("1.0.0"), Some(1)),
        "{list}"
    );
    let digest = r["valuesDigest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{list}");

    // New values are a new revision with a new digest.
    let out = run_ok(&d, &["cast", dir, "--set", "greeting=hi"]);
    assert!(
        out.contains("release/shop/shop configured (generation 2)"),
        "{out}"
    );
    assert!(out.contains("configmap/shop/greeting configured"), "{out}");
    let st = run_ok(&d, &["-n", "shop", "release", "status", "shop"]);
    assert!(st.contains("Runeset:   shop 1.0.0"), "{st}");
    assert!(st.contains("Revision:  2"), "{st}");
    assert!(!st.contains(&digest), "{st}");
    assert!(
        st.lines()
            .any(|l| l.starts_with("service") && l.contains("db") && l.contains("1/1 ready")),
        "{st}"
    );
    assert!(
        st.lines()
            .any(|l| l.starts_with("configmap") && l.contains("greeting") && l.contains("present")),
        "{st}"
    );

    // Deleting the release removes what it cast and keeps the data.
    let out = run_ok(&d, &["-n", "shop", "release", "delete", "shop"]);
    for want in [
        "service shop/db deleted",
        "configmap shop/greeting deleted",
        "release shop/shop deleted",
        "kept 1 volume(s): data-db-0",
    ] {
        assert!(out.contains(want), "{want} in:\n{out}");
    }
    assert!(!run_ok(&d, &["-n", "shop", "get", "svc"]).contains("db"));
    assert_eq!(volumes_of(&d).len(), 1);
    let o = d.rune(&["-n", "shop", "release", "status", "shop"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));

    // Installed again, the new instance finds its data; then the volumes go too when asked.
    run_ok(&d, &["cast", dir]);
    let seed = run_ok(&d, &["-n", "shop", "exec", "db", "--", "cat", "/data/seed"]);
    assert_eq!(seed, "seeded\nseeded\n");
    let out = run_ok(
        &d,
        &["-n", "shop", "release", "delete", "shop", "--delete-volumes"],
    );
    assert!(out.contains("volume/shop/data-db-0 deleted"), "{out}");
    assert!(volumes_of(&d).is_empty());
}

#[test]
fn rollback_returns_to_generation_one_after_two_changes() {
    image();
    let d = Daemon::start(&bins());
    let svc = |round: &str| {
        format!(
            "service:
  name: api
  image: busybox
  scale: 1
  command: [\"sleep\", \"3600\"]
  stopGracePeriodSeconds: 1
  env:
    ROUND: \"{round}\"
"
        )
    };
    for round in ["1", "2", "3"] {
        run_ok(
            &d,
            &["cast", &write(&d, &format!("api{round}.yaml"), &svc(round))],
        );
    }
    let round = |d: &Daemon| run_ok(d, &["exec", "api", "--", "/bin/sh", "-c", "echo $ROUND"]);
    assert_eq!(round(&d), "3\n");
    let out = run_ok(&d, &["rollback", "api", "--to-generation", "1"]);
    assert!(
        out.contains("rolled back to generation 1: env changed (generation 4)"),
        "{out}"
    );
    assert!(out.contains("ready: 1/1"), "{out}");
    assert_eq!(round(&d), "1\n");
    let hist = run_ok(&d, &["get", "svc", "api", "--history"]);
    let gens: Vec<&str> = hist
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(gens, ["4", "3", "2", "1"], "{hist}");
    // Back once more without a generation: the one before the current (3).
    run_ok(&d, &["rollback", "api"]);
    assert_eq!(round(&d), "3\n");
    for (args, want_code, want) in [
        (
            vec!["rollback", "api", "--to-generation", "99"],
            4,
            "generation 99 is not kept",
        ),
        (vec!["rollback", "nope"], 4, "service default/nope not found"),
    ] {
        let o = d.rune(&args);
        assert_eq!(code(&o), want_code, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{want} in {}", stderr(&o));
    }

    // Configmaps keep their versions too.
    for v in ["a", "b", "c"] {
        run_ok(
            &d,
            &[
                "cast",
                &write(
                    &d,
                    &format!("cm{v}.yaml"),
                    &format!("configmap:\n  name: cfg\n  data:\n    mode: {v}\n"),
                ),
            ],
        );
    }
    let h: serde_json::Value = serde_json::from_str(&run_ok(
        &d,
        &["get", "configmap", "cfg", "--history", "-o", "json"],
    ))
    .unwrap();
    let seen: Vec<(u64, &str)> = h
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| {
                    (
                        v["version"].as_u64().unwrap_or(0),
                        v["data"]["mode"].as_str().unwrap_or(""),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(seen, [(3, "c"), (2, "b"), (1, "a")], "{h}");
    run_ok(&d, &["delete", "api"]);
}

#[test]
fn process_services_keep_their_volumes_under_the_volumes_root() {
    let mut d = Daemon::new(&bins());
    let root = d.scratch().join("vols");
    d.extra = vec!["--volumes-root".into(), root.display().to_string()];
    d.restart();
    let mnt = d.scratch().join("mnt");
    let spec = format!(
        "service:
  name: keeper
  scale: 1
  stopGracePeriodSeconds: 1
  process:
    command: /bin/sh
    args: [\"-c\", \"echo run >> {m}/own/log; echo run >> {m}/shared/log; exec sleep 3600\"]
  volumes:
    - name: own
      mountPath: {m}/own
      claimTemplate: {{size: 1Gi}}
    - name: shared
      mountPath: {m}/shared
      claim: common
  initSteps:
    - name: seed
      command: [/bin/sh, -c, \"echo seed >> {m}/own/log; echo step ran as $RUNE_INSTANCE_ID\"]
",
        m = mnt.display()
    );
    let out = run_ok(&d, &["cast", &write(&d, "keeper.yaml", &spec)]);
    assert!(out.contains("ready: 1/1"), "{out}");
    // Lines the runs wrote into the instance's own volume (<root>/<owner>/<ns>/instances/<instance>/<volume>).
    let own = || {
        std::fs::read_to_string(
            std::fs::read_dir(&root)
                .unwrap()
                .flatten()
                .next()
                .unwrap()
                .path()
                .join("default/instances/keeper-0/own/log"),
        )
        .unwrap_or_default()
        .lines()
        .count()
    };
    wait_until(
        LONG,
        "the step and the first run to write into the volume",
        || own() == 2,
    );
    let logs = run_ok(&d, &["logs", "keeper", "--init-step", "seed"]);
    assert!(logs.contains("step ran as keeper-0"), "{logs}");
    // A command run beside the instance sees its volume where the instance does.
    let seen = run_ok(
        &d,
        &[
            "exec",
            "keeper",
            "--",
            "cat",
            &format!("{}/own/log", mnt.display()),
        ],
    );
    assert_eq!(seen, "seed\nrun\n");
    // The mount point on the host stays empty: the volume is bound in the process's namespace.
    assert!(std::fs::read_dir(mnt.join("own")).unwrap().next().is_none());

    run_ok(&d, &["restart", "keeper"]);
    wait_until(LONG, "the second run to find the first's data", || own() == 4);

    let vols: serde_json::Value =
        serde_json::from_str(&run_ok(&d, &["volume", "list", "-o", "json"])).unwrap();
    let names: Vec<(&str, &str, bool)> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or(""),
                v["requestedSize"].as_str().unwrap_or(""),
                v["inUse"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("common", "", true), ("own-keeper-0", "1Gi", true)],
        "{vols}"
    );
    let o = d.rune(&["volume", "delete", "common"]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("in use by keeper-0"), "{}", stderr(&o));

    run_ok(&d, &["delete", "keeper"]);
    wait_until(LONG, "keeper's instance to go", || instances_gone(&d));
    assert_eq!(own(), 4, "the volume outlives its service");
    for v in ["own-keeper-0", "common"] {
        assert!(run_ok(&d, &["volume", "delete", v]).contains("deleted"));
    }
    assert!(run_ok(&d, &["volume", "list", "-o", "json"]).trim() == "[]");
}

/// The limit file of a process's memory group, as the kernel shows it (v1 or v2).
fn memory_limit_of(pid: &str) -> String {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for l in cg.lines() {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (p.next().unwrap(), p.next().unwrap(), p.next().unwrap());
        if ctrls.split(',').any(|c| c == "memory") {
            return std::fs::read_to_string(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
                .unwrap();
        }
        if ctrls.is_empty() {
            if let Ok(v) = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")) {
                return v;
            }
        }
    }
    panic!("no memory group for {pid}: {cg}")
}

#[test]
fn memory_limits_reach_processes_and_containers_and_oom_kills_say_so() {
    image();
    let d = Daemon::start(&bins());
    let limited = "service:
  name: capped
  scale: 1
  stopGracePeriodSeconds: 1
  resources:
    memory: {limit: 48Mi, request: 16Mi}
    cpu: {limit: 500m}
  process:
    command: /bin/sleep
    args: [\"3600\"]
";
    let out = run_ok(&d, &["cast", &write(&d, "capped.yaml", limited)]);
    assert!(out.contains("ready: 1/1"), "{out}");
    let pid = instances(&d, "capped")[0]["runtimeId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(memory_limit_of(&pid).trim(), (48u64 << 20).to_string());
    // ... and a command run beside it is held to the same limits.
    let cg = run_ok(&d, &["exec", "capped", "--", "cat", "/proc/self/cgroup"]);
    assert!(cg.contains("default.capped-0"), "{cg}");

    // Both runtimes: a 64 MiB buffer in a 16 MiB limit is killed, and the reason says why.
    let hog = |name: &str, runtime: &str| {
        format!(
            "service:
  name: {name}
  scale: 1
  resources:
    memory: {{limit: 16Mi}}
{runtime}"
        )
    };
    let process = "  process:\n    command: /bin/busybox\n    args: [dd, if=/dev/zero, of=/dev/null, bs=64M, count=1]\n";
    let container = "  image: busybox\n  command: [dd, if=/dev/zero, of=/dev/null, bs=64M, count=1]\n";
    for (name, runtime) in [("hog-process", process), ("hog-container", container)] {
        run_ok(
            &d,
            &[
                "cast",
                "--detach",
                &write(&d, &format!("{name}.yaml"), &hog(name, runtime)),
            ],
        );
        wait_for_reason(&d, name, "OOM-killed (memory limit reached)");
        run_ok(&d, &["delete", name]);
    }
    run_ok(&d, &["delete", "capped"]);
}

#[test]
fn security_context_reaches_the_engine_and_bad_values_are_named() {
    image();
    let d = Daemon::start(&bins());
    let spec = "service:
  name: tuned
  image: busybox
  scale: 1
  command: [\"sleep\", \"3600\"]
  stopGracePeriodSeconds: 1
  securityContext:
    seccompProfile: {type: Unconfined}
    capAdd: [NET_ADMIN]
    capDrop: [CAP_MKNOD]
  initSteps:
    - name: check
      command: [\"true\"]
      securityContext: {capDrop: [ALL]}
";
    let out = run_ok(&d, &["cast", &write(&d, "tuned.yaml", spec)]);
    assert!(out.contains("ready: 1/1"), "{out}");
    let cid = instances(&d, "tuned")[0]["runtimeId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        docker_inspect(&cid, "{{.HostConfig.SecurityOpt}} {{.HostConfig.CapAdd}} {{.HostConfig.CapDrop}} {{.HostConfig.Privileged}}"),
        "[seccomp=unconfined] [NET_ADMIN] [CAP_MKNOD] false"
    );
    let step = format!(
        "{}-init-check",
        docker_inspect(&cid, "{{.Name}}").trim_start_matches('/')
    );
    assert_eq!(docker_inspect(&step, "{{.HostConfig.CapDrop}}"), "[ALL]");
    run_ok(&d, &["delete", "tuned"]);

    let bad = write(
        &d,
        "bad.yaml",
        "service:
  name: bad
  image: busybox
  imagePull: sometimes
  securityContext:
    seccompProfile: {type: strict, localhostProfile: rel.json}
    capAdd: [net-admin]
",
    );
    let o = d.rune(&["cast", &bad]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    for want in [
        "imagePull: 'sometimes' is not one of missing, always, never",
        "securityContext.seccompProfile.type: 'strict' is not one of default, unconfined, localhost",
        "securityContext.capAdd[0]: 'net-admin' is not a capability name",
    ] {
        assert!(stderr(&o).contains(want), "{want} in:\n{}", stderr(&o));
    }
}
