//! Three runed processes on one machine form a cluster the way an operator forms one: the
//! first starts with a raft port, `rune admin cluster join-token` mints a token, the others
//! start with `--join` and that token. Writes made on any node land on every node (secrets
//! included: the KEK travels with the grant); the leader is killed with SIGKILL and the other
//! two elect a new one and take writes; the old leader comes back as a follower with
//! everything; a fourth node joins and is removed through a follower; bad tokens and a data
//! dir with a log of its own are refused at start with exit 78. Every node's log replays to
//! the same state digest.
//!
//! Then the same on three "machines": runed in network namespaces of their own, bridged, with
//! eight writers casting through every node while the leader is killed with SIGKILL, again
//! while the leader is cut off by nftables drop rules and then healed, and while a follower
//! cut off is restarted (it starts from its own state and serves it): every acknowledged
//! write is on every node, no term had two leaders (from the nodes' logs), and the logs replay
//! to one state.

mod common;

use std::time::Duration;

use common::{bins, code, run_ok, write};
use rune_chaos_tests::{free_port, stderr, wait_until, waited, Daemon};
use serde_json::Value;

/// A daemon serving a raft port on loopback; `join` (a member's raft address and a token
/// file) makes it join instead of founding.
fn node(join: Option<(&str, &str)>) -> (Daemon, String) {
    let mut d = Daemon::new(&bins());
    let raft = format!("127.0.0.1:{}", free_port());
    // A node silent for 2 s gives its instances to the others (the default is a minute).
    // Three nodes on one loopback: each gateway on a port of its own.
    d.extra = vec![
        "--raft-listen".into(),
        raft.clone(),
        "--gateway-listen".into(),
        "127.0.0.1:0".into(),
        "--node-grace".into(),
        "2s".into(),
    ];
    if let Some((member, token_file)) = join {
        d.extra.extend([
            "--join".into(),
            member.into(),
            "--join-token-file".into(),
            token_file.into(),
        ]);
        // Tokens are the cluster's: the first node's root token works everywhere.
        d.auto_bootstrap = false;
    }
    (d, raft)
}

fn status(d: &Daemon) -> Value {
    serde_json::from_str(&run_ok(d, &["admin", "cluster", "status", "-o", "json"])).unwrap()
}

/// The raft ids of `d`'s voters, as it sees them.
fn voters(d: &Daemon) -> Vec<u64> {
    let s = status(d);
    s["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"] == true)
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

fn service(name: &str) -> String {
    format!("service:\n  name: {name}\n  image: busybox\n  scale: 0\n")
}

/// The names of the services `d` holds, read there.
fn services(d: &Daemon) -> Vec<String> {
    let v: Value = serde_json::from_str(&run_ok(d, &["get", "services", "-o", "json"])).unwrap();
    let list = v.as_array().cloned().unwrap_or_else(|| vec![v]);
    let mut names: Vec<String> = list
        .iter()
        .filter_map(|s| {
            s["name"]
                .as_str()
                .or(s["metadata"]["name"].as_str())
                .map(String::from)
        })
        .collect();
    names.sort();
    names
}

/// Waits until every daemon has applied the same index, and returns it.
fn settled(nodes: &[&Daemon]) -> u64 {
    let mut at = 0;
    wait_until(
        Duration::from_secs(30),
        "the members to apply the same index",
        || {
            let applied: Vec<u64> = nodes
                .iter()
                .map(|d| status(d)["appliedIndex"].as_u64().unwrap())
                .collect();
            at = applied[0];
            applied.iter().all(|a| *a == at)
        },
    );
    at
}

