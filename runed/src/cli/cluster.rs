//! `rune admin cluster status`: this node's view of the raft cluster, as `etcdctl endpoint
//! status` shows etcd's; `join-token` and `remove`, the membership changes an operator makes.

use rune_proto::v1 as pb;
use serde_json::json;

use super::output::print_table;
use super::releases::print_structured;
use super::{CliError, Conn, Format};

/// `rune admin cluster status [-o json|yaml]`.
pub async fn status(conn: &Conn, format: Format) -> Result<(), CliError> {
    let s = pb::admin_api_client::AdminApiClient::new(conn.channel().await?)
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map_err(|e| conn.status(e))?
        .into_inner();
    print_status(&s, format);
    Ok(())
}

/// `rune admin cluster join-token [--ttl D] [--out-file F]`.
pub async fn join_token(
    conn: &Conn,
    ttl: Option<std::time::Duration>,
    out_file: Option<&std::path::Path>,
) -> Result<(), CliError> {
    let r = pb::admin_api_client::AdminApiClient::new(conn.channel().await?)
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: ttl.map_or(0, |d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)),
        })
        .await
        .map_err(|e| conn.status(e))?
        .into_inner();
    let expires = r
        .expires_at_ms
        .map(|ms| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
            )
            .to_string()
        })
        .unwrap_or_else(|| "never".into());
    let members = r.members.join(" or ");
    match out_file {
        Some(p) => {
            super::identity::write_private(p, &r.join_token)?;
            eprintln!(
                "join token (API token {}, expires {expires}) written to {}",
                r.token_id,
                p.display()
            );
        }
        None => {
            eprintln!(
                "join token (API token {}, expires {expires}); it is shown only once:",
                r.token_id
            );
            println!("{}", r.join_token);
        }
    }
    eprintln!(
        "on the new node: runed --raft-listen <its address:port> --join {members} --join-token-file <file>"
    );
    Ok(())
}

/// `rune admin cluster remove NODE`.
pub async fn remove(conn: &Conn, node: u64, format: Format) -> Result<(), CliError> {
    let s = pb::admin_api_client::AdminApiClient::new(conn.channel().await?)
        .remove_cluster_member(pb::RemoveClusterMemberRequest { node_id: node })
        .await
        .map_err(|e| conn.status(e))?
        .into_inner();
    eprintln!("node {node} removed from the cluster");
    print_status(&s, format);
    Ok(())
}

fn print_status(s: &pb::ClusterStatusResponse, format: Format) {
    if !format.is_table() {
        print_structured(&status_json(s), format);
        return;
    }
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    print_table(&[
        [
            "CLUSTER",
            "NODE",
            "ROLE",
            "TERM",
            "LEADER",
            "LAST",
            "COMMITTED",
            "APPLIED",
            "SNAPSHOT",
        ]
        .map(String::from)
        .to_vec(),
        vec![
            s.cluster_id.clone(),
            s.node_id.to_string(),
            s.role.clone(),
            s.term.to_string(),
            opt(s.leader_id),
            s.last_index.to_string(),
            opt(s.committed_index),
            s.applied_index.to_string(),
            opt(s.snapshot_index),
        ],
    ]);
    println!();
    // Each member as it answered for itself: who it follows in which term, how far it applied.
    let mut rows = vec![[
        "MEMBER", "ADDRESS", "VOTER", "ROLE", "TERM", "LEADER", "LAST", "APPLIED", "MATCHED",
    ]
    .map(String::from)
    .to_vec()];
    for m in &s.members {
        let (role, term, last, applied) = if m.role.is_empty() {
            let why = if m.error.is_empty() {
                "-".to_string()
            } else {
                format!("unreachable: {}", m.error)
            };
            (why, "-".into(), "-".into(), "-".into())
        } else {
            (
                m.role.clone(),
                m.term.to_string(),
                m.last_index.to_string(),
                m.applied_index.to_string(),
            )
        };
        rows.push(vec![
            m.id.to_string(),
            m.address.clone(),
            if m.voter { "yes" } else { "no" }.into(),
            role,
            term,
            opt(m.leader_id),
            last,
            applied,
            opt(m.matched_index),
        ]);
    }
    print_table(&rows);
}

fn status_json(s: &pb::ClusterStatusResponse) -> serde_json::Value {
    json!({
        "clusterId": s.cluster_id,
        "node": s.node_id,
        "role": s.role,
        "term": s.term,
        "leader": s.leader_id,
        "lastIndex": s.last_index,
        "committedIndex": s.committed_index,
        "appliedIndex": s.applied_index,
        "snapshotIndex": s.snapshot_index,
        "purgedIndex": s.purged_index,
        "millisSinceQuorumAck": s.millis_since_quorum_ack,
        "members": s.members.iter().map(|m| json!({
            "id": m.id,
            "address": m.address,
            "voter": m.voter,
            "matchedIndex": m.matched_index,
            "role": (!m.role.is_empty()).then_some(&m.role),
            "term": (!m.role.is_empty()).then_some(m.term),
            "leader": m.leader_id,
            "lastIndex": (!m.role.is_empty()).then_some(m.last_index),
            "appliedIndex": (!m.role.is_empty()).then_some(m.applied_index),
            "error": (!m.error.is_empty()).then_some(&m.error),
        })).collect::<Vec<_>>(),
    })
}
