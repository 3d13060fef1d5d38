//! The SecretApi (secrets and configmaps) and `rune admin rotate-kek`, over [`crate::sealing`].

use rune_proto::v1 as pb;
use rune_secrets::Kek;
use rune_statemachine::secret::{SealedSecret, SecretData};
use rune_statemachine::store::{
    configmap_history, configmap_key, configmaps_prefix, get_record, secret_history_prefix, secret_key,
    secrets_prefix, ConfigmapRecord, ObjectMeta, SecretRecord,
};
use rune_statemachine::{Command, STATE_TABLE};
use tonic::{Request, Response, Status};

use crate::api::Api;
use crate::auth::{admin_gate, authorize};
use crate::grpc::{internal, namespace_or_default, not_proposed, rejection, scope};

fn meta_pb(m: &ObjectMeta) -> pb::ObjectMeta {
    pb::ObjectMeta {
        created_at_ms: m.created_at_ms,
        updated_at_ms: m.updated_at_ms,
        generation: m.generation,
        spec_hash: String::new(),
        resource_version: m.resource_version,
        last_non_zero_scale: 0,
    }
}

fn secret_pb(s: &SealedSecret, meta: &ObjectMeta, data: Option<SecretData>) -> pb::Secret {
    pb::Secret {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        r#type: s.type_.clone(),
        version: s.version,
        keys: s.keys.clone(),
        data: data.map(|d| d.into_iter().collect()).unwrap_or_default(),
        meta: Some(meta_pb(meta)),
        kek_id: s.kek_id.clone(),
    }
}

fn configmap_pb(r: &ConfigmapRecord) -> pb::Configmap {
    pb::Configmap {
        namespace: r.configmap.namespace.clone(),
        name: r.configmap.name.clone(),
        data: r.configmap.data.clone().into_iter().collect(),
        meta: Some(meta_pb(&r.meta)),
    }
}

fn configmap_record<R>(t: &R, ns: &str, name: &str) -> Result<ConfigmapRecord, Status>
where
    R: redb::ReadableTable<&'static str, &'static [u8]>,
{
    get_record::<ConfigmapRecord, _>(t, &configmap_key(ns, name))
        .map_err(internal)?
        .ok_or_else(|| Status::not_found(format!("configmap {ns}/{name} not found")))
}

