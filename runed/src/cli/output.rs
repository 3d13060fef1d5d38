//! `rune get`: tables, JSON and re-castable YAML, and `--watch`.

use rune_proto::v1 as pb;
use rune_statemachine::spec::ServiceSpec;
use serde_json::json;

use super::{CliError, Conn, Format};
use crate::yaml;

/// What `rune get` was asked.
pub struct Query {
    pub kind: String,
    pub name: Option<String>,
    pub all: bool,
    pub watch: bool,
    pub selector: String,
    pub history: bool,
    pub format: Format,
}

/// Prints rows as aligned columns; the first row is the header.
pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map(|s| s.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// Prints one row of a table that arrives row by row (a watch): each column as wide as its
/// header or `min`, whichever is wider, so the header printed the same way lines up with the rows.
pub fn print_stream_row(header: &[String], cells: &[String], min: usize) {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let w = header.get(i).map_or(0, |h| h.chars().count()).max(min);
        line.push_str(&format!("{cell:<w$}   "));
    }
    println!("{}", line.trim_end());
}

/// `Just now`, `5m`, `3h`, `2d`, as kubectl shows ages.
pub fn age(ms: i64) -> String {
    let s = (rune_log::now_ms() - ms).max(0) / 1000;
    match s {
        0..=9 => "Just now".into(),
        10..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn spec_of(s: &pb::Service) -> Result<ServiceSpec, CliError> {
    serde_json::from_str(&s.spec_json)
        .map_err(|e| CliError::generic(format!("server sent an unreadable spec: {e}")))
}

fn spec_value(s: &pb::Service) -> Result<serde_json::Value, CliError> {
    serde_json::from_str(&s.spec_json)
        .map_err(|e| CliError::generic(format!("server sent an unreadable spec: {e}")))
}

fn meta_json(m: &Option<pb::ObjectMeta>) -> serde_json::Value {
    let m = m.clone().unwrap_or_default();
    json!({
        "generation": m.generation,
        "createdAtMs": m.created_at_ms,
        "updatedAtMs": m.updated_at_ms,
        "specHash": m.spec_hash,
        "resourceVersion": m.resource_version,
        "lastNonZeroScale": m.last_non_zero_scale,
    })
}

fn service_row(s: &pb::Service, all: bool) -> Result<Vec<String>, CliError> {
    let spec = spec_of(s)?;
    let m = s.meta.clone().unwrap_or_default();
    let target = match (&spec.image, &spec.process) {
        (Some(i), _) => i.clone(),
        (None, Some(p)) => p.command.clone(),
        _ => String::new(),
    };
    let mut row = vec![
        s.name.clone(),
        spec.runtime().into(),
        if s.vip.is_empty() {
            "-".into()
        } else {
            s.vip.clone()
        },
        target,
        spec.scale().to_string(),
        m.generation.to_string(),
        age(m.created_at_ms),
    ];
    if all {
        row.insert(0, s.namespace.clone());
    }
    Ok(row)
}

/// `80→127.0.0.1:30000,443→...`: where this node's proxy serves each port.
fn proxy_column(s: &pb::Service) -> String {
    if s.proxy_ports.is_empty() {
        return "-".into();
    }
    s.proxy_ports
        .iter()
        .map(|p| format!("{}→{}", p.port, p.address))
        .collect::<Vec<_>>()
        .join(",")
}

fn service_header(all: bool) -> Vec<String> {
    let mut h: Vec<String> = [
        "NAME",
        "RUNTIME",
        "VIP",
        "IMAGE/COMMAND",
        "SCALE",
        "GENERATION",
        "AGE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if all {
        h.insert(0, "NAMESPACE".into());
    }
    h
}

/// Prints services in the chosen format. YAML is a castfile: `rune cast` of it changes nothing.
fn print_services(list: &[pb::Service], single: bool, all: bool, format: Format) -> Result<(), CliError> {
    match format {
        Format::Table | Format::Wide => {
            let wide = format == Format::Wide;
            let mut header = service_header(all);
            if wide {
                header.push("PROXY".into());
            }
            let mut rows = vec![header];
            for s in list {
                let mut row = service_row(s, all)?;
                if wide {
                    row.push(proxy_column(s));
                }
                rows.push(row);
            }
            print_table(&rows);
        }
        Format::Json => {
            let items: Vec<serde_json::Value> = list
                .iter()
                .map(|s| {
                    let proxy: Vec<serde_json::Value> =
                        s.proxy_ports.iter().map(|p| json!({"port": p.port, "address": p.address})).collect();
                    Ok(json!({"namespace": s.namespace, "name": s.name, "vip": s.vip, "proxyPorts": proxy, "spec": spec_value(s)?, "metadata": meta_json(&s.meta)}))
                })
                .collect::<Result<_, CliError>>()?;
            let v = if single {
                items.into_iter().next().unwrap_or_default()
            } else {
                serde_json::Value::Array(items)
            };
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Format::Yaml => {
            for (i, s) in list.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                let m = s.meta.clone().unwrap_or_default();
                println!(
                    "# generation {}, spec hash {}, log index {}, vip {}",
                    m.generation, m.spec_hash, m.resource_version, s.vip
                );
                print!("{}", yaml::emit(&json!({ "service": spec_value(s)? })));
            }
        }
    }
    Ok(())
}

fn print_namespaces(list: &[pb::Namespace], format: Format) {
    match format {
        Format::Table | Format::Wide => {
            let mut rows = vec![vec!["NAME".to_string(), "LABELS".into(), "AGE".into()]];
            for n in list {
                let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let m = n.meta.clone().unwrap_or_default();
                rows.push(vec![
                    n.name.clone(),
                    if labels.is_empty() {
                        "<none>".into()
                    } else {
                        labels.join(",")
                    },
                    age(m.created_at_ms),
                ]);
            }
            print_table(&rows);
        }
        Format::Json | Format::Yaml => {
            let items: Vec<serde_json::Value> = list
                .iter()
                .map(|n| {
                    let mut spec = json!({"name": n.name});
                    if !n.labels.is_empty() {
                        spec["labels"] = json!(n.labels);
                    }
                    if !n.description.is_empty() {
                        spec["description"] = json!(n.description);
                    }
                    if format == Format::Json {
                        json!({"namespace": spec, "metadata": meta_json(&n.meta)})
                    } else {
                        json!({ "namespace": spec })
                    }
                })
                .collect();
            for (i, v) in items.iter().enumerate() {
                if format == Format::Json {
                    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
                } else {
                    if i > 0 {
                        println!("---");
                    }
                    print!("{}", yaml::emit(v));
                }
            }
        }
    }
}

/// Runs `rune get`.
pub async fn get(conn: &Conn, q: Query) -> Result<(), CliError> {
    match q.kind.as_str() {
        "services" | "service" | "svc" => get_services(conn, q).await,
        "namespaces" | "namespace" | "ns" => get_namespaces(conn, q).await,
        "endpoints" | "endpoint" | "ep" => get_endpoints(conn, q).await,
        "ingresses" | "ingress" | "ing" => super::network::get_ingresses(conn, q.all, q.format).await,
        "instances" | "instance" | "inst" => {
            super::instances::get(conn, q.name.as_deref(), q.all, q.watch, q.format).await
        }
        other => Err(CliError::usage(format!(
            "unknown resource type '{other}': this release knows services (svc), instances (inst), endpoints (ep), ingresses (ing), namespaces (ns), secrets and configmaps"
        ))),
    }
}

async fn get_endpoints(conn: &Conn, q: Query) -> Result<(), CliError> {
    let c = pb::service_api_client::ServiceApiClient::new(conn.channel().await?);
    let namespace = if q.all {
        "*".to_string()
    } else {
        conn.namespace.clone()
    };
    let service = q.name.clone().unwrap_or_default();
    let list = super::paged(|token| {
        let (mut c, namespace, service) = (c.clone(), namespace.clone(), service.clone());
        async move {
            let r = c
                .list_endpoints(pb::ListEndpointsRequest {
                    namespace,
                    service,
                    limit: super::PAGE,
                    continue_token: token,
                })
                .await?
                .into_inner();
            Ok((r.endpoints, r.continue_token))
        }
    })
    .await
    .map_err(|s| conn.status(s))?;
    if q.format.is_table() {
        let mut rows = vec![vec![
            "NAMESPACE".into(),
            "SERVICE".into(),
            "VIP".into(),
            "ENDPOINTS".into(),
        ]];
        for e in &list {
            let eps: Vec<String> = e
                .endpoints
                .iter()
                .flat_map(|ep| {
                    let addr = ep.address.clone();
                    let ports: Vec<String> = ep
                        .ports
                        .iter()
                        .map(|p| format!("{addr}:{}", p.target_port))
                        .collect();
                    if ports.is_empty() {
                        vec![addr]
                    } else {
                        ports
                    }
                })
                .collect();
            rows.push(vec![
                e.namespace.clone(),
                e.service.clone(),
                if e.vip.is_empty() {
                    "-".into()
                } else {
                    e.vip.clone()
                },
                if eps.is_empty() {
                    "<none>".into()
                } else {
                    eps.join(",")
                },
            ]);
        }
        print_table(&rows);
        return Ok(());
    }
    let v: Vec<serde_json::Value> = list
        .iter()
        .map(|e| {
            json!({"namespace": e.namespace, "service": e.service, "vip": e.vip,
                   "endpoints": e.endpoints.iter().map(|ep| json!({"instance": ep.instance, "address": ep.address, "node": ep.node,
                        "ports": ep.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "targetPort": p.target_port, "protocol": p.protocol})).collect::<Vec<_>>()})).collect::<Vec<_>>()})
        })
        .collect();
    let v = if q.name.is_some() {
        v.into_iter().next().unwrap_or_default()
    } else {
        serde_json::Value::Array(v)
    };
    if q.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", yaml::emit(&v));
    }
    Ok(())
}

