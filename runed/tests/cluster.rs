//! Three runed processes on one machine form a cluster the way an operator forms one: the
//! first starts with a raft port, `rune admin cluster join-token` mints a token, the others
//! start with `--join` and that token. Writes made on any node land on every node (secrets
//! included: the KEK travels with the grant); the leader is killed with SIGKILL and the other
//! two elect a new one and take writes; the old leader comes back as a follower with
//! everything; a fourth node joins and is removed through a follower; bad tokens and a data
//! dir with a log of its own are refused at start with exit 78. Every node's log replays to
//! the same state digest.

mod common;

use std::time::Duration;

use common::{bins, code, run_ok, write};
use rune_chaos_tests::{free_port, stderr, wait_until, Daemon};
use serde_json::Value;

/// A daemon serving a raft port on loopback; `join` (a member's raft address and a token
/// file) makes it join instead of founding.
fn node(join: Option<(&str, &str)>) -> (Daemon, String) {
    let mut d = Daemon::new(&bins());
    let raft = format!("127.0.0.1:{}", free_port());
    d.extra = vec!["--raft-listen".into(), raft.clone()];
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

    // The leader dies: b and c elect one of themselves and take writes.
    a.sigkill();
    wait_until(Duration::from_secs(10), "a new leader", || {
        [&b, &c]
            .iter()
            .any(|d| matches!(status(d)["leader"].as_u64(), Some(2 | 3)))
    });
    let f = write(&c, "after.yaml", &service("after-failover"));
    run_ok(&c, &["cast", "--detach", &f]);
    assert_eq!(services(&b), ["after-failover", "from-a", "from-b", "from-c"]);

    // a comes back on its data dir as a follower and catches up.
    a.restart();
    wait_until(Duration::from_secs(30), "a to follow with everything", || {
        status(&a)["role"] == "follower" && services(&a).len() == 4
    });

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
    std::fs::remove_dir_all(used.data_dir.join("cluster")).unwrap();
    let why = used.refused_at_start();
    assert!(why.contains("already holds a raft log of its own"), "{why}");

    // Stopped at one index (the followers first: a leader that leaves starts an election and
    // a new term's entry), every member's log replays to the same state.
    let index = settled(&[&a, &b, &c]);
    let mut nodes = [a, b, c];
    nodes.sort_by_key(|d| status(d)["role"] == "leader");
    let mut digests = Vec::new();
    for d in &mut nodes {
        assert_eq!(d.sigterm().code(), Some(0), "{}", d.logs());
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
