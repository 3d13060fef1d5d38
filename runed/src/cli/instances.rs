//! `rune get instances`, `scale`, `restart`, `stop`, `health`, `deps`, `logs`, `exec`, and the
//! rollout wait that `cast`, `scale` and `restart` share.

use std::io::Write;
use std::time::{Duration, Instant};

use rune_proto::v1 as pb;
use serde_json::json;

use super::output::{age, print_stream_row, print_table};
use super::{exit, Chan, CliError, Conn, Format};

fn client(ch: Chan) -> pb::instance_api_client::InstanceApiClient<Chan> {
    pb::instance_api_client::InstanceApiClient::new(ch)
}

fn status_word(i: &pb::Instance) -> String {
    if i.status == "Running" && i.ready {
        "Running".into()
    } else if i.status == "Running" {
        "Running (not ready)".into()
    } else {
        i.status.clone()
    }
}

fn instance_json(i: &pb::Instance) -> serde_json::Value {
    json!({
        "namespace": i.namespace, "service": i.service, "id": i.id, "node": i.node,
        "runtime": i.runtime, "status": i.status, "ready": i.ready, "reason": i.reason,
        "exitCode": i.exit_code, "restarts": i.restarts, "address": i.address,
        "runtimeId": i.runtime_id, "generation": i.generation, "current": i.current,
        "createdAtMs": i.created_at_ms, "startedAtMs": i.started_at_ms, "updatedAtMs": i.updated_at_ms,
        "probes": i.probes.iter().map(|p| json!({
            "name": p.name, "state": p.state, "message": p.message, "sinceMs": p.since_ms,
            "lastResult": p.last_result, "lastAtMs": p.last_at_ms,
        })).collect::<Vec<_>>(),
    })
}

fn header(all: bool) -> Vec<String> {
    let mut h: Vec<String> = [
        "ID", "SERVICE", "NODE", "STATUS", "READY", "RESTARTS", "ADDRESS", "AGE", "REASON",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if all {
        h.insert(0, "NAMESPACE".into());
    }
    h
}

fn row(i: &pb::Instance, all: bool) -> Vec<String> {
    let mut r = vec![
        i.id.clone(),
        i.service.clone(),
        i.node.clone(),
        status_word(i),
        if i.ready { "yes".into() } else { "no".into() },
        i.restarts.to_string(),
        i.address.clone(),
        age(i.created_at_ms),
        i.reason.chars().take(60).collect(),
    ];
    if all {
        r.insert(0, i.namespace.clone());
    }
    r
}

/// `rune get instances [SERVICE]`.
pub async fn get(
    conn: &Conn,
    service: Option<&str>,
    all: bool,
    watch: bool,
    format: Format,
) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let ns = if all {
        "*".to_string()
    } else {
        conn.namespace.clone()
    };
    let service = service.unwrap_or_default().to_string();
    if watch {
        let mut s = c
            .watch_instances(pb::WatchInstancesRequest {
                namespace: ns,
                service,
            })
            .await
            .map_err(|s| conn.status(s))?
            .into_inner();
        let mut h = header(all);
        h.insert(0, "EVENT".into());
        if format.is_table() {
            print_stream_row(&h, &h, 8);
        }
        while let Some(ev) = s.message().await.map_err(|s| conn.status(s))? {
            let Some(i) = ev.instance else { continue };
            let ty = match pb::EventType::try_from(ev.r#type).unwrap_or(pb::EventType::Unspecified) {
                pb::EventType::Added => "ADDED",
                pb::EventType::Modified => "MODIFIED",
                pb::EventType::Deleted => "DELETED",
                pb::EventType::Unspecified => "UNKNOWN",
            };
            if format.is_table() {
                let mut r = row(&i, all);
                r.insert(0, ty.into());
                print_stream_row(&h, &r, 8);
            } else {
                let v = json!({"type": ty, "index": ev.index, "instance": instance_json(&i)});
                println!("{}", serde_json::to_string(&v).unwrap_or_default());
            }
            let _ = std::io::stdout().flush();
        }
        return Ok(());
    }
    let list = list_all(&c, &ns, &service).await.map_err(|s| conn.status(s))?;
    match format {
        Format::Table | Format::Wide => {
            if list.instances.is_empty() {
                eprintln!("No instances found.");
                return Ok(());
            }
            let mut rows = vec![header(all)];
            rows.extend(list.instances.iter().map(|i| row(i, all)));
            print_table(&rows);
        }
        Format::Json => {
            let v: Vec<_> = list.instances.iter().map(instance_json).collect();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Format::Yaml => {
            let v: Vec<_> = list.instances.iter().map(instance_json).collect();
            print!("{}", crate::yaml::emit(&serde_json::Value::Array(v)));
        }
    }
    Ok(())
}

/// How long a command waits for instances: while they progress, and in all.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Give up when the instances make no progress for this long (exit 7, saying why).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub progress_deadline: Duration,
    /// Give up after this long in all, progressing or not (default: no limit).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

impl WaitArgs {
    /// Why a wait for `what` gives up, if it does: no progress since `progressed` for the
    /// progress deadline, or `--timeout` since `started`; `said` is the last progress line.
    fn given_up(&self, started: Instant, progressed: Instant, what: &str, said: &str) -> Option<String> {
        if progressed.elapsed() > self.progress_deadline {
            return Some(format!(
                "{what} made no progress for {}: {said}",
                dur(self.progress_deadline)
            ));
        }
        let t = self.timeout.filter(|t| started.elapsed() > *t)?;
        Some(format!("timed out after {} waiting for {what}: {said}", dur(t)))
    }
}

fn dur(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs_f64().round() as u64))
}