#[tonic::async_trait]
impl pb::secret_api_server::SecretApi for Api {
    async fn get_secret(&self, req: Request<pb::GetSecretRequest>) -> Result<Response<pb::Secret>, Status> {
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(&req, "secrets", "get", Some(&ns))?;
        if req.get_ref().show_values {
            authorize(&req, "secrets", "reveal", Some(&ns))?;
        }
        let req = req.into_inner();
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let rec = get_record::<SecretRecord, _>(&t, &secret_key(&ns, &req.name))
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("secret {ns}/{} not found", req.name)))?;
        let sealed = if req.version == 0 || req.version == rec.sealed.version {
            rec.sealed.clone()
        } else {
            let key = format!("{}{:020}", secret_history_prefix(&ns, &req.name), req.version);
            get_record::<SealedSecret, _>(&t, &key)
                .map_err(internal)?
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "secret {ns}/{} has no kept version {}",
                        req.name, req.version
                    ))
                })?
        };
        let data = if req.show_values {
            Some(self.secrets.open(&sealed).map_err(Status::failed_precondition)?)
        } else {
            None
        };
        Ok(Response::new(secret_pb(&sealed, &rec.meta, data)))
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let ns = scope(&req.get_ref().namespace);
        authorize(&req, "secrets", "list", ns.as_deref())?;
        let req = req.into_inner();
        let q = crate::paging::PageQuery::new(
            "secrets",
            secrets_prefix(ns.as_deref()),
            req.limit,
            &req.continue_token,
        )?;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let (recs, continue_token) = q.read(&t, |_: &SecretRecord| true)?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: recs.iter().map(|r| secret_pb(&r.sealed, &r.meta, None)).collect(),
            continue_token,
        }))
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteObjectRequest>,
    ) -> Result<Response<pb::DeleteObjectResponse>, Status> {
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(&req, "secrets", "delete", Some(&ns))?;
        let pb::DeleteObjectRequest { name, force, .. } = req.into_inner();
        if let Some(entry) = self.orchestrator.registry_using(&ns, &name).filter(|_| !force) {
            // A secret that does not exist is left to the delete, which answers NotFound.
            let txn = self.log.read().map_err(internal)?;
            let t = txn.open_table(STATE_TABLE).map_err(internal)?;
            if t.get(secret_key(&ns, &name).as_str())
                .map_err(internal)?
                .is_some()
            {
                return Err(Status::failed_precondition(format!(
                    "cannot delete secret {ns}/{name}: this node's runefile pulls the images of \
                     docker.registries entry '{entry}' with it (auth.fromSecret); change the \
                     runefile first (use --force to delete anyway)"
                )));
            }
        }
        let p = self
            .log
            .propose(Command::DeleteSecret {
                namespace: ns,
                name,
                force,
            })
            .await
            .map_err(not_proposed)?;
        p.outcome.map_err(rejection)?;
        Ok(Response::new(pb::DeleteObjectResponse { index: p.index }))
    }

    async fn get_configmap(&self, req: Request<pb::ObjectRef>) -> Result<Response<pb::Configmap>, Status> {
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(&req, "configmaps", "get", Some(&ns))?;
        let name = req.into_inner().name;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let rec = configmap_record(&t, &ns, &name)?;
        Ok(Response::new(configmap_pb(&rec)))
    }

    async fn configmap_history(
        &self,
        req: Request<pb::ObjectRef>,
    ) -> Result<Response<pb::ConfigmapHistoryResponse>, Status> {
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(&req, "configmaps", "get", Some(&ns))?;
        let name = req.into_inner().name;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let rec = configmap_record(&t, &ns, &name)?;
        let mut versions: Vec<pb::Configmap> = configmap_history(&t, &ns, &name)
            .map_err(internal)?
            .into_iter()
            .rev()
            .map(|v| pb::Configmap {
                namespace: v.configmap.namespace,
                name: v.configmap.name,
                data: v.configmap.data.into_iter().collect(),
                meta: Some(pb::ObjectMeta {
                    created_at_ms: v.created_at_ms,
                    updated_at_ms: v.created_at_ms,
                    generation: v.version,
                    ..Default::default()
                }),
            })
            .collect();
        // A configmap cast before versions were kept has none until its next change.
        if versions
            .first()
            .and_then(|v| v.meta.as_ref())
            .is_none_or(|m| m.generation != rec.meta.generation)
        {
            versions.insert(0, configmap_pb(&rec));
        }
        Ok(Response::new(pb::ConfigmapHistoryResponse { versions }))
    }

    async fn list_configmaps(
        &self,
        req: Request<pb::ListConfigmapsRequest>,
    ) -> Result<Response<pb::ListConfigmapsResponse>, Status> {
        let ns = scope(&req.get_ref().namespace);
        authorize(&req, "configmaps", "list", ns.as_deref())?;
        let req = req.into_inner();
        let q = crate::paging::PageQuery::new(
            "configmaps",
            configmaps_prefix(ns.as_deref()),
            req.limit,
            &req.continue_token,
        )?;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        let (recs, continue_token) = q.read(&t, |_: &ConfigmapRecord| true)?;
        Ok(Response::new(pb::ListConfigmapsResponse {
            configmaps: recs.iter().map(configmap_pb).collect(),
            continue_token,
        }))
    }

    async fn delete_configmap(
        &self,
        req: Request<pb::DeleteObjectRequest>,
    ) -> Result<Response<pb::DeleteObjectResponse>, Status> {
        let ns = namespace_or_default(&req.get_ref().namespace).to_string();
        authorize(&req, "configmaps", "delete", Some(&ns))?;
        let pb::DeleteObjectRequest { name, force, .. } = req.into_inner();
        let p = self
            .log
            .propose(Command::DeleteConfigmap {
                namespace: ns,
                name,
                force,
            })
            .await
            .map_err(not_proposed)?;
        p.outcome.map_err(rejection)?;
        Ok(Response::new(pb::DeleteObjectResponse { index: p.index }))
    }
}

/// `rune admin rotate-kek`: admin-gated, needs `update` on `admin`.
pub(crate) async fn rotate_kek(
    api: &Api,
    req: Request<pb::RotateKekRequest>,
) -> Result<pb::RotateKekResponse, Status> {
    admin_gate(&req, api.allow_remote_admin)?;
    authorize(&req, "admin", "update", None)?;
    let new = Kek::parse(&req.into_inner().new_kek)
        .map_err(|e| Status::invalid_argument(format!("new_kek: {e}")))?;
    // Every member keeps the KEK in its own file: rotating on one would leave the others
    // unable to open what it re-wraps.
    let members = api.log.cluster_status().members.len();
    if members > 1 {
        return Err(Status::failed_precondition(format!(
            "this cluster has {members} members, each with its own copy of the KEK; rotating it across members is not supported yet"
        )));
    }
    api.secrets.rotate(&api.log, new).await
}
