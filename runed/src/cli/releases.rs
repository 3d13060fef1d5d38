//! `rune release list|status|delete` and `rune rollback`.

use std::time::{Duration, Instant};

use rune_proto::v1 as pb;
use serde_json::json;

use super::instances::{wait_rollout, WaitArgs};
use super::output::{age, print_table};
use super::{CliError, Conn, Format};

fn client(ch: super::Chan) -> pb::service_api_client::ServiceApiClient<super::Chan> {
    pb::service_api_client::ServiceApiClient::new(ch)
}

fn release_json(r: &pb::Release) -> serde_json::Value {
    let s = r.spec.clone().unwrap_or_default();
    let m = r.meta.clone().unwrap_or_default();
    json!({
        "name": s.name, "namespace": s.namespace, "runeset": s.runeset, "version": s.version,
        "description": s.description, "valuesDigest": s.values_digest, "revision": r.revision,
        "createdAtMs": m.created_at_ms, "updatedAtMs": m.updated_at_ms,
        "resources": r.resources.iter().map(|x| json!({
            "kind": x.kind, "namespace": x.namespace, "name": x.name, "present": x.present, "status": x.status,
        })).collect::<Vec<_>>(),
    })
}

/// JSON or YAML, as `-o` asked, for commands whose output is one value.
pub(crate) fn print_structured(v: &serde_json::Value, format: Format) {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", crate::yaml::emit(v));
    }
}

/// `rune release list [-A]`.
pub async fn list(conn: &Conn, all: bool, format: Format) -> Result<(), CliError> {
    let list = client(conn.channel().await?)
        .list_releases(pb::ListReleasesRequest {
            namespace: if all { "*".into() } else { conn.namespace.clone() },
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner()
        .releases;
    if !format.is_table() {
        print_structured(
            &serde_json::Value::Array(list.iter().map(release_json).collect()),
            format,
        );
        return Ok(());
    }
    if list.is_empty() {
        eprintln!("No releases found.");
        return Ok(());
    }
    let mut rows = vec![[
        "NAMESPACE",
        "NAME",
        "RUNESET",
        "VERSION",
        "REVISION",
        "RESOURCES",
        "UPDATED",
    ]
    .map(String::from)
    .to_vec()];
    for r in &list {
        let s = r.spec.clone().unwrap_or_default();
        let present = r.resources.iter().filter(|x| x.present).count();
        rows.push(vec![
            s.namespace,
            s.name,
            s.runeset,
            s.version,
            r.revision.to_string(),
            format!("{present}/{}", r.resources.len()),
            age(r.meta.as_ref().map_or(0, |m| m.updated_at_ms)),
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// `rune release status NAME`.
pub async fn status(conn: &Conn, name: &str, format: Format) -> Result<(), CliError> {
    let r = client(conn.channel().await?)
        .get_release(pb::ReleaseRef {
            namespace: conn.namespace.clone(),
            name: name.into(),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    if !format.is_table() {
        print_structured(&release_json(&r), format);
        return Ok(());
    }
    let s = r.spec.clone().unwrap_or_default();
    let m = r.meta.clone().unwrap_or_default();
    println!("Release:   {}/{}", s.namespace, s.name);
    println!("Runeset:   {} {}", s.runeset, s.version);
    if !s.description.is_empty() {
        println!("About:     {}", s.description);
    }
    println!("Revision:  {} (updated {})", r.revision, age(m.updated_at_ms));
    println!("Values:    {}", s.values_digest);
    println!();
    let mut rows = vec![["KIND", "NAMESPACE", "NAME", "STATUS"].map(String::from).to_vec()];
    for x in &r.resources {
        let st = match (x.present, x.status.as_str()) {
            (false, _) => "missing (deleted outside the release)".to_string(),
            (true, "") => "present".to_string(),
            (true, st) => st.to_string(),
        };
        rows.push(vec![x.kind.clone(), x.namespace.clone(), x.name.clone(), st]);
    }
    print_table(&rows);
    Ok(())
}

/// `rune release delete NAME [--delete-volumes]`: the release and what it cast go in one write;
/// volumes are the engine's, so they are deleted after, once no container of the release holds
/// them (the services' instances stop first, within their grace periods).
pub async fn delete(
    conn: &Conn,
    name: &str,
    force: bool,
    delete_volumes: bool,
    timeout: Duration,
) -> Result<(), CliError> {
    let r = client(conn.channel().await?)
        .delete_release(pb::DeleteReleaseRequest {
            namespace: conn.namespace.clone(),
            name: name.into(),
            force,
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    for d in &r.deleted {
        println!("{d} deleted");
    }
    let mut inst = pb::instance_api_client::InstanceApiClient::new(conn.channel().await?);
    let ours = |v: &pb::Volume| {
        (!v.service.is_empty() && r.services.contains(&v.service))
            || (v.service.is_empty() && r.claims.contains(&v.claim))
    };
    let volumes: Vec<pb::Volume> = inst
        .list_volumes(pb::ListVolumesRequest {
            namespace: conn.namespace.clone(),
            all_namespaces: false,
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner()
        .volumes
        .into_iter()
        .filter(|v| ours(v))
        .collect();
    if !delete_volumes {
        if !volumes.is_empty() {
            let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
            println!(
                "kept {} volume(s): {} (rune volume delete NAME, or --delete-volumes)",
                names.len(),
                names.join(", ")
            );
        }
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let mut left = volumes;
    while !left.is_empty() {
        let mut still = Vec::new();
        for v in left {
            let res = inst
                .delete_volume(pb::DeleteVolumeRequest {
                    namespace: v.namespace.clone(),
                    name: v.name.clone(),
                })
                .await;
            match res {
                Ok(_) => println!("volume/{}/{} deleted", v.namespace, v.name),
                Err(s) if s.code() == tonic::Code::NotFound => {}
                // Still held by a container of the release that is stopping.
                Err(s) if s.code() == tonic::Code::FailedPrecondition && Instant::now() < deadline => {
                    still.push(v)
                }
                Err(s) => return Err(conn.status(s)),
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

/// `rune rollback SERVICE [--to-generation N]`.
pub async fn rollback(
    conn: &Conn,
    name: &str,
    to: Option<u64>,
    wait: Option<&WaitArgs>,
) -> Result<(), CliError> {
    let r = client(conn.channel().await?)
        .rollback(pb::RollbackRequest {
            namespace: conn.namespace.clone(),
            name: name.into(),
            to_generation: to.unwrap_or(0),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    if !r.changed {
        println!("service/{}/{name} unchanged: {}", conn.namespace, r.summary);
        return Ok(());
    }
    println!(
        "service/{}/{name} {} (generation {})",
        conn.namespace, r.summary, r.generation
    );
    match wait {
        Some(w) => wait_rollout(conn, &conn.namespace, name, w, Instant::now()).await,
        None => Ok(()),
    }
}
