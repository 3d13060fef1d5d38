//! A harness that runs the real `runed` and `rune` binaries: start on free loopback ports,
//! wait for `/healthz`, run CLI commands, stop with SIGTERM or SIGKILL, and clean up.
//!
//! Used by this crate's chaos tests and by `runed`'s end-to-end tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The daemon.
    pub runed: PathBuf,
    /// The CLI.
    pub rune: PathBuf,
}

impl Bins {
    /// `$RUNE_BIN_DIR`, else the target directory this test binary was built into.
    pub fn locate() -> Self {
        let dir = std::env::var_os("RUNE_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let exe = std::env::current_exe().expect("test executable path");
                exe.parent()
                    .and_then(Path::parent)
                    .expect("target/<profile>")
                    .to_path_buf()
            });
        let bins = Bins {
            runed: dir.join("runed"),
            rune: dir.join("rune"),
        };
        assert!(
            bins.runed.exists() && bins.rune.exists(),
            "runed and rune are not built in {}: run `cargo build --bins` first (scripts/test.sh does)",
            dir.display()
        );
        bins
    }
}

/// A port on 127.0.0.1 free for both TCP and UDP (the DNS takes both), not handed out before
/// by this process. Taken from 20000-29999: below the kernel's ephemeral range (32768 and up),
/// where client sockets, UDP ones included, take theirs and could take it before runed binds it,
/// and below runed's proxy ports (30000 and up).
pub fn free_port() -> u16 {
    use std::sync::OnceLock;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    // Test binaries of one run start apart, in case one leaves a daemon behind.
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7919)));
    for _ in 0..10_000 {
        let p = 20_000 + (next.fetch_add(1, Ordering::SeqCst) % 10_000) as u16;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        {
            return p;
        }
    }
    panic!("no free port in 20000-29999 on 127.0.0.1")
}

/// Polls `f` until it is true; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, f: impl FnMut() -> bool) {
    assert!(waited(limit, f), "timed out after {limit:?} waiting for {what}");
}