/// Waits until every instance of the service runs its current template and is ready (or, for
/// a stop, is gone). Says how far it got whenever that changes, names every instance that is
/// not progressing with its state and reason, and gives up (exit 7, with those reasons) after
/// `w.progress_deadline` without progress or `w.timeout` in all, counted from `started`.
pub async fn wait_rollout(
    conn: &Conn,
    ns: &str,
    name: &str,
    w: &WaitArgs,
    started: Instant,
) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let mut progress: Option<(u32, u32, u32, u32)> = None;
    let mut progressed = Instant::now();
    let (mut said, mut said_problems) = (String::new(), Vec::<String>::new());
    loop {
        let s = c
            .rollout(pb::RolloutRequest {
                namespace: ns.into(),
                name: name.into(),
            })
            .await
            .map_err(|s| conn.status(s))?
            .into_inner();
        let what = format!("service/{ns}/{name}");
        if s.done {
            if s.desired == 0 {
                println!("{what} stopped: no instances");
            } else {
                println!("{what} ready: {}/{} instances", s.ready, s.desired);
            }
            return Ok(());
        }
        let now = (s.desired, s.updated, s.ready, s.instances);
        if progress != Some(now) {
            progress = Some(now);
            progressed = Instant::now();
        }
        let line = progress_line(&what, &s);
        if line != said {
            eprintln!("{line}");
            said = line;
        }
        if s.problems != said_problems {
            for p in s.problems.iter().filter(|p| !said_problems.contains(p)) {
                eprintln!("  {p}");
            }
            said_problems = s.problems.clone();
        }
        if let Some(mut m) = w.given_up(started, progressed, &what, &said) {
            if s.problems.is_empty() {
                m.push_str("\n  (no instance reports a problem: see `rune get instances`)");
            }
            for p in &s.problems {
                m.push_str(&format!("\n  {p}"));
            }
            return Err(CliError {
                code: exit::TIMEOUT,
                message: m,
            });
        }
        // The CLI polls rollout status; the server answers from the applied state.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until no instance of the deleted service `name` is left (each stops within its
/// grace period), saying how many are left whenever that changes; gives up as
/// [`wait_rollout`] does (exit 7), naming what is left. The service is gone, so its
/// namespace's instances are listed and filtered.
pub async fn wait_gone(
    conn: &Conn,
    ns: &str,
    name: &str,
    w: &WaitArgs,
    started: Instant,
) -> Result<(), CliError> {
    let c = client(conn.channel().await?);
    let what = format!("service/{ns}/{name}");
    let (mut said, mut progressed) = (String::new(), Instant::now());
    loop {
        let left: Vec<pb::Instance> = list_all(&c, ns, "")
            .await
            .map_err(|s| conn.status(s))?
            .instances
            .into_iter()
            .filter(|i| i.service == name)
            .collect();
        if left.is_empty() {
            println!("{what} stopped: no instances");
            return Ok(());
        }
        let line = stopping_line(&what, left.len());
        if line != said {
            eprintln!("{line}");
            said = line;
            progressed = Instant::now();
        }
        if let Some(mut m) = w.given_up(started, progressed, &what, &said) {
            for i in &left {
                m.push_str(&format!("\n  {}: {} {}", i.id, i.status, i.reason));
            }
            return Err(CliError {
                code: exit::TIMEOUT,
                message: m,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The progress line of a wait for instances to stop.
fn stopping_line(what: &str, left: usize) -> String {
    format!("{what}: stopping, {left} instance(s) left")
}

/// One progress line of a wait. Old instances still draining are counted apart, so the counts
/// never exceed the scale ("3/0" or "2/1 ready" would read as nonsense).
fn progress_line(what: &str, s: &pb::RolloutStatus) -> String {
    if s.desired == 0 {
        return stopping_line(what, s.instances as usize);
    }
    let mut l = format!(
        "{what}: {}/{} updated, {}/{} ready",
        s.updated.min(s.desired),
        s.desired,
        s.ready.min(s.desired),
        s.desired
    );
    let extra = s.instances.saturating_sub(s.desired);
    if extra > 0 {
        l.push_str(&format!(", {extra} stopping"));
    }
    l
}

/// `rune scale`, `rune stop`.
pub async fn scale(conn: &Conn, name: &str, n: u32, wait: Option<&WaitArgs>) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let r = c
        .scale(pb::ScaleRequest {
            namespace: conn.namespace.clone(),
            name: name.into(),
            scale: n,
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    if r.changed {
        println!("service/{}/{name} scaled ({})", conn.namespace, r.summary);
    } else {
        println!("service/{}/{name} unchanged ({})", conn.namespace, r.summary);
    }
    match wait {
        Some(w) => wait_rollout(conn, &conn.namespace, name, w, Instant::now()).await,
        None => Ok(()),
    }
}

/// `rune restart`.
pub async fn restart(conn: &Conn, name: &str, wait: Option<&WaitArgs>) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let r = c
        .restart(pb::RestartRequest {
            namespace: conn.namespace.clone(),
            name: name.into(),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    println!("service/{}/{name} restarting ({})", conn.namespace, r.summary);
    match wait {
        Some(w) => wait_rollout(conn, &conn.namespace, name, w, Instant::now()).await,
        None => Ok(()),
    }
}

/// Every instance of a namespace (or service), page by page; `index` is the first page's.
async fn list_all(
    c: &pb::instance_api_client::InstanceApiClient<super::Chan>,
    ns: &str,
    service: &str,
) -> Result<pb::ListInstancesResponse, tonic::Status> {
    let mut c = c.clone();
    let mut all = pb::ListInstancesResponse::default();
    let mut token = String::new();
    loop {
        let r = c
            .list_instances(pb::ListInstancesRequest {
                namespace: ns.to_string(),
                service: service.to_string(),
                limit: super::PAGE,
                continue_token: token,
            })
            .await?
            .into_inner();
        if all.index == 0 {
            all.index = r.index;
        }
        all.instances.extend(r.instances);
        if r.continue_token.is_empty() {
            return Ok(all);
        }
        token = r.continue_token;
    }
}

/// `rune health NAME`.
pub async fn health(conn: &Conn, name: &str, format: Format) -> Result<(), CliError> {
    let c = client(conn.channel().await?);
    let list = list_all(&c, &conn.namespace, name)
        .await
        .map_err(|s| conn.status(s))?;
    if !format.is_table() {
        let v: Vec<_> = list.instances.iter().map(instance_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let mut rows = vec![["INSTANCE", "STATUS", "PROBE", "STATE", "SINCE", "LAST RESULT"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    for i in &list.instances {
        if i.probes.is_empty() {
            rows.push(vec![
                i.id.clone(),
                status_word(i),
                "-".into(),
                "-".into(),
                "".into(),
                "no probes declared".into(),
            ]);
        }
        for p in &i.probes {
            let last = if p.last_result.is_empty() {
                p.message.clone()
            } else {
                let secs = (rune_log::now_ms() - p.last_at_ms).max(0) / 1000;
                format!("{} ({secs}s ago)", p.last_result)
            };
            rows.push(vec![
                i.id.clone(),
                status_word(i),
                p.name.clone(),
                p.state.clone(),
                if p.since_ms > 0 {
                    age(p.since_ms)
                } else {
                    String::new()
                },
                last,
            ]);
        }
    }
    if list.instances.is_empty() {
        println!("service/{}/{name} has no instances", conn.namespace);
        return Ok(());
    }
    print_table(&rows);
    Ok(())
}

/// `rune deps NAME`.
pub async fn deps(conn: &Conn, name: &str, dot: bool) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let d = c
        .dependencies(pb::DependenciesRequest {
            namespace: conn.namespace.clone(),
            name: name.into(),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    let me = format!("{}/{name}", conn.namespace);
    if dot {
        println!("digraph deps {{");
        for e in &d.dependencies {
            println!("  \"{me}\" -> \"{}/{}\";", e.namespace, e.name);
        }
        for x in &d.dependents {
            println!("  \"{x}\" -> \"{me}\";");
        }
        println!("}}");
        return Ok(());
    }
    println!("{me}");
    if d.dependencies.is_empty() {
        println!("  depends on nothing");
    }
    for e in &d.dependencies {
        let state = match (e.hidden, e.exists, e.ready) {
            (true, _, _) => "not visible to this token",
            (false, false, _) => "missing",
            (false, true, true) => "ready",
            (false, true, false) => "not ready",
        };
        let kind = if e.kind == "service" {
            String::new()
        } else {
            format!("{}:", e.kind)
        };
        println!(
            "  -> {kind}{}/{} (readyWhen {}{}) {state}",
            e.namespace,
            e.name,
            e.ready_when,
            if e.optional { ", optional" } else { "" }
        );
    }
    if !d.dependents.is_empty() {
        println!("  depended on by: {}", d.dependents.join(", "));
    }
    Ok(())
}

/// Options of `rune logs`.
pub struct LogsOpts {
    pub follow: bool,
    pub tail: u64,
    pub since: Option<Duration>,
    pub instance: Option<String>,
    pub timestamps: bool,
    pub init_step: Option<String>,
}

/// `rune logs NAME`.
pub async fn logs(conn: &Conn, name: &str, o: LogsOpts) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let (service, instance) = match (&o.instance, name.strip_prefix("instance/")) {
        (Some(i), _) => (name.to_string(), i.clone()),
        (None, Some(i)) => (String::new(), i.to_string()),
        (None, None) => (name.trim_start_matches("service/").to_string(), String::new()),
    };
    let mut s = c
        .logs(pb::LogsRequest {
            namespace: conn.namespace.clone(),
            service,
            instance: instance.clone(),
            follow: o.follow,
            tail: o.tail,
            since_seconds: o.since.map(|d| d.as_secs() as i64).unwrap_or(0),
            timestamps: o.timestamps,
            init_step: o.init_step.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    // With several instances, each line says whose it is; bytes are split into lines per instance.
    let mut pending: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let mut instances = std::collections::BTreeSet::new();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = s.message().await.map_err(|s| conn.status(s))? {
        instances.insert(chunk.instance.clone());
        let buf = pending.entry(chunk.instance.clone()).or_default();
        buf.extend_from_slice(&chunk.data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if instance.is_empty() {
                let _ = write!(out, "[{}] ", chunk.instance);
            }
            let _ = out.write_all(&line);
        }
        let _ = out.flush();
    }
    for (id, rest) in pending {
        if !rest.is_empty() {
            if instance.is_empty() {
                let _ = write!(out, "[{id}] ");
            }
            let _ = out.write_all(&rest);
            let _ = writeln!(out);
        }
    }
    Ok(())
}

/// `rune exec NAME -- CMD...`; returns the command's exit code.
pub async fn exec(
    conn: &Conn,
    name: &str,
    instance: Option<String>,
    interactive: bool,
    tty: bool,
    command: Vec<String>,
) -> Result<u8, CliError> {
    let mut c = client(conn.channel().await?);
    let (cols, rows) = if tty {
        super::tty::size().unwrap_or((80, 24))
    } else {
        (0, 0)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ExecRequest>(16);
    let start = pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Start(pb::ExecStart {
            namespace: conn.namespace.clone(),
            service: name.trim_start_matches("service/").into(),
            instance: instance.unwrap_or_default(),
            command,
            tty,
            cols: u32::from(cols),
            rows: u32::from(rows),
        })),
    };
    tx.send(start)
        .await
        .map_err(|_| CliError::generic("exec: could not send the request"))?;
    let mut stream = c
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    let raw = if tty {
        super::tty::RawMode::enter().ok()
    } else {
        None
    };
    if interactive {
        let tx = tx.clone();
        // Blocking reads of the terminal, in a thread that dies with the process.
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(pb::ExecRequest {
                            msg: Some(pb::exec_request::Msg::StdinEof(true)),
                        });
                        return;
                    }
                    Ok(n) => {
                        let m = pb::ExecRequest {
                            msg: Some(pb::exec_request::Msg::Stdin(buf[..n].to_vec())),
                        };
                        if tx.blocking_send(m).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        let _ = tx
            .send(pb::ExecRequest {
                msg: Some(pb::exec_request::Msg::StdinEof(true)),
            })
            .await;
    }
    if tty {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((cols, rows)) = super::tty::size() {
                    let m = pb::ExecRequest {
                        msg: Some(pb::exec_request::Msg::Resize(pb::ExecResize {
                            cols: u32::from(cols),
                            rows: u32::from(rows),
                        })),
                    };
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    let mut code: Option<i64> = None;
    let result = async {
        while let Some(m) = stream.message().await.map_err(|s| conn.status(s))? {
            match m.msg {
                Some(pb::exec_response::Msg::Stdout(b)) => {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&b);
                    let _ = o.flush();
                }
                Some(pb::exec_response::Msg::Stderr(b)) => {
                    let mut o = std::io::stderr().lock();
                    let _ = o.write_all(&b);
                    let _ = o.flush();
                }
                Some(pb::exec_response::Msg::ExitCode(c)) => {
                    code = Some(c);
                    break;
                }
                _ => {}
            }
        }
        Ok::<(), CliError>(())
    }
    .await;
    drop(raw);
    result?;
    match code {
        Some(c) => Ok(u8::try_from(c.clamp(0, 255)).unwrap_or(1)),
        None => Err(CliError::generic(
            "exec: the connection ended before the command did",
        )),
    }
}

fn volume_json(v: &pb::Volume) -> serde_json::Value {
    serde_json::json!({
        "name": v.name,
        "namespace": v.namespace,
        "service": v.service,
        "instance": v.instance,
        "claim": v.claim,
        "storageClass": v.storage_class,
        "requestedSize": v.requested_size,
        "usageBytes": (v.usage_bytes >= 0).then_some(v.usage_bytes),
        "inUse": v.in_use,
        "engineName": v.engine_name,
    })
}

/// `rune volume list`.
pub async fn volume_list(conn: &Conn, all: bool, format: Format) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    let list = c
        .list_volumes(pb::ListVolumesRequest {
            namespace: conn.namespace.clone(),
            all_namespaces: all,
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner()
        .volumes;
    match format {
        Format::Table | Format::Wide => {
            if list.is_empty() {
                eprintln!("No volumes found.");
                return Ok(());
            }
            let mut rows = vec![vec![
                "NAMESPACE",
                "NAME",
                "SERVICE",
                "INSTANCE",
                "CLASS",
                "REQUESTED",
                "USED",
                "IN USE",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()];
            for v in &list {
                let dash = |s: &str| {
                    if s.is_empty() {
                        "-".to_string()
                    } else {
                        s.to_string()
                    }
                };
                rows.push(vec![
                    v.namespace.clone(),
                    v.name.clone(),
                    dash(&v.service),
                    dash(&v.instance),
                    dash(&v.storage_class),
                    dash(&v.requested_size),
                    u64::try_from(v.usage_bytes).map_or("-".into(), rune_log::space::human),
                    if v.in_use { "yes" } else { "no" }.into(),
                ]);
            }
            print_table(&rows);
        }
        Format::Json => {
            let v: Vec<_> = list.iter().map(volume_json).collect();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Format::Yaml => {
            let v: Vec<_> = list.iter().map(volume_json).collect();
            print!("{}", crate::yaml::emit(&serde_json::Value::Array(v)));
        }
    }
    Ok(())
}

/// `rune volume delete NAME`.
pub async fn volume_delete(conn: &Conn, name: &str) -> Result<(), CliError> {
    let mut c = client(conn.channel().await?);
    c.delete_volume(pb::DeleteVolumeRequest {
        namespace: conn.namespace.clone(),
        name: name.to_string(),
    })
    .await
    .map_err(|s| conn.status(s))?;
    println!("volume/{}/{name} deleted", conn.namespace);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(desired: u32, updated: u32, ready: u32, instances: u32) -> pb::RolloutStatus {
        pb::RolloutStatus {
            desired,
            updated,
            ready,
            instances,
            ..Default::default()
        }
    }

    #[test]
    fn progress_counts_never_exceed_the_scale() {
        let w = "service/default/web";
        // Scaling 2 → 1: both old instances are still ready for a moment.
        assert_eq!(
            progress_line(w, &status(1, 1, 2, 2)),
            "service/default/web: 1/1 updated, 1/1 ready, 1 stopping"
        );
        assert_eq!(
            progress_line(w, &status(3, 1, 0, 3)),
            "service/default/web: 1/3 updated, 0/3 ready"
        );
        // A stop reads as what is left, never "3/0".
        assert_eq!(
            progress_line(w, &status(0, 3, 2, 3)),
            "service/default/web: stopping, 3 instance(s) left"
        );
    }
}
