//! The kernel half of the data plane with real packets: runed runs in a network namespace this
//! test creates (so its nftables table is the only one it can touch), two client namespaces
//! reach it over veth pairs, and policy decides by their addresses. Allowed traffic passes
//! through the VIP, denied traffic is dropped by the kernel and counted, a policy change takes
//! effect without a restart while an established connection keeps flowing, and every
//! namespace (with its table) is gone afterwards.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

use common::{bins, code, failpoint, fall_behind, run_ok, write};
use rune_chaos_tests::{free_port, http_get, stdout, wait_until, waited, Daemon};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run a command")
}

fn ok(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Moves the calling thread into a network namespace (children it spawns follow).
fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns(2) on a namespace file descriptor we own; it changes only this thread's
    // network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Three namespaces: the server (runed) and clients `a` and `b` on their own /24s. Dropping it
/// brings the thread home and deletes the namespaces.
struct Lab {
    names: [String; 3],
    home: File,
}

impl Lab {
    fn new() -> Lab {
        // Tests of this file run at once: each lab its own names (a lab deletes its own).
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("rk{}{n}", std::process::id() % 100_000);
        let names = [format!("{tag}s"), format!("{tag}a"), format!("{tag}b")];
        let home = File::open("/proc/thread-self/ns/net").expect("own netns");
        let lab = Lab { names, home };
        let [s, a, b] = &lab.names;
        for n in &lab.names {
            ok(&["ip", "netns", "add", n]);
            ok(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        for (i, c) in [(1, a), (2, b)] {
            let (srv_if, cli_if) = (format!("{c}0"), format!("{c}1"));
            ok(&[
                "ip", "link", "add", &srv_if, "netns", s, "type", "veth", "peer", "name", &cli_if, "netns", c,
            ]);
            ok(&[
                "ip",
                "-n",
                s,
                "addr",
                "add",
                &format!("10.250.{i}.1/24"),
                "dev",
                &srv_if,
            ]);
            ok(&["ip", "-n", s, "link", "set", &srv_if, "up"]);
            ok(&[
                "ip",
                "-n",
                c,
                "addr",
                "add",
                &format!("10.250.{i}.2/24"),
                "dev",
                &cli_if,
            ]);
            ok(&["ip", "-n", c, "link", "set", &cli_if, "up"]);
            ok(&[
                "ip",
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &format!("10.250.{i}.1"),
            ]);
        }
        // A host has a route for everything; VIPs need one for the host's own traffic to them.
        ok(&["ip", "-n", s, "route", "add", "default", "via", "10.250.1.2"]);
        enter(&format!("/var/run/netns/{s}"));
        lab
    }

    fn exec(&self, client: usize, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.names[client]];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SAFETY: as in `enter`, with the descriptor of the namespace the thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        for n in &self.names {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

fn web_spec(www: &str, port: u16, cidrs: &[&str]) -> String {
    let peers: String = cidrs
        .iter()
        .map(|c| format!("            - cidr: {c}\n"))
        .collect();
    format!(
        "services:\n  - name: web\n    process:\n      command: busybox\n      args: [\"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \"-h\", \"{www}\"]\n    scale: 1\n    ports:\n      - name: http\n        port: 80\n        targetPort: {port}\n    networkPolicy:\n      ingress:\n        - from:\n{peers}          ports: [\"80/tcp\"]\n"
    )
}

fn echo_spec(port: u16, extra: &str) -> String {
    format!(
        "services:\n  - name: echo\n    process:\n      command: busybox\n      args: [\"nc\", \"-ll\", \"-p\", \"{port}\", \"-e\", \"/bin/cat\"]\n    scale: 1\n    ports:\n      - name: tcp\n        port: 7\n        targetPort: {port}\n    networkPolicy:\n      ingress:\n        - from:\n            - cidr: 10.250.1.0/24\n{extra}"
    )
}

fn kernel_drops(d: &Daemon) -> f64 {
    http_get(d.metrics, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("rune_policy_drops_total{")
                && l.contains("reason=\"kernel\"")
                && l.contains("service=\"web\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn nftables_enforce_policy_on_real_packets() {
    assert!(
        sh(&["nft", "--version"]).status.success(),
        "nft is missing: install Debian's nftables (scripts/test.sh does)"
    );
    let lab = Lab::new();
    let mut d = Daemon::new(&bins());
    d.nftables = true;
    d.restart();
    let status = run_ok(&d, &["policy", "status"]);
    assert!(
        status.contains("kernel enforcement: on: nftables table inet rune"),
        "{status}"
    );

    let www = d.scratch().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello-web\n").unwrap();
    let (web_port, echo_port) = (free_port(), free_port());
    let w = www.display().to_string();
    let f = write(&d, "web.yaml", &web_spec(&w, web_port, &["10.250.1.0/24"]));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let f = write(&d, "echo.yaml", &echo_spec(echo_port, ""));
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let vip = |name: &str| {
        let v: Value = serde_json::from_str(&run_ok(&d, &["get", "services", name, "-o", "json"])).unwrap();
        v["vip"].as_str().unwrap().to_string()
    };
    let (web, echo) = (vip("web"), vip("echo"));
    let table = stdout(&sh(&["nft", "list", "table", "inet", "rune"]));
    assert!(
        table.contains(&format!("{web} . 80 :")),
        "VIP redirect missing:\n{table}"
    );

    // Allowed: a's network, through the VIP, to the process behind the proxy.
    let url = format!("http://{web}/");
    wait_until(LONG, "a to reach web through its VIP", || {
        stdout(&lab.exec(1, &["curl", "-sS", "-m", "5", &url])).contains("hello-web")
    });
    // Denied: b's SYNs are dropped in the kernel (a timeout, not a refusal) and counted.
    let o = lab.exec(2, &["curl", "-sS", "-m", "2", &url]);
    assert_eq!(
        code(&o),
        28,
        "expected a timeout: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    wait_until(LONG, "the kernel drop to be counted", || kernel_drops(&d) >= 1.0);
    let counted = kernel_drops(&d);
    // The proxy port is no way around the VIP from outside.
    let proxy = format!("http://10.250.2.1:{}/", {
        let v: Value = serde_json::from_str(&run_ok(&d, &["get", "services", "web", "-o", "json"])).unwrap();
        v["proxyPorts"][0]["address"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_string()
    });
    assert_eq!(code(&lab.exec(2, &["curl", "-sS", "-m", "2", &proxy])), 28);

    // An established connection from a, held across the policy change.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (res_tx, res_rx) = mpsc::channel::<(String, String)>();
    let a_ns = format!("/var/run/netns/{}", lab.names[1]);
    let echo_addr = format!("{echo}:7");
    let holder = std::thread::spawn(move || {
        enter(&a_ns);
        let mut first = String::new();
        let mut conn = None;
        wait_until(LONG, "echo to answer a", || {
            let Ok(s) = TcpStream::connect_timeout(&echo_addr.parse().unwrap(), Duration::from_secs(3))
            else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            first.clear();
            if (&s).write_all(b"one\n").is_ok() && r.read_line(&mut first).is_ok() && first == "one\n" {
                conn = Some((s, r));
                return true;
            }
            false
        });
        let (mut s, mut r) = conn.unwrap();
        res_tx.send(("held".into(), first.clone())).unwrap();
        go_rx.recv().unwrap();
        let mut second = String::new();
        let _ = s.write_all(b"two\n");
        let _ = r.read_line(&mut second);
        res_tx.send((first, second)).unwrap();
    });
    assert_eq!(res_rx.recv_timeout(LONG).unwrap().1, "one\n");

    // One cast changes both policies; runed keeps running, b gets in, the held flow goes on.
    let pid = d.pid();
    let f = write(
        &d,
        "web.yaml",
        &web_spec(&w, web_port, &["10.250.1.0/24", "10.250.2.0/24"]),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let f = write(
        &d,
        "echo.yaml",
        &echo_spec(
            echo_port,
            "        - from:\n            - cidr: 10.250.2.0/24\n          ports: [tcp]\n",
        ),
    );
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    wait_until(LONG, "b to reach web after the change", || {
        stdout(&lab.exec(2, &["curl", "-sS", "-m", "2", &url])).contains("hello-web")
    });
    assert!(d.running() && d.pid() == pid, "no restart");
    // The rewritten chain keeps the drops counted under it.
    assert!(
        kernel_drops(&d) >= counted,
        "kernel drops went back after the policy change"
    );
    go_tx.send(()).unwrap();
    let (_, second) = res_rx.recv_timeout(LONG).unwrap();
    holder.join().unwrap();
    assert_eq!(second, "two\n", "the established connection kept flowing");

    // Gone with the namespace: runed, its table and every namespace of the test.
    let names = lab.names.clone();
    drop(d);
    drop(lab);
    let list = stdout(&sh(&["ip", "netns", "list"]));
    for n in names {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n.as_str())),
            "{n} left behind:\n{list}"
        );
    }
}

#[test]
fn missing_nft_is_said_and_the_proxy_still_enforces() {
    let mut d = Daemon::new(&bins());
    d.nftables = true;
    // No libnftables where runed looks for it.
    d.env
        .push(("RUNE_LIBNFTABLES".into(), "/nonexistent/libnftables.so.1".into()));
    d.restart();
    let status = run_ok(&d, &["policy", "status"]);
    assert!(
        status.contains("kernel enforcement: off: nftables is missing (install Debian's nftables)"),
        "{status}"
    );
    let metrics = http_get(d.metrics, "/metrics").unwrap().1;
    assert!(
        metrics.contains("rune_dataplane_kernel_enforcement 0"),
        "{metrics}"
    );
    assert!(
        d.logs().contains("kernel policy enforcement is off"),
        "{}",
        d.logs()
    );
    // With no table to shield them, the proxy ports stay on loopback.
    let f = write(
        &d,
        "quiet.yaml",
        "service:\n  name: quiet\n  process:\n    command: /bin/sleep\n    args: [\"1000\"]\n  ports:\n    - name: p\n      port: 9\n",
    );
    run_ok(&d, &["cast", &f, "--detach"]);
    let v: Value = serde_json::from_str(&run_ok(&d, &["get", "services", "quiet", "-o", "json"])).unwrap();
    let addr = v["proxyPorts"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{v}");
    // Nothing redirects its VIP, so its name is not handed out: SERVFAIL, and the status says why.
    assert!(status.contains("the DNS does not answer their names"), "{status}");
    let answer = dig_a(&d, "quiet.default.rune");
    assert!(answer.contains("status: SERVFAIL"), "{answer}");
}

/// Holds runed's table as another program's until dropped: `nft -i` replaces it with one of
/// `flags owner`, which only the holder's netlink socket may change, so the kernel refuses
/// runed's loads (EPERM) and deletes the table when the holder exits.
struct Owner(std::process::Child);

impl Owner {
    fn take(table: &str) -> Owner {
        let mut child = Command::new("nft")
            .arg("-i")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nft -i");
        let stdin = child.stdin.as_mut().expect("nft's stdin");
        write!(
            stdin,
            "delete table inet {table}\nadd table inet {table} {{ flags owner; }}\n"
        )
        .and_then(|()| stdin.flush())
        .expect("write to nft -i");
        Owner(child)
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dig`'s status and answer for `name` from runed's DNS.
fn dig_a(d: &Daemon, name: &str) -> String {
    let o = Command::new("dig")
        .arg(format!("@{}", d.dns.ip()))
        .args(["-p", &d.dns.port().to_string(), name, "+time=2", "+tries=1"])
        .output()
        .expect("dig");
    stdout(&o)
}

/// The kernel keeps the last table it took when a load fails, so runed tries again, with no
/// change to the state needed: here the table was held by another program (its loads refused),
/// and once that program is gone runed loads the view it could not load before, and the DNS
/// answers the name that was cast meanwhile.
#[test]
fn a_refused_load_is_tried_again_without_a_change() {
    let _lab = Lab::new();
    let mut d = Daemon::new(&bins());
    d.nftables = true;
    d.restart();
    let status = || run_ok(&d, &["policy", "status"]);
    wait_until(LONG, "the kernel to enforce", || {
        status().contains("kernel enforcement: on")
    });
    let table = || stdout(&sh(&["nft", "list", "table", "inet", "rune"]));
    let holder = Owner::take("rune");
    wait_until(LONG, "the table to be another program's", || {
        table().contains("flags owner")
    });

    let f = write(
        &d,
        "quiet.yaml",
        "service:\n  name: quiet\n  process:\n    command: /bin/sleep\n    args: [\"1000\"]\n  ports:\n    - name: p\n      port: 9\n",
    );
    run_ok(&d, &["cast", &f, "--detach"]);
    wait_until(LONG, "the load to be refused", || {
        status().contains("kernel enforcement: off: no permission to program nftables")
    });
    let v: Value = serde_json::from_str(&run_ok(&d, &["get", "services", "quiet", "-o", "json"])).unwrap();
    let vip = v["vip"].as_str().unwrap().to_string();
    // Not redirected, so not handed out.
    assert!(dig_a(&d, "quiet.default.rune").contains("status: SERVFAIL"));

    // The holder gone, its table with it; nothing is cast, yet the table comes back whole.
    drop(holder);
    let mut last = String::new();
    let loaded = waited(LONG, || {
        last = table();
        // In `vip_ports` once ready, in `refused` until then: redirected either way.
        last.contains(&format!("{vip} . 9"))
    });
    assert!(
        loaded,
        "runed did not load its table again:\n{last}\n{}",
        d.logs()
    );
    wait_until(LONG, "the kernel to enforce again", || {
        status().contains("kernel enforcement: on")
    });
    wait_until(LONG, "the DNS to answer quiet", || {
        dig_a(&d, "quiet.default.rune").contains(&vip)
    });
    let loads = d.logs().matches("the kernel enforces policy").count();
    assert!(loads >= 2, "one load at start, one after the refusal: {loads}");
}

/// `rune policy status`'s count of VIP ports the kernel forwards itself, from `from`
/// (`fromContainers` or `fromHost`).
fn kernel_forwarded(d: &Daemon, from: &str) -> u64 {
    let v: Value = serde_json::from_str(&run_ok(d, &["policy", "status", "-o", "json"])).unwrap();
    v["kernelForwarded"][from].as_u64().unwrap_or(u64::MAX)
}

/// The connections the proxy counted for `service` with `result`.
fn proxied(d: &Daemon, service: &str, result: &str) -> f64 {
    let want = format!(
        "rune_dataplane_connections_total{{namespace=\"default\",result=\"{result}\",service=\"{service}\"}}"
    );
    http_get(d.metrics, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&want))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A service without a policy whose endpoint runs on this node: this host's own connections
/// to its VIP are forwarded by the kernel (the proxy never sees them), a client namespace's
/// go through the proxy (a loopback endpoint is no place for them), and once the view is past
/// its stale budget the kernel hands the VIP back to the proxy, which refuses new
/// connections until the view catches up.
#[test]
fn the_kernel_forwards_to_local_endpoints_and_fails_closed_when_stale() {
    let lab = Lab::new();
    let mut d = Daemon::new(&bins());
    d.nftables = true;
    d.extra = vec!["--enable-failpoints".into(), "--stale-budget".into(), "1s".into()];
    d.restart();
    let www = d.scratch().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello-plain\n").unwrap();
    let port = free_port();
    let spec = format!(
        "services:\n  - name: plain\n    process:\n      command: busybox\n      args: [\"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \"-h\", \"{}\"]\n    scale: 1\n    ports:\n      - name: http\n        port: 80\n        targetPort: {port}\n    health:\n      readiness: {{type: tcp, port: {port}, intervalSeconds: 1}}\n",
        www.display()
    );
    let f = write(&d, "plain.yaml", &spec);
    run_ok(&d, &["cast", &f, "--timeout", "60s"]);
    let v: Value = serde_json::from_str(&run_ok(&d, &["get", "services", "plain", "-o", "json"])).unwrap();
    let vip = v["vip"].as_str().unwrap().to_string();
    let url = format!("http://{vip}/");
    let fast_out = || stdout(&sh(&["nft", "list", "map", "inet", "rune", "fast_out"]));
    wait_until(LONG, "the kernel to forward the VIP", || {
        fast_out().contains(&format!("{vip} . 80 : goto lb_1"))
    });
    // This host's connections: answered, and none of them met the proxy.
    let here = || stdout(&sh(&["curl", "-sS", "-m", "5", &url])).contains("hello-plain");
    wait_until(LONG, "this host to reach plain through its VIP", here);
    for _ in 0..5 {
        assert!(here(), "this host through the kernel");
    }
    assert_eq!(proxied(&d, "plain", "forwarded"), 0.0, "the proxy carried none");
    // Recorded just after the load the listing above saw; a loopback endpoint is not one
    // for containers.
    wait_until(LONG, "policy status to count the host's forwarded port", || {
        kernel_forwarded(&d, "fromHost") == 1
    });
    assert_eq!(kernel_forwarded(&d, "fromContainers"), 0);
    // A client namespace's: through the proxy, which counts it.
    wait_until(LONG, "a to reach plain through the proxy", || {
        stdout(&lab.exec(1, &["curl", "-sS", "-m", "5", &url])).contains("hello-plain")
    });
    assert!(proxied(&d, "plain", "forwarded") >= 1.0);

    // Stale: the tail paused, the log moves on; the VIP goes back to the proxy, which resets.
    fall_behind(&d, "dataplane");
    wait_until(LONG, "the VIP to be handed back to the proxy", || {
        !fast_out().contains(&vip)
    });
    // Recorded just after the load the listing above saw.
    wait_until(LONG, "policy status to count none while stale", || {
        kernel_forwarded(&d, "fromHost") == 0
    });
    wait_until(LONG, "new connections to be refused while stale", || !here());
    assert!(
        proxied(&d, "plain", "stale") >= 1.0,
        "the proxy refused it as stale"
    );
    failpoint(&d, "dataplane-tail-pause", false);
    wait_until(LONG, "the kernel to forward again once caught up", || {
        fast_out().contains(&vip) && here()
    });
}

/// Deletes a table from this host's namespace when dropped: runed keeps its table when it
/// stops, so the kernel goes on enforcing across a restart.
struct HostTable(String);

impl Drop for HostTable {
    fn drop(&mut self) {
        let _ = sh(&["nft", "delete", "table", "inet", &self.0]);
    }
}

/// Real containers on the Docker Engine's own bridge, what the namespace tests above cannot
/// show (the engine's bridge and its FORWARD rules between client and endpoint): runed runs in
/// this host's namespace, with a table named for this test (deleted after, with the
/// containers). A container's connections to a VIP whose endpoints are containers of this
/// node are forwarded by the kernel to both of them and the proxy carries none; a container
/// the policy does not allow is dropped by the kernel and counted.
#[test]
fn the_kernel_forwards_between_docker_containers() {
    common::image();
    let table = format!("rune_d{}", std::process::id());
    // Declared before the daemon, so dropped after it: runed is gone when the table goes.
    let _table = HostTable(table.clone());
    let mut d = Daemon::new(&bins());
    d.nftables = true;
    d.extra = vec![
        "--nft-table".into(),
        table.clone(),
        "--cluster-cidr".into(),
        "10.251.0.0/16".into(),
    ];
    d.restart();
    let spec = "services:\n  - name: web\n    image: busybox:latest\n    command: [\"sh\", \"-c\", \"echo hello-$HOSTNAME > /tmp/index.html; exec httpd -f -p 8080 -h /tmp\"]\n    scale: 2\n    ports:\n      - name: http\n        port: 80\n        targetPort: 8080\n    health:\n      readiness: {type: tcp, port: 8080, intervalSeconds: 1}\n    networkPolicy:\n      ingress:\n        - from: [{service: app}]\n          ports: [http]\n  - name: app\n    image: busybox:latest\n    command: [\"sleep\", \"100000\"]\n    scale: 1\n  - name: other\n    image: busybox:latest\n    command: [\"sleep\", \"100000\"]\n    scale: 1\n";
    let f = write(&d, "docker.yaml", spec);
    run_ok(&d, &["cast", &f, "--timeout", "90s"]);
    let v: Value = serde_json::from_str(&run_ok(&d, &["get", "services", "web", "-o", "json"])).unwrap();
    let vip = v["vip"].as_str().unwrap().to_string();
    wait_until(LONG, "the kernel to forward web's VIP from containers", || {
        stdout(&sh(&["nft", "list", "map", "inet", &table, "fast_pre"]))
            .contains(&format!("{vip} . 80 : goto lb_2"))
    });
    let get = |from: &str| {
        let cmd = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {vip} 80");
        let o = d.rune(&["exec", from, "--", "sh", "-c", &cmd]);
        format!("{}{}", stdout(&o), rune_chaos_tests::stderr(&o))
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut last = String::new();
    let deadline = std::time::Instant::now() + LONG;
    while seen.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "app reached {seen:?} of web's two containers through the VIP; last answer: {last:?}"
        );
        last = get("app");
        seen.extend(
            ["hello-web-0", "hello-web-1"]
                .into_iter()
                .filter(|w| last.contains(w)),
        );
    }
    assert_eq!(proxied(&d, "web", "forwarded"), 0.0, "the proxy carried none");
    // An ingress policy keeps this host's connections on the proxy, which names host processes.
    wait_until(
        LONG,
        "policy status to count the containers' forwarded port",
        || kernel_forwarded(&d, "fromContainers") == 1,
    );
    assert_eq!(kernel_forwarded(&d, "fromHost"), 0);

    let before = kernel_drops(&d);
    assert!(!get("other").contains("hello-web"), "other is not allowed");
    wait_until(LONG, "the kernel to count the drop", || kernel_drops(&d) > before);
    assert_eq!(proxied(&d, "web", "denied"), 0.0, "dropped before the proxy");

    // Straight to a container, the rule's port is where the instance listens for it (8080),
    // not the service port: app gets in on 8080, and on 80 it is dropped (counted), not
    // refused by the container.
    let v: Value = serde_json::from_str(&run_ok(&d, &["get", "instances", "web", "-o", "json"])).unwrap();
    let pod = v[0]["address"].as_str().unwrap_or_default().to_string();
    assert!(!pod.is_empty(), "{v}");
    let direct = |port: u16| {
        let cmd = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {pod} {port}; echo rc=$?");
        let o = d.rune(&["exec", "app", "--", "sh", "-c", &cmd]);
        format!("{}{}", stdout(&o), rune_chaos_tests::stderr(&o))
    };
    wait_until(LONG, "app to reach a web container on its target port", || {
        direct(8080).contains("hello-web")
    });
    let before = kernel_drops(&d);
    let o = direct(80);
    assert!(!o.contains("hello-web") && !o.contains("refused"), "{o}");
    wait_until(LONG, "the kernel to count the drop on port 80", || {
        kernel_drops(&d) > before
    });
}