/// Polls `f` until it is true (true) or `limit` has passed (false): for a caller whose failure
/// message needs what `f` gathered meanwhile.
pub fn waited(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A plain HTTP/1.1 GET; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// A running (or stopped) `runed` with its own data dir and ports.
pub struct Daemon {
    /// The binaries.
    pub bins: Bins,
    /// The data dir.
    pub data_dir: PathBuf,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// The embedded DNS (UDP and TCP).
    pub dns: SocketAddr,
    /// The edge ingress's HTTP and HTTPS listeners (used when runed has the edge role, as in
    /// dev mode).
    pub ingress: (SocketAddr, SocketAddr),
    /// Extra flags passed on every start.
    pub extra: Vec<String>,
    /// The node name runed labels its containers with, unique per daemon so cleanup finds them.
    pub node: String,
    /// The root token from `rune admin bootstrap`, minted at the first start unless
    /// `auto_bootstrap` is off; every `rune` this harness runs carries it.
    pub token: Option<String>,
    /// Bootstrap at the first start (on by default).
    pub auto_bootstrap: bool,
    /// The CA that signs runed's certificate when it serves TLS: health checks go through curl
    /// over HTTPS and every `rune` gets `RUNE_TLS_CA`.
    pub tls_ca: Option<PathBuf>,
    /// Let runed program nftables (off by default: tests share the host's kernel; a test that
    /// turns it on runs runed inside a network namespace of its own).
    pub nftables: bool,
    /// Extra environment for runed.
    pub env: Vec<(String, String)>,
    /// Run runed inside this network namespace (`ip netns exec`), as on a machine of its own.
    pub netns: Option<String>,
    child: Option<Child>,
    tmp: tempfile::TempDir,
}

impl Daemon {
    /// A daemon on a fresh data dir, not started yet.
    pub fn new(bins: &Bins) -> Self {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            sweep_dead_test_nodes();
        });
        let tmp = tempfile::tempdir().expect("temp dir");
        let addr = |p| SocketAddr::from(([127, 0, 0, 1], p));
        Daemon {
            bins: bins.clone(),
            data_dir: tmp.path().join("data"),
            grpc: addr(free_port()),
            http: addr(free_port()),
            metrics: addr(free_port()),
            dns: addr(free_port()),
            ingress: (addr(free_port()), addr(free_port())),
            extra: Vec::new(),
            node: format!(
                "test-{}-{}",
                std::process::id(),
                NEXT_NODE.fetch_add(1, Ordering::SeqCst)
            ),
            token: None,
            auto_bootstrap: true,
            tls_ca: None,
            nftables: false,
            env: Vec::new(),
            netns: None,
            child: None,
            tmp,
        }
    }

    /// Starts a daemon on a fresh data dir and waits until it is healthy.
    pub fn start(bins: &Bins) -> Self {
        let mut d = Self::new(bins);
        d.restart();
        d
    }

    /// runed's local admin socket (under its run dir).
    pub fn admin_socket(&self) -> PathBuf {
        self.tmp.path().join("run").join("admin.sock")
    }

    /// The file runed's stdout and stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.tmp.path().join("runed.log")
    }

    /// What runed printed so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The command that starts runed with this daemon's settings.
    pub fn command(&self) -> Command {
        // `ip netns exec` enters the namespace and execs runed: the pid stays runed's.
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bins.runed);
                c
            }
            None => Command::new(&self.bins.runed),
        };
        c.arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--grpc-addr",
                &self.grpc.to_string(),
                "--http-addr",
                &self.http.to_string(),
            ])
            .args(["--metrics-addr", &self.metrics.to_string()])
            .args(["--dns-addr", &self.dns.to_string()])
            .args(["--ingress-http-addr", &self.ingress.0.to_string()])
            .args(["--ingress-https-addr", &self.ingress.1.to_string()])
            .args(["--node-name", &self.node])
            .arg("--run-dir")
            .arg(self.tmp.path().join("run"))
            .args(["--nftables", if self.nftables { "auto" } else { "off" }])
            // Tests run on shared machines with disks of any size: keep the reserve small
            // unless a test sets its own (extra flags come later and win).
            .args(["--storage-reserve", "8MiB"])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Spawns runed (appending to its log file) without waiting for health.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let child = self
            .command()
            .stdout(log)
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn runed");
        self.child = Some(child);
    }

    /// (Re)starts runed on the same data dir and ports and waits for `/healthz` to answer 200.
    pub fn restart(&mut self) {
        self.spawn();
        let http = self.http;
        let tls_ca = self.tls_ca.clone();
        let mut exited = None;
        wait_until(Duration::from_secs(60), "runed to become healthy", || {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                exited = Some(st);
                return true;
            }
            match &tls_ca {
                Some(ca) => https_status(http, "/healthz", ca) == Some(200),
                None => http_get(http, "/healthz").is_some_and(|(c, _)| c == 200),
            }
        });
        if let Some(st) = exited {
            panic!("runed exited during start with {st}:\n{}", self.logs());
        }
        if self.auto_bootstrap && self.token.is_none() {
            let o = self.rune(&["admin", "bootstrap"]);
            assert!(o.status.success(), "bootstrap: {}", stderr(&o));
            self.token = Some(stdout(&o).trim().to_string());
        }
    }

    /// An interceptor that sends this daemon's root token, for gRPC clients
    /// (`XClient::with_interceptor(channel, d.bearer())`).
    pub fn bearer(&self) -> Bearer {
        Bearer::new(self.token.as_deref().unwrap_or_default())
    }

    /// The pid of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            let sig = match sig {
                "-TERM" => libc::SIGTERM,
                "-KILL" => libc::SIGKILL,
                "-INT" => libc::SIGINT,
                "-HUP" => libc::SIGHUP,
                other => panic!("unknown signal {other}"),
            };
            // SAFETY: kill(2) has no memory effects; pid is runed's, a positive pid.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Sends a signal and leaves the process running (for SIGHUP).
    pub fn send(&self, sig: &str) {
        self.signal(sig);
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal("-TERM");
        self.wait_exit(Duration::from_secs(60))
    }

    /// SIGKILL, then reaps the process.
    pub fn sigkill(&mut self) {
        self.signal("-KILL");
        self.wait_exit(Duration::from_secs(30));
    }

    /// Waits for the process to exit. Past `limit` it is killed and reaped (nothing is left
    /// running behind a failed test) and the test fails with runed's log.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("runed is not running");
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("runed did not exit within {limit:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts runed expecting it to refuse its configuration: it must exit with 78
    /// (EX_CONFIG). Returns what this start logged, for the caller to check the reason.
    pub fn refused_at_start(&mut self) -> String {
        let before = self.logs().len();
        self.spawn();
        let st = self.wait_exit(Duration::from_secs(60));
        let out = self.logs().get(before..).unwrap_or_default().to_string();
        assert_eq!(st.code(), Some(78), "expected a refusal at start: {out}");
        out
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Runs `rune` against this daemon with an isolated CLI config.
    pub fn rune(&self, args: &[&str]) -> Output {
        self.rune_cmd().args(args).output().expect("run rune")
    }

    /// The `rune` command, pointed at this daemon, with its config in the temp dir.
    /// In a network namespace, `rune` runs there too, as an operator on that machine would.
    pub fn rune_cmd(&self) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bins.rune);
                c
            }
            None => Command::new(&self.bins.rune),
        };
        c.env("RUNE_API_SERVER", self.grpc.to_string())
            .env("RUNE_ADMIN_SOCKET", self.admin_socket())
            .env("RUNE_CLI_CONFIG", self.tmp.path().join("cli-config.yaml"))
            .env_remove("RUNE_TOKEN")
            .stdin(Stdio::null());
        if let Some(t) = &self.token {
            c.env("RUNE_TOKEN", t);
        }
        match &self.tls_ca {
            Some(ca) => c.env("RUNE_TLS_CA", ca),
            None => c.env_remove("RUNE_TLS_CA"),
        };
        c
    }

    /// A directory that lives as long as the daemon, for test files.
    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }
}

