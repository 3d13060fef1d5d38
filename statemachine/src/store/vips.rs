//! Apply for VIPs: allocation at a service's first cast, release into a cooldown at its delete.

use redb::ReadableTable;

use super::{services_prefix, Overlay, ServiceRecord, StoreError};
use crate::command::Rejection;
use crate::network::{
    dotted, vip_key, Cidr, NetworkConfig, VipHolder, CONFIG_KEY, CURSOR_KEY, RELEASED_PREFIX, VIPS_PREFIX,
    VIP_COOLDOWN_MS,
};

/// The stored cluster network, if one was set.
fn config<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
) -> Result<Option<Cidr>, StoreError> {
    Ok(o.get::<NetworkConfig>(CONFIG_KEY)?
        .and_then(|c| Cidr::parse(&c.cluster_cidr).ok()))
}

/// Gives the service a VIP: the next free address after the cursor that is not cooling down.
/// `Ok(None)` when no cluster network is configured (logs written before VIPs existed).
pub(super) fn allocate<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    namespace: &str,
    service: &str,
) -> Result<Result<Option<String>, Rejection>, StoreError> {
    let Some(cidr) = config(o)? else {
        return Ok(Ok(None));
    };
    let (first, last) = cidr.usable();
    let mut at = o
        .get::<u32>(CURSOR_KEY)?
        .filter(|c| (first..=last).contains(c))
        .unwrap_or(first);
    let (mut used, mut cooling) = (0u64, 0u64);
    for _ in 0..=u64::from(last - first) {
        let candidate = at;
        at = if at >= last { first } else { at + 1 };
        if o.contains(&vip_key(VIPS_PREFIX, candidate))? {
            used += 1;
            continue;
        }
        let released = vip_key(RELEASED_PREFIX, candidate);
        if let Some(when) = o.get::<i64>(&released)? {
            if now - when < VIP_COOLDOWN_MS {
                cooling += 1;
                continue;
            }
            o.delete(released);
        }
        o.put(
            vip_key(VIPS_PREFIX, candidate),
            VipHolder {
                namespace: namespace.into(),
                service: service.into(),
            },
        );
        o.put(CURSOR_KEY.to_string(), at);
        return Ok(Ok(Some(dotted(candidate))));
    }
    Ok(Err(Rejection::FailedPrecondition(format!(
        "no free VIP in the cluster network {}/{}: {used} in use, {cooling} released less than {} s ago; \
         delete services or widen networking.cluster-cidr",
        dotted(cidr.base),
        cidr.prefix,
        VIP_COOLDOWN_MS / 1000
    ))))
}

/// Returns a service's VIP to the pool, held back for the cooldown.
pub(super) fn release<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    vip: &str,
) {
    if let Ok(ip) = vip.parse::<std::net::Ipv4Addr>() {
        let ip = u32::from(ip);
        o.delete(vip_key(VIPS_PREFIX, ip));
        o.put(vip_key(RELEASED_PREFIX, ip), now);
    }
}

/// Sets the cluster network and gives every service without a VIP one. Services keep the VIPs
/// they have even when the range changes: a VIP is stable for the life of its service.
pub(super) fn set_network<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    cidr: &str,
) -> Result<Result<usize, Rejection>, StoreError> {
    if let Err(m) = Cidr::parse(cidr) {
        return Ok(Err(Rejection::Invalid(format!("networking.cluster-cidr: {m}"))));
    }
    let want = NetworkConfig {
        cluster_cidr: cidr.trim().to_string(),
    };
    if o.get::<NetworkConfig>(CONFIG_KEY)?.as_ref() != Some(&want) {
        o.put(CONFIG_KEY.to_string(), want);
        o.delete(CURSOR_KEY.to_string());
    }
    let mut given = 0;
    for k in o.keys_with_prefix(&services_prefix(None))? {
        let Some(mut rec) = o.get::<ServiceRecord>(&k)? else {
            continue;
        };
        if rec.vip.is_some() {
            continue;
        }
        let (ns, name) = (rec.spec.namespace().to_string(), rec.spec.name.clone());
        match allocate(o, now, &ns, &name)? {
            Ok(vip) => rec.vip = vip,
            Err(r) => return Ok(Err(r)),
        }
        o.put(k, rec);
        given += 1;
    }
    Ok(Ok(given))
}