async fn get_services(conn: &Conn, q: Query) -> Result<(), CliError> {
    let mut c = pb::service_api_client::ServiceApiClient::new(conn.channel().await?);
    let ns = if q.all {
        "*".to_string()
    } else {
        conn.namespace.clone()
    };
    if q.history {
        let Some(name) = &q.name else {
            return Err(CliError::usage("--history needs a service name"));
        };
        let h = c
            .service_history(pb::ServiceHistoryRequest {
                namespace: conn.namespace.clone(),
                name: name.clone(),
            })
            .await
            .map_err(|s| conn.status(s))?
            .into_inner();
        return print_history(&h.revisions, q.format);
    }
    if q.watch {
        return watch_services(conn, &mut c, ns, q).await;
    }
    if let Some(name) = &q.name {
        let s = c
            .get_service(pb::GetServiceRequest {
                namespace: conn.namespace.clone(),
                name: name.clone(),
            })
            .await
            .map_err(|s| conn.status(s))?
            .into_inner();
        return print_services(&[s], true, false, q.format);
    }
    let services = super::paged(|token| {
        let (mut c, namespace, label_selector) = (c.clone(), ns.clone(), q.selector.clone());
        async move {
            let r = c
                .list_services(pb::ListServicesRequest {
                    namespace,
                    label_selector,
                    limit: super::PAGE,
                    continue_token: token,
                })
                .await?
                .into_inner();
            Ok((r.services, r.continue_token))
        }
    })
    .await
    .map_err(|s| conn.status(s))?;
    if services.is_empty() && q.format.is_table() {
        eprintln!(
            "No services found{}.",
            if q.all {
                String::new()
            } else {
                format!(" in namespace {}", conn.namespace)
            }
        );
        return Ok(());
    }
    print_services(&services, false, q.all, q.format)
}