#[test]
fn three_runeds_form_a_cluster_write_anywhere_survive_the_leaders_death_and_take_it_back() {
    let (mut a, a_raft) = node(None);
    a.restart();
    let token_file = a.scratch().join("join-token").display().to_string();
    let o = a.rune(&[
        "admin",
        "cluster",
        "join-token",
        "--ttl",
        "1h",
        "--out-file",
        &token_file,
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("--join {a_raft}")), "{}", stderr(&o));
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(token.starts_with("RJ1."), "{token}");
    // What it holds lets a node join, not anyone use the API.
    let secret = token.trim().rsplit_once('.').unwrap().1.to_string();
    let o = a
        .rune_cmd()
        .env("RUNE_TOKEN", &secret)
        .args(["get", "services"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 3, "a join token used for the API: {}", stderr(&o));
    assert!(stderr(&o).contains("not for the API"), "{}", stderr(&o));

    // b joins through a (the leader), c through b (a follower, which sends it on).
    let (mut b, b_raft) = node(Some((&a_raft, &token_file)));
    b.token = a.token.clone();
    b.restart();
    let (mut c, _c_raft) = node(Some((&b_raft, &token_file)));
    c.token = a.token.clone();
    c.restart();
    wait_until(Duration::from_secs(60), "three voters", || {
        voters(&a) == [1, 2, 3]
    });
    let s = status(&c);
    assert_eq!(
        (s["node"].as_u64(), s["leader"].as_u64()),
        (Some(3), Some(1)),
        "{s}"
    );
    // Any member shows every member as it answers for itself: one leader, one term.
    let members = s["members"].as_array().unwrap().clone();
    assert!(
        members.iter().all(|m| m["term"] == members[0]["term"]
            && m["leader"] == 1
            && m["appliedIndex"].as_u64() > Some(0)),
        "{members:?}"
    );
    assert_eq!(
        members.iter().filter(|m| m["role"] == "leader").count(),
        1,
        "{members:?}"
    );

    // Written anywhere, read everywhere; a secret sealed on one node opens on another.
    for (d, name) in [(&a, "from-a"), (&b, "from-b"), (&c, "from-c")] {
        let f = write(d, &format!("{name}.yaml"), &service(name));
        run_ok(d, &["cast", "--detach", &f]);
    }
    let secret = write(
        &b,
        "secret.yaml",
        "secret:\n  name: db\n  data:\n    password: hunter2-cluster\n",
    );
    run_ok(&b, &["cast", &secret]);
    for d in [&a, &b, &c] {
        assert_eq!(services(d), ["from-a", "from-b", "from-c"]);
    }
    let revealed = run_ok(&c, &["get", "secret", "db", "--show-values", "-o", "json"]);
    assert!(revealed.contains("hunter2-cluster"), "{revealed}");

    // Placed in apply, spread by count: one instance on each node, each run by its own node.
    let spread = write(
        &a,
        "spread.yaml",
        "service:\n  name: spread\n  scale: 3\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"exec sleep 3600\"]\n",
    );
    run_ok(&a, &["cast", "--detach", &spread]);
    let running_on = |d: &Daemon| -> Vec<String> {
        // A follower may not have applied the cast yet: not found is "nothing runs yet".
        let o = d.rune(&["get", "instances", "spread", "-o", "json"]);
        if code(&o) != 0 {
            return Vec::new();
        }
        let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut nodes: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["status"] == "Running")
            .map(|i| i["node"].as_str().unwrap_or_default().to_string())
            .collect();
        nodes.sort();
        nodes
    };
    let mut names = vec![a.node.clone(), b.node.clone(), c.node.clone()];
    names.sort();
    wait_until(
        Duration::from_secs(60),
        "one running instance on each node",
        || running_on(&b) == names,
    );
    // Every member's /metrics shows the placement per node.
    let (_, body) = rune_chaos_tests::http_get(c.metrics, "/metrics").unwrap();
    for n in &names {
        for line in [
            format!("rune_cluster_node_ready{{node=\"{n}\"}} 1"),
            format!("rune_cluster_instances_placed{{node=\"{n}\"}} 1"),
        ] {
            assert!(body.lines().any(|l| l == line), "{line} missing:\n{body}");
        }
    }

    // The leader dies: b and c elect one of themselves and take writes.
    a.sigkill();
    wait_until(Duration::from_secs(10), "a new leader", || {
        [&b, &c]
            .iter()
            .any(|d| matches!(status(d)["leader"].as_u64(), Some(2 | 3)))
    });
    let gone = status(&b)["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 1)
        .cloned()
        .unwrap();
    assert!(gone["error"].is_string() && gone["role"].is_null(), "{gone}");
    let f = write(&c, "after.yaml", &service("after-failover"));
    run_ok(&c, &["cast", "--detach", &f]);
    assert_eq!(
        services(&b),
        ["after-failover", "from-a", "from-b", "from-c", "spread"]
    );
    // a stays away past its grace: its instance is placed on b or c and runs there.
    wait_until(Duration::from_secs(60), "a's instance to run on b or c", || {
        let on = running_on(&b);
        on.len() == 3 && !on.contains(&a.node)
    });

    // a comes back on its data dir as a follower and catches up; the run it left behind
    // (processes outlive runed) is stopped, since its instance now runs elsewhere.
    a.restart();
    wait_until(Duration::from_secs(30), "a to follow with everything", || {
        status(&a)["role"] == "follower" && services(&a).len() == 5
    });
    wait_until(
        Duration::from_secs(30),
        "a to stop the run it no longer owns",
        || a.process_pids().is_empty(),
    );
    assert!(!running_on(&a).contains(&a.node));

    // A fourth node joins, then is removed through a follower.
    let (mut d4, _) = node(Some((&a_raft, &token_file)));
    d4.token = a.token.clone();
    d4.restart();
    wait_until(Duration::from_secs(60), "four voters", || {
        voters(&b) == [1, 2, 3, 4]
    });
    let follower = [&a, &b, &c]
        .into_iter()
        .find(|d| status(d)["role"] == "follower")
        .unwrap();
    let o = follower.rune(&["admin", "cluster", "remove", "4"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(voters(&a), [1, 2, 3]);
    let o = follower.rune(&["admin", "cluster", "remove", "9"]);
    assert_eq!(code(&o), 4, "a stranger's removal is not found: {}", stderr(&o));
    assert!(stderr(&o).contains("node 9 is not a member"), "{}", stderr(&o));
    d4.sigterm();

    // Refused at start, exit 78, naming what is wrong: a token that is no token, one whose
    // secret is wrong, and a data dir that holds a log of its own.
    let (mut bad, _) = node(Some((&a_raft, "/nonexistent/token")));
    assert!(bad
        .refused_at_start()
        .contains("cluster.join-token-file /nonexistent/token"));
    let forged = write(
        &a,
        "forged",
        &format!("{}.rune_wrong\n", token.rsplit_once('.').unwrap().0),
    );
    let (mut bad, _) = node(Some((&a_raft, &forged)));
    let why = bad.refused_at_start();
    assert!(
        why.contains("refused to let this node join") && why.contains("invalid bearer token"),
        "{why}"
    );
    let (mut used, _) = node(None);
    used.restart();
    used.sigterm();
    used.extra.extend([
        "--join".into(),
        a_raft.clone(),
        "--join-token-file".into(),
        token_file.clone(),
    ]);
    // A member's data dir does not start as a single node, which would act as node 1.
    let keep = used.extra.clone();
    used.extra.clear();
    let why = used.refused_at_start();
    assert!(why.contains("belongs to raft node 1 of a cluster"), "{why}");
    used.extra = keep;
    std::fs::remove_dir_all(used.data_dir.join("cluster")).unwrap();
    let why = used.refused_at_start();
    assert!(why.contains("already holds a raft log of its own"), "{why}");
    // A backup from any member, a follower's too, restores into a runed of its own with
    // everything the cluster acknowledged, secrets included (the KEK travelled).
    let leader = status(&a)["leader"].as_u64();
    let follower = [&a, &b, &c]
        .into_iter()
        .find(|d| status(d)["node"].as_u64() != leader)
        .unwrap();
    let file = follower.scratch().join("follower.backup");
    run_ok(follower, &["admin", "backup", "--out", file.to_str().unwrap()]);
    let target = follower.scratch().join("restored");
    let o = std::process::Command::new(&follower.bins.runed)
        .args(["restore", "--from"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&target)
        .arg("--kek-file")
        .arg(follower.data_dir.join("kek.b64"))
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut restored = Daemon::new(&bins());
    restored.data_dir = target;
    restored.auto_bootstrap = false;
    restored.token = a.token.clone();
    restored.restart();
    let names = services(&restored);
    for n in ["from-a", "from-b", "from-c", "spread"] {
        assert!(
            names.iter().any(|x| x == n),
            "{n} missing from the restored state: {names:?}"
        );
    }
    let revealed = run_ok(&restored, &["get", "secret", "db", "--show-values", "-o", "json"]);
    assert!(revealed.contains("hunter2-cluster"), "{revealed}");
    restored.sigterm();
    // Its data dir, where the harness finds the instances to stop, lies in the follower's
    // scratch, which goes with the follower: stop them now (they outlive a stopped runed).
    drop(restored);

    // The KEK lives in a file per member: rotating it on one is refused.
    let kek = write(&a, "new.kek", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n");
    let o = a.rune(&["admin", "rotate-kek", "--new-kek-file", &kek]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("not supported yet"), "{}", stderr(&o));

    // Stopped at one index, every member's log replays to the same state.
    let index = settled(&[&a, &b, &c]);
    stop_at_one_index(vec![a, b, c], index);
}

/// Stops the members so that none applies anything after `index`: the followers together
/// first (a leader that left would start an election and a new term's entry, and a follower
/// left alone with the leader would hear it mark the other one gone), then the leader; then
/// checks that each log replays to the live state, all at `index` and with one digest.
fn stop_at_one_index(mut nodes: Vec<Daemon>, index: u64) {
    nodes.sort_by_key(|d| status(d)["role"] == "leader");
    let (followers, _) = nodes.split_at_mut(2);
    for d in followers.iter() {
        d.send("-TERM");
    }
    for d in followers.iter_mut() {
        assert_eq!(
            d.wait_exit(Duration::from_secs(60)).code(),
            Some(0),
            "{}",
            d.logs()
        );
    }
    assert_eq!(nodes[2].sigterm().code(), Some(0), "{}", nodes[2].logs());
    let mut digests = Vec::new();
    for d in &nodes {
        let data = d.data_dir.display().to_string();
        let v: Value = serde_json::from_str(&run_ok(
            d,
            &["admin", "replay", "--data-dir", &data, "--verify", "-o", "json"],
        ))
        .unwrap();
        assert!(v["first_difference"].is_null(), "{v}");
        assert_eq!(v["index"].as_u64(), Some(index), "{v}");
        digests.push(v["live_digest"].as_str().unwrap().to_string());
    }
    assert!(digests.iter().all(|x| *x == digests[0]), "{digests:?}");
}

/// The bridge's network: node `i` is `10.77.0.<i>`, the hub (where the test runs) `.254`.
const NET: &str = "10.77.0";

/// Moves the calling thread into a network namespace (children it spawns follow).
fn enter(path: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns(2) on a namespace file descriptor we own; it changes only this thread's
    // network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

fn sh(args: &[&str]) {
    let o = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Three machines on one switch: a namespace per node with `eth0` on a bridge in a hub
/// namespace, where the test itself runs as a client on that network. Dropping it brings the
/// thread home and deletes the namespaces (their links go with them).
struct Net {
    hub: String,
    nodes: [String; 3],
    home: std::fs::File,
}

impl Net {
    fn new() -> Net {
        let tag = format!("rc{}", std::process::id() % 100_000);
        let net = Net {
            hub: format!("{tag}h"),
            nodes: [1, 2, 3].map(|i| format!("{tag}n{i}")),
            home: std::fs::File::open("/proc/thread-self/ns/net").unwrap(),
        };
        let hub = net.hub.as_str();
        for n in std::iter::once(hub).chain(net.nodes.iter().map(String::as_str)) {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", hub, "link", "add", "br0", "type", "bridge"]);
        sh(&[
            "ip",
            "-n",
            hub,
            "addr",
            "add",
            &format!("{NET}.254/24"),
            "dev",
            "br0",
        ]);
        sh(&["ip", "-n", hub, "link", "set", "br0", "up"]);
        for (i, n) in net.nodes.iter().enumerate() {
            let port = format!("v{}", i + 1);
            sh(&[
                "ip", "link", "add", &port, "netns", hub, "type", "veth", "peer", "name", "eth0", "netns", n,
            ]);
            sh(&["ip", "-n", hub, "link", "set", &port, "master", "br0", "up"]);
            sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{NET}.{}/24", i + 1),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", n, "link", "set", "eth0", "up"]);
            // A host has a route for everything; VIPs need one for its own traffic to them.
            sh(&[
                "ip",
                "-n",
                n,
                "route",
                "add",
                "default",
                "via",
                &format!("{NET}.254"),
            ]);
        }
        net.enter_hub();
        net
    }

    fn enter_hub(&self) {
        enter(&format!("/var/run/netns/{}", self.hub));
    }

    /// Runs `nft ARGS` in node `i`'s namespace.
    fn nft(&self, i: usize, args: &[&str]) {
        let mut cmd = vec!["ip", "netns", "exec", &self.nodes[i], "nft"];
        cmd.extend_from_slice(args);
        sh(&cmd);
    }

    /// Drops everything node `i` sends or receives on its network, in nftables.
    fn cut(&self, i: usize) {
        let rules = "table inet rune_test_cut {\n chain in { type filter hook input priority -300; iifname \"eth0\" drop; }\n chain out { type filter hook output priority -300; oifname \"eth0\" drop; }\n}\n";
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), rules).unwrap();
        self.nft(i, &["-f", &f.path().display().to_string()]);
    }

    fn heal(&self, i: usize) {
        self.nft(i, &["delete", "table", "inet", "rune_test_cut"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as in `enter`, with the descriptor of the namespace the thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        for n in std::iter::once(&self.hub).chain(&self.nodes) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

/// Node `i` (1-based) in its namespace: gRPC, HTTP, raft and the gateway (its default port)
/// on its address on the bridge; nftables redirects VIPs in its namespace, as on a machine.
fn machine(net: &Net, i: usize, join: Option<&str>) -> Daemon {
    let mut d = Daemon::new(&bins());
    let ip: std::net::IpAddr = format!("{NET}.{i}").parse().unwrap();
    d.netns = Some(net.nodes[i - 1].clone());
    d.nftables = true;
    d.grpc = (ip, 7863).into();
    d.http = (ip, 7861).into();
    // Every machine is an edge: its ingress reaches the instances of every node too.
    d.extra = vec![
        "--raft-listen".into(),
        format!("{ip}:7862"),
        "--node-role".into(),
        "edge".into(),
    ];
    if let Some(token_file) = join {
        d.extra.extend([
            "--join".into(),
            format!("{NET}.1:7862"),
            "--join-token-file".into(),
            token_file.into(),
        ]);
        d.auto_bootstrap = false;
    }
    d
}

/// Where a writer sends its casts: a node's API, with the cluster's token.
#[derive(Clone)]
struct Target {
    grpc: String,
    token: String,
}

/// Casts services `w<t>-<n>` round the nodes until `stop`, each bounded by 20 s; returns
/// the names acknowledged (exit 0), counting them in `acked` as it goes.
fn writer(
    net_hub: String,
    t: usize,
    targets: Vec<Target>,
    dir: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<String> {
    use std::sync::atomic::Ordering;
    enter(&format!("/var/run/netns/{net_hub}"));
    let mut mine = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let name = format!("w{t}-{n}");
        let target = &targets[(t + n) % targets.len()];
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, service(&name)).unwrap();
        let o = std::process::Command::new("timeout")
            .args(["20", env!("CARGO_BIN_EXE_rune"), "cast", "--detach"])
            .arg(&file)
            .env("RUNE_API_SERVER", &target.grpc)
            .env("RUNE_TOKEN", &target.token)
            .env("RUNE_CLI_CONFIG", dir.join(format!("cli-{t}.yaml")))
            .env_remove("RUNE_ADMIN_SOCKET")
            .output()
            .unwrap();
        if o.status.success() {
            mine.push(name);
            acked.fetch_add(1, Ordering::SeqCst);
        }
        n += 1;
    }
    mine
}

/// The leader each node saw in each term, from its log lines: no term may have two.
fn leaders_by_term(nodes: &[&Daemon]) -> std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> {
    let mut seen: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> = Default::default();
    for d in nodes {
        for line in d.logs().lines().filter(|l| l.contains("raft leader changed")) {
            let field = |k: &str| -> u64 {
                let at = line.find(&format!("{k}=")).unwrap() + k.len() + 1;
                line[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            seen.entry(field("term")).or_default().insert(field("leader"));
        }
    }
    seen
}

/// The position in `nodes` of the one they agree leads, once they do.
fn agreed_leader(nodes: &[&Daemon]) -> usize {
    let mut at = 0;
    wait_until(Duration::from_secs(15), "the nodes to agree on a leader", || {
        let leaders: Vec<Option<u64>> = nodes.iter().map(|d| status(d)["leader"].as_u64()).collect();
        let Some(l) = leaders[0].filter(|l| leaders.iter().all(|x| *x == Some(*l))) else {
            return false;
        };
        match nodes.iter().position(|d| status(d)["node"].as_u64() == Some(l)) {
            Some(i) => {
                at = i;
                true
            }
            None => false,
        }
    });
    at
}

/// On a panic, prints the end of each node's log and the nftables table it holds, so that a
/// failure seen once in a while (a node not reaching every instance by the VIP, twice in many
/// runs, not reproduced on demand) says why when it happens.
struct ShowOnPanic<'a> {
    net: &'a Net,
    nodes: &'a [Daemon],
}

impl Drop for ShowOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, (ns, d)) in self.net.nodes.iter().zip(self.nodes).enumerate() {
            let logs = d.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let tail = lines[lines.len().saturating_sub(300)..].join("\n");
            let table = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "nft", "list", "table", "inet", "rune"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            eprintln!(
                "--- node {} log, last 300 lines:\n{tail}\n--- node {} nftables:\n{table}",
                i + 1,
                i + 1
            );
        }
    }
}

/// A process service at scale 3 runs one instance per machine, each answering with its own
/// id on its node's loopback; from every machine its VIP, and its exposed host at the
/// machine's ingress, reach all three (two of them through the other nodes' gateways), and
/// each gateway counts what it carried. A stranger on the network gets nothing from a gateway.
fn one_vip_reaches_every_node(net: &Net, nodes: &[Daemon]) {
    let _show = ShowOnPanic { net, nodes };
    let www = nodes[0].scratch().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let spec = format!(
        "service:\n  name: hello\n  scale: 3\n  process:\n    command: /bin/sh\n    args: [\"-c\", \"d={www}/$RUNE_INSTANCE_ID; mkdir -p $d; echo $RUNE_INSTANCE_ID > $d/index.html; exec busybox httpd -f -p 127.0.0.1:8080 -h $d\"]\n  ports:\n    - name: http\n      port: 80\n      targetPort: 8080\n  expose:\n    port: http\n    host: hello.test\n",
        www = www.display()
    );
    let f = write(&nodes[0], "hello.yaml", &spec);
    run_ok(&nodes[0], &["cast", &f, "--detach"]);
    let v: Value =
        serde_json::from_str(&run_ok(&nodes[0], &["get", "services", "hello", "-o", "json"])).unwrap();
    let url = format!("http://{}/", v["vip"].as_str().unwrap());
    let all: std::collections::BTreeSet<String> = (0..3).map(|i| format!("hello-{i}")).collect();
    for (i, n) in net.nodes.iter().enumerate() {
        let edge = format!("http://{}/", nodes[i].ingress.0);
        for (how, args) in [
            ("the VIP", vec![url.as_str()]),
            ("the ingress", vec!["-H", "Host: hello.test", edge.as_str()]),
        ] {
            // Every answer seen, errors included, so that a timeout says what came instead.
            let mut seen = std::collections::BTreeSet::new();
            let reached = waited(Duration::from_secs(60), || {
                let o = std::process::Command::new("ip")
                    .args(["netns", "exec", n, "curl", "-sS", "-m", "3"])
                    .args(&args)
                    .output()
                    .unwrap();
                let answer = String::from_utf8_lossy(&o.stdout).trim().to_string();
                seen.insert(if answer.is_empty() {
                    format!("(curl: {})", String::from_utf8_lossy(&o.stderr).trim())
                } else {
                    answer
                });
                all.is_subset(&seen)
            });
            assert!(
                reached,
                "timed out after 60s waiting for node {} to reach all three instances by {how}; answers seen: {seen:?}",
                i + 1
            );
        }
    }
    for (i, n) in net.nodes.iter().enumerate() {
        let metrics = format!("http://{}/metrics", nodes[i].metrics);
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", n, "curl", "-sS", "-m", "3", &metrics])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let carried: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("rune_dataplane_connections_total{")
                    && l.contains("result=\"from_node\"")
                    && l.contains("service=\"hello\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(
            carried >= 1.0,
            "node {}'s gateway carried nothing:\n{text}",
            i + 1
        );
    }
    // Asked without the cluster's key, a gateway answers nothing: from the hub (the test's
    // own namespace, no node's address), and from node 2's own address, as a container there
    // whose traffic leaves node 2 masqueraded would ask. Both are counted on node 1.
    let ask = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((format!("{NET}.1").as_str(), 7864)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let body = format!("{} default hello hello-0 80", "00".repeat(32));
        let mut req = b"RGW1".to_vec();
        req.extend_from_slice(&(body.len() as u16).to_be_bytes());
        req.extend_from_slice(body.as_bytes());
        let _ = s.write_all(&req);
        let mut answer = [0u8; 1];
        !matches!(s.read(&mut answer), Ok(1))
    };
    assert!(ask(), "a stranger on the network got an answer from a gateway");
    let node2 = format!("/var/run/netns/{}", net.nodes[1]);
    let from_node2 = std::thread::spawn(move || {
        enter(&node2);
        ask()
    });
    assert!(
        from_node2.join().unwrap(),
        "a process on node 2 without the key got an answer from node 1's gateway"
    );
    let o = std::process::Command::new("ip")
        .args(["netns", "exec", &net.nodes[0], "curl", "-sS", "-m", "3"])
        .arg(format!("http://{}/metrics", nodes[0].metrics))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines().any(|l| l
            .strip_prefix("rune_dataplane_gateway_refused_total")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|n| n >= 2.0)),
        "the strangers were not counted:\n{text}"
    );
}

#[test]
fn three_machines_keep_every_acknowledged_write_through_a_killed_and_a_cut_off_leader() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let net = Net::new();
    let mut nodes = vec![machine(&net, 1, None)];
    nodes[0].restart();
    let token = nodes[0].token.clone().unwrap();
    let token_file = nodes[0].scratch().join("join").display().to_string();
    run_ok(
        &nodes[0],
        &["admin", "cluster", "join-token", "--out-file", &token_file],
    );
    for i in [2, 3] {
        let mut d = machine(&net, i, Some(&token_file));
        d.token = Some(token.clone());
        d.restart();
        nodes.push(d);
    }
    wait_until(Duration::from_secs(60), "three voters", || {
        voters(&nodes[0]) == [1, 2, 3]
    });
    one_vip_reaches_every_node(&net, &nodes);

    let targets: Vec<Target> = nodes
        .iter()
        .map(|d| Target {
            grpc: d.grpc.to_string(),
            token: token.clone(),
        })
        .collect();
    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let dir = tempfile::tempdir().unwrap();
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let (hub, targets, dir, stop, acked) = (
                net.hub.clone(),
                targets.clone(),
                dir.path().to_path_buf(),
                stop.clone(),
                acked.clone(),
            );
            std::thread::spawn(move || writer(hub, t, targets, dir, stop, acked))
        })
        .collect();
    let more = |n: usize, what: &str| {
        let from = acked.load(Ordering::SeqCst);
        wait_until(Duration::from_secs(60), what, || {
            acked.load(Ordering::SeqCst) >= from + n
        });
    };
    more(20, "writes before any fault");

    // SIGKILL the leader; the other two elect one and writes go on; it comes back.
    let l = agreed_leader(&nodes.iter().collect::<Vec<_>>());
    nodes[l].sigkill();
    let others: Vec<&Daemon> = (0..3).filter(|i| *i != l).map(|i| &nodes[i]).collect();
    agreed_leader(&others);
    more(20, "writes after the leader was killed");
    nodes[l].restart();
    more(10, "writes after the old leader came back");

    // Cut the leader off in nftables: the majority elects another and writes go on; healed,
    // the old leader follows the new term.
    let l = agreed_leader(&nodes.iter().collect::<Vec<_>>());
    net.cut(l);
    let others: Vec<&Daemon> = (0..3).filter(|i| *i != l).map(|i| &nodes[i]).collect();
    let new = agreed_leader(&others);
    more(20, "writes while the old leader is cut off");
    net.heal(l);
    wait_until(
        Duration::from_secs(30),
        "the cut-off leader to follow again",
        || status(&nodes[l])["leader"].as_u64() == status(others[new])["node"].as_u64(),
    );
    more(10, "writes after healing");

    // A follower cut off and restarted meanwhile starts from its own state and serves it (its
    // API answers, /healthz says why it is not ready) rather than wait for a quorum it cannot
    // reach; healed, it follows again.
    let l = agreed_leader(&nodes.iter().collect::<Vec<_>>());
    let f = (0..3).find(|i| *i != l).unwrap();
    net.cut(f);
    nodes[f].sigkill();
    let starts = nodes[f].logs().matches("runed is ready").count();
    nodes[f].spawn();
    wait_until(Duration::from_secs(60), "the cut-off follower to start", || {
        nodes[f].logs().matches("runed is ready").count() > starts
    });
    assert!(
        services(&nodes[f]).len() >= 20,
        "the cut-off follower serves its state"
    );
    // It may take the leader it remembers at its word until that one's lease runs out.
    let healthz = format!("http://{}/healthz", nodes[f].http);
    wait_until(
        Duration::from_secs(30),
        "the cut-off follower to say it has no leader",
        || {
            let o = std::process::Command::new("ip")
                .args(["netns", "exec", &net.nodes[f], "curl", "-s", "-m", "3", &healthz])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).contains("no leader known")
        },
    );
    assert!(nodes[f].running(), "the cut-off follower keeps running");
    net.heal(f);
    let http = nodes[f].http;
    wait_until(Duration::from_secs(60), "the healed follower to be ready", || {
        rune_chaos_tests::http_get(http, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    more(5, "writes after the follower came back");
    stop.store(true, Ordering::SeqCst);
    let acknowledged: Vec<String> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();

    // Every acknowledged write is on every node; no term had two leaders; the logs replay to
    // one state.
    let all: Vec<&Daemon> = nodes.iter().collect();
    let index = settled(&all);
    for d in &all {
        let held: std::collections::BTreeSet<String> = services(d).into_iter().collect();
        let lost: Vec<&String> = acknowledged.iter().filter(|n| !held.contains(*n)).collect();
        assert!(lost.is_empty(), "node lost acknowledged writes: {lost:?}");
    }
    let terms = leaders_by_term(&all);
    assert!(terms.len() >= 3, "two elections after the first: {terms:?}");
    for (term, leaders) in &terms {
        assert_eq!(leaders.len(), 1, "term {term} had leaders {leaders:?}");
    }
    stop_at_one_index(nodes, index);
    eprintln!(
        "{} writes acknowledged through a kill and a partition",
        acknowledged.len()
    );
}
