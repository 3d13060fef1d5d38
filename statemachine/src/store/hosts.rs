//! Apply for exposed hosts: a host routes to one service, so the second service to claim it is
//! refused at cast time, naming the holder, instead of being silently shadowed at the edge.

use redb::ReadableTable;

use super::{services_prefix, Overlay, ServiceRecord, StoreError};
use crate::command::Rejection;
use crate::network::{host_key, VipHolder};
use crate::spec::ServiceSpec;

pub(super) fn host_of(spec: &ServiceSpec) -> Option<String> {
    spec.expose.as_ref().and_then(|e| e.host())
}

/// Moves the service's claim from the host it exposed (`before`) to the host of `new`; refused
/// when another service holds the new host.
pub(super) fn claim<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    before: Option<String>,
    new: &ServiceSpec,
) -> Result<Result<(), Rejection>, StoreError> {
    let (ns, name) = (new.namespace().to_string(), new.name.clone());
    let after = host_of(new);
    if let Some(host) = &after {
        let key = host_key(host);
        match o.get::<VipHolder>(&key)? {
            Some(h) if h.namespace == ns && h.service == name => {}
            Some(h) => return Ok(Err(Rejection::AlreadyExists(taken(&ns, &name, host, &h)))),
            None => o.put(
                key,
                VipHolder {
                    namespace: ns.clone(),
                    service: name.clone(),
                },
            ),
        }
    }
    if let Some(host) = before.filter(|b| after.as_ref() != Some(b)) {
        release(o, &ns, &name, &host)?;
    }
    Ok(Ok(()))
}

/// Why `namespace/service` cannot have `host`: `holder` has it.
pub fn taken(namespace: &str, service: &str, host: &str, holder: &VipHolder) -> String {
    format!(
        "service {namespace}/{service}: expose.host: {host} is already exposed by service {}/{}; \
         one host routes to one service",
        holder.namespace, holder.service
    )
}

/// The host `spec` would claim and who holds it now, when that is another service: what a
/// cast of `spec` would be refused for (for the API's prediction; apply decides).
pub fn claimed_by_other<R: ReadableTable<&'static str, &'static [u8]>>(
    table: &R,
    spec: &ServiceSpec,
) -> Result<Option<(String, VipHolder)>, StoreError> {
    let Some(host) = host_of(spec) else {
        return Ok(None);
    };
    let holder = super::get_record::<VipHolder, _>(table, &host_key(&host))?;
    Ok(holder
        .filter(|h| !(h.namespace == spec.namespace() && h.service == spec.name))
        .map(|h| (host, h)))
}

/// Gives up the service's claim on `host`, if it holds it.
pub(super) fn release<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    namespace: &str,
    service: &str,
    host: &str,
) -> Result<(), StoreError> {
    let key = host_key(host);
    if o.get::<VipHolder>(&key)?
        .is_some_and(|h| h.namespace == namespace && h.service == service)
    {
        o.delete(key);
    }
    Ok(())
}

/// Claims the hosts of services cast before claims existed, first by namespace and name (the
/// one the ingress served); a service whose host is held by another keeps running unrouted.
pub(super) fn backfill<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
) -> Result<(), StoreError> {
    for k in o.keys_with_prefix(&services_prefix(None))? {
        let Some(rec) = o.get::<ServiceRecord>(&k)? else {
            continue;
        };
        if let Some(host) = host_of(&rec.spec) {
            let key = host_key(&host);
            if !o.contains(&key)? {
                o.put(
                    key,
                    VipHolder {
                        namespace: rec.spec.namespace().to_string(),
                        service: rec.spec.name.clone(),
                    },
                );
            }
        }
    }
    Ok(())
}

/// Whether some exposed service has no claim on its host (a state written before claims).
/// A record that does not decode is passed over: it is the reconcilers' to report, and must not
/// keep runed from starting.
pub fn unclaimed<R: ReadableTable<&'static str, &'static [u8]>>(table: &R) -> Result<bool, StoreError> {
    for (k, v) in super::scan_prefix(table, &services_prefix(None))? {
        let Ok(rec) = super::decode::<ServiceRecord>(&k, &v) else {
            continue;
        };
        if let Some(host) = host_of(&rec.spec) {
            if super::get_record::<VipHolder, _>(table, &host_key(&host))?.is_none() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
