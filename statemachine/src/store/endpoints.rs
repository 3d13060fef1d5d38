//! Apply for endpoints: recomputed from the instance records of a service whenever a command
//! touches the service or its instances, and stored only when they changed.

use redb::ReadableTable;

use super::{change, service_key, Overlay, ServiceRecord, StoreError};
use crate::command::{Action, Change, Kind};
use crate::instance::{instances_prefix, InstanceRecord, Phase};
use crate::network::{endpoints_key, Endpoint, EndpointPort, EndpointSet};

/// The service's endpoints as the state now says; a change when they differ from the stored.
pub(super) fn recompute<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    ns: &str,
    service: &str,
) -> Result<Option<Change>, StoreError> {
    let key = endpoints_key(ns, service);
    let stored = o.get::<EndpointSet>(&key)?;
    let Some(svc) = o.get_shared::<ServiceRecord>(&service_key(ns, service))? else {
        if stored.is_some() {
            o.delete(key);
            return Ok(Some(change(
                Kind::Endpoints,
                ns,
                service,
                Action::Deleted,
                0,
                "service deleted",
            )));
        }
        return Ok(None);
    };
    let ports = EndpointPort::of_spec(&svc.spec.ports);
    let mut endpoints = Vec::new();
    for k in o.keys_with_prefix(&instances_prefix(Some(ns), Some(service)))? {
        if let Some(i) = o.get::<InstanceRecord>(&k)? {
            if i.phase == Phase::Running && i.ready && !i.address.is_empty() {
                // An instance still running an earlier spec listens where that spec said.
                let ports = if i.ports.is_empty() {
                    ports.clone()
                } else {
                    EndpointPort::serving(&ports, &i.ports)
                };
                endpoints.push(Endpoint {
                    instance: i.id,
                    address: i.address,
                    node: i.node,
                    ports,
                });
            }
        }
    }
    let set = EndpointSet {
        namespace: ns.into(),
        service: service.into(),
        endpoints,
    };
    if stored.as_ref() == Some(&set) || (stored.is_none() && set.endpoints.is_empty()) {
        return Ok(None);
    }
    let summary = format!(
        "{} ready: {}",
        set.endpoints.len(),
        set.endpoints
            .iter()
            .map(|e| format!("{}@{}", e.instance, e.address))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let action = if stored.is_some() {
        Action::Configured
    } else {
        Action::Created
    };
    o.put(key, set);
    Ok(Some(change(Kind::Endpoints, ns, service, action, 0, &summary)))
}