async fn watch_services(
    conn: &Conn,
    c: &mut pb::service_api_client::ServiceApiClient<super::Chan>,
    ns: String,
    q: Query,
) -> Result<(), CliError> {
    let mut stream = c
        .watch_services(pb::WatchServicesRequest {
            namespace: ns,
            label_selector: q.selector.clone(),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    let mut h = service_header(q.all);
    h.insert(0, "EVENT".into());
    if q.format.is_table() {
        print_stream_row(&h, &h, 10);
    }
    while let Some(ev) = stream.message().await.map_err(|s| conn.status(s))? {
        let Some(s) = ev.service else { continue };
        if q.name.as_ref().is_some_and(|n| n != &s.name) {
            continue;
        }
        let ty = match pb::EventType::try_from(ev.r#type).unwrap_or(pb::EventType::Unspecified) {
            pb::EventType::Added => "ADDED",
            pb::EventType::Modified => "MODIFIED",
            pb::EventType::Deleted => "DELETED",
            pb::EventType::Unspecified => "UNKNOWN",
        };
        match q.format {
            Format::Table | Format::Wide => {
                let mut row = if ty == "DELETED" {
                    let mut r = vec![
                        s.name.clone(),
                        "".into(),
                        "".into(),
                        "".into(),
                        "".into(),
                        "".into(),
                    ];
                    if q.all {
                        r.insert(0, s.namespace.clone());
                    }
                    r
                } else {
                    service_row(&s, q.all)?
                };
                row.insert(0, ty.into());
                // Events arrive one by one: print each row as it comes, padded like the header.
                print_stream_row(&h, &row, 10);
            }
            _ => {
                let spec = if s.spec_json.is_empty() {
                    serde_json::Value::Null
                } else {
                    spec_value(&s)?
                };
                let v = json!({"type": ty, "index": ev.index, "namespace": s.namespace, "name": s.name, "spec": spec});
                println!("{}", serde_json::to_string(&v).unwrap_or_default());
            }
        }
    }
    Ok(())
}

fn print_history(revs: &[pb::ServiceRevision], format: Format) -> Result<(), CliError> {
    match format {
        Format::Table | Format::Wide => {
            let mut rows = vec![vec![
                "GENERATION".to_string(),
                "SPEC HASH".into(),
                "REPLACED".into(),
                "SCALE".into(),
                "IMAGE/COMMAND".into(),
            ]];
            for r in revs {
                let spec: ServiceSpec =
                    serde_json::from_str(&r.spec_json).map_err(|e| CliError::generic(e.to_string()))?;
                let target = spec
                    .image
                    .clone()
                    .or(spec.process.map(|p| p.command))
                    .unwrap_or_default();
                let replaced = match (r.replaced_at_ms, age(r.replaced_at_ms)) {
                    (0, _) => "current".to_string(),
                    (_, a) if a == "Just now" => a,
                    (_, a) => format!("{a} ago"),
                };
                rows.push(vec![
                    r.generation.to_string(),
                    r.spec_hash.chars().take(12).collect(),
                    replaced,
                    spec.scale.unwrap_or(0).to_string(),
                    target,
                ]);
            }
            print_table(&rows);
        }
        Format::Json => {
            let items: Vec<serde_json::Value> = revs
                .iter()
                .map(|r| {
                    let spec: serde_json::Value = serde_json::from_str(&r.spec_json).unwrap_or_default();
                    json!({"generation": r.generation, "specHash": r.spec_hash, "replacedAtMs": r.replaced_at_ms, "spec": spec})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&items).unwrap_or_default());
        }
        Format::Yaml => {
            for (i, r) in revs.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                let spec: serde_json::Value = serde_json::from_str(&r.spec_json).unwrap_or_default();
                println!(
                    "# generation {}{}",
                    r.generation,
                    if r.replaced_at_ms == 0 { " (current)" } else { "" }
                );
                print!("{}", yaml::emit(&json!({ "service": spec })));
            }
        }
    }
    Ok(())
}

async fn get_namespaces(conn: &Conn, q: Query) -> Result<(), CliError> {
    let mut c = pb::namespace_api_client::NamespaceApiClient::new(conn.channel().await?);
    if q.watch {
        let mut stream = c
            .watch_namespaces(pb::WatchNamespacesRequest {})
            .await
            .map_err(|s| conn.status(s))?
            .into_inner();
        while let Some(ev) = stream.message().await.map_err(|s| conn.status(s))? {
            let ty = match pb::EventType::try_from(ev.r#type).unwrap_or(pb::EventType::Unspecified) {
                pb::EventType::Added => "ADDED",
                pb::EventType::Modified => "MODIFIED",
                pb::EventType::Deleted => "DELETED",
                pb::EventType::Unspecified => "UNKNOWN",
            };
            println!("{ty:<10} {}", ev.namespace.map(|n| n.name).unwrap_or_default());
        }
        return Ok(());
    }
    let list = match &q.name {
        Some(n) => vec![c
            .get_namespace(pb::GetNamespaceRequest { name: n.clone() })
            .await
            .map_err(|s| conn.status(s))?
            .into_inner()],
        None => super::paged(|token| {
            let mut c = c.clone();
            async move {
                let r = c
                    .list_namespaces(pb::ListNamespacesRequest {
                        limit: super::PAGE,
                        continue_token: token,
                    })
                    .await?
                    .into_inner();
                Ok((r.namespaces, r.continue_token))
            }
        })
        .await
        .map_err(|s| conn.status(s))?,
    };
    print_namespaces(&list, q.format);
    Ok(())
}