impl Daemon {
    /// Removes every instance this daemon started: its containers (by node label) and its
    /// process groups (from their state files), then its networks and volumes (which outlive
    /// their services by design). runed leaves instances running when it stops.
    pub fn remove_instances(&self) {
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=rune.node={}", self.node)])
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(String::from)
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for pid in self.process_pids() {
            kill_group(pid);
        }
        self.remove_cgroups();
        // The node's container networks and volumes, once its containers are gone.
        for kind in ["network", "volume"] {
            let Ok(out) = Command::new("docker")
                .args([
                    kind,
                    "ls",
                    "-q",
                    "--filter",
                    &format!("label=rune.node={}", self.node),
                ])
                .output()
            else {
                continue;
            };
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker")
                    .args([kind, "rm", id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    /// The resource groups runed made for its process instances (`rune-<node>-<cluster>/`
    /// under this process's own groups, v1 or v2), once the killed processes have left them.
    fn remove_cgroups(&self) {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut bases = Vec::new();
        for l in own.lines() {
            let mut p = l.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (p.next(), p.next(), p.next()) else {
                continue;
            };
            let path = path.trim_start_matches('/');
            for c in ctrls.split(',') {
                if c == "memory" || c == "cpu" {
                    bases.push(PathBuf::from("/sys/fs/cgroup").join(c).join(path));
                }
            }
            if ctrls.is_empty() {
                bases.push(PathBuf::from("/sys/fs/cgroup").join(path));
            }
        }
        let prefix = format!("rune-{}-", self.node);
        for base in bases {
            let Ok(rd) = std::fs::read_dir(&base) else {
                continue;
            };
            for d in rd
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    for leaf in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                        if leaf.path().is_dir() {
                            let _ = std::fs::remove_dir(leaf.path());
                        }
                    }
                    // A killed process leaves its group a moment after the signal.
                    if std::fs::remove_dir(d.path()).is_ok() || Instant::now() > deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Pids of the process instances recorded under the data dir.
    pub fn process_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let Ok(nss) = std::fs::read_dir(self.data_dir.join("instances")) else {
            return pids;
        };
        for ns in nss.flatten() {
            for inst in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let Ok(text) = std::fs::read_to_string(inst.path().join("state.json")) else {
                    continue;
                };
                if let Some(pid) = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("pid").and_then(|p| p.as_i64()))
                {
                    pids.push(pid as i32);
                }
            }
        }
        pids
    }
}

/// The status of `GET https://addr/path`, verified against `ca`, through curl.
pub fn https_status(addr: SocketAddr, path: &str, ca: &Path) -> Option<u16> {
    let o = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "--cacert",
        ])
        .arg(ca)
        .arg(format!("https://{addr}{path}"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|c| *c != 0)
}

/// Sends `authorization: Bearer <token>` on every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// An interceptor for `token`.
    pub fn new(token: &str) -> Self {
        Self(format!("Bearer {token}").parse().ok())
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// Removes the containers, then the networks and volumes, of test daemons whose test process
/// is gone (nodes `test-<pid>-<n>`). A daemon killed at the end of a test while the engine
/// still completes the creates runed sent leaves containers `Created` after
/// [`Daemon::remove_instances`] looked; the next test binary's first daemon sweeps them, and
/// `scripts/test.sh` does once more at its end. Returns what it removed.
pub fn sweep_dead_test_nodes() -> Vec<String> {
    let dead = |node: &str| {
        node.strip_prefix("test-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut removed = Vec::new();
    for (kind, list) in [
        ("container", ["ps", "-a"]),
        ("network", ["network", "ls"]),
        ("volume", ["volume", "ls"]),
    ] {
        let id = if kind == "volume" { "{{.Name}}" } else { "{{.ID}}" };
        let Ok(out) = Command::new("docker")
            .args(list)
            .args(["--filter", "label=rune.node", "--format"])
            .arg(format!("{id} {{{{.Label \"rune.node\"}}}}"))
            .output()
        else {
            return removed;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((id, node)) = line.split_once(' ') else {
                continue;
            };
            if !dead(node) {
                continue;
            }
            let rm: &[&str] = match kind {
                "container" => &["rm", "-f"],
                "network" => &["network", "rm"],
                _ => &["volume", "rm", "-f"],
            };
            let gone = Command::new("docker")
                .args(rm)
                .arg(id)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if gone {
                removed.push(format!("{kind} {id} ({node})"));
            }
        }
    }
    removed
}

/// SIGKILL to the process group `pgid` leads. Not through the `kill` command: procps-ng 4.0.2
/// (Debian 12) turns `kill -KILL -PGID` into kill(-1), which kills every process on the machine.
fn kill_group(pgid: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory effects.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.remove_instances();
    }
}

/// A DNS query for `name`, type A, recursion desired: the same bytes for the same ID and name
/// (dig adds a fresh cookie to each query, so its queries are never alike).
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        p.push(l.len() as u8);
        p.extend_from_slice(l.as_bytes());
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    p
}

/// stdout of a command as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr of a command as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
