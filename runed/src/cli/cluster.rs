//! `rune admin cluster status`: this node's view of the raft cluster, as `etcdctl endpoint
//! status` shows etcd's.

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
    if !format.is_table() {
        print_structured(&status_json(&s), format);
        return Ok(());
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
    let mut rows = vec![["MEMBER", "ADDRESS", "VOTER", "ROLE", "MATCHED"]
        .map(String::from)
        .to_vec()];
    for m in &s.members {
        let role = if Some(m.id) == s.leader_id {
            "leader"
        } else if m.voter {
            "follower"
        } else {
            "learner"
        };
        rows.push(vec![
            m.id.to_string(),
            m.address.clone(),
            if m.voter { "yes" } else { "no" }.into(),
            role.into(),
            opt(m.matched_index),
        ]);
    }
    print_table(&rows);
    Ok(())
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
        })).collect::<Vec<_>>(),
    })
}
