//! Prometheus metrics through OpenTelemetry: the exporter, and the gauges and counters runed
//! reads at scrape time. Every family the seeds name is exported from start, zero where nothing
//! happened yet (after a restart too), so dashboards and alerts never see a family vanish.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use opentelemetry::metrics::MeterProvider;
use rune_log::Log;

/// Sets up the OpenTelemetry meter provider exporting into a Prometheus registry.
pub fn init() -> anyhow::Result<(prometheus::Registry, opentelemetry_sdk::metrics::SdkMeterProvider)> {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .scope_info_enabled(false)
        .build()
        .context("building the Prometheus exporter")?;
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(exporter)
        .build();
    opentelemetry::global::set_meter_provider(provider.clone());
    Ok((registry, provider))
}

/// The log's positions, raft's view of the cluster, and the data dir's free space and reserve.
pub fn log_gauges(provider: &opentelemetry_sdk::metrics::SdkMeterProvider, log: &Arc<Log>) {
    let meter = provider.meter("rune");
    // Raft's per-node view as well, under etcd's names (`server_has_leader`,
    // `server_is_leader`, `server_leader_changes_seen_total`), and lag per member where this
    // node leads.
    type Gauge = (&'static str, &'static str, fn(&rune_log::ClusterStatus) -> u64);
    let gauges: [Gauge; 7] = [
        (
            "rune_log_applied_index",
            "Last log index applied to the state machine",
            |s| s.applied,
        ),
        ("rune_log_last_index", "Last log index written", |s| s.last_index),
        (
            "rune_log_apply_lag_entries",
            "Entries written but not yet applied",
            |s| s.last_index.saturating_sub(s.applied),
        ),
        ("rune_log_term", "Current raft term", |s| s.term),
        ("rune_log_has_leader", "1 while this node knows a leader", |s| {
            u64::from(s.leader.is_some())
        }),
        ("rune_log_is_leader", "1 while this node leads", |s| {
            u64::from(s.leader == Some(s.node))
        }),
        (
            "rune_log_committed_index",
            "Last log index a quorum of voters holds (known where this node leads)",
            |s| s.committed.unwrap_or(0),
        ),
    ];
    for (name, help, f) in gauges {
        let log = Arc::downgrade(log);
        meter
            .u64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |o| {
                if let Some(log) = log.upgrade() {
                    o.observe(f(&log.cluster_status()), &[]);
                }
            })
            .build();
    }
    let weak = Arc::downgrade(log);
    meter
        .u64_observable_counter("rune_log_leader_changes_seen")
        .with_description("Times this node saw a new leader since it started")
        .with_callback(move |o| {
            if let Some(log) = weak.upgrade() {
                o.observe(log.leader_changes(), &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(log);
    meter
        .u64_observable_gauge("rune_log_replication_lag_entries")
        .with_description("Entries a member's disk is behind this leader's log (per member; leaders only)")
        .with_callback(move |o| {
            if let Some(log) = weak.upgrade() {
                let s = log.cluster_status();
                for m in &s.members {
                    if let Some(matched) = m.matched {
                        o.observe(
                            s.last_index.saturating_sub(matched),
                            &[opentelemetry::KeyValue::new("member", m.id.to_string())],
                        );
                    }
                }
            }
        })
        .build();
    // Placement in a cluster, per registered node (none on a single node): read from the state
    // at scrape time, as every member sees it.
    type NodeGauge = (
        &'static str,
        &'static str,
        fn(&rune_statemachine::store::nodes::NodeRecord) -> u64,
    );
    let node_gauges: [NodeGauge; 2] = [
        (
            "rune_cluster_node_ready",
            "1 while the node takes instances; 0 once the leader found it silent past cluster.node-grace",
            |n| u64::from(n.ready),
        ),
        (
            "rune_cluster_instances_placed",
            "Instances placed on the node",
            |n| n.placed,
        ),
    ];
    for (name, help, f) in node_gauges {
        let weak = Arc::downgrade(log);
        meter
            .u64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |o| {
                let Some(log) = weak.upgrade() else { return };
                for n in crate::cluster::nodes(&log).unwrap_or_default() {
                    o.observe(f(&n), &[opentelemetry::KeyValue::new("node", n.name.clone())]);
                }
            })
            .build();
    }
    let weak = Arc::downgrade(log);
    meter
        .u64_observable_gauge("rune_storage_free_bytes")
        .with_description("Bytes free on the data dir's file system; writes are refused below the reserve")
        .with_callback(move |o| {
            if let Some(log) = weak.upgrade() {
                o.observe(log.space().free(), &[]);
            }
        })
        .build();
    let reserve = log.space().reserve();
    meter
        .u64_observable_gauge("rune_storage_reserve_bytes")
        .with_description("Bytes kept free on the data dir's file system (storage.reserve)")
        .with_callback(move |o| o.observe(reserve, &[]))
        .build();
}

/// The data plane's gauges and counters, read at scrape time.
pub fn dataplane(
    provider: &opentelemetry_sdk::metrics::SdkMeterProvider,
    dp: &Arc<rune_dataplane::DataPlane>,
) {
    use opentelemetry::KeyValue;
    let meter = provider.meter("rune");
    let svc_labels = |k: &rune_dataplane::policy::SvcKey| {
        vec![
            KeyValue::new("namespace", k.ns.clone()),
            KeyValue::new("service", k.name.clone()),
        ]
    };
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_counter("rune_policy_drops")
        .with_description(
            "Connections denied by network policy, by the proxy or dropped by the kernel (reason)",
        )
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                let drops = d.drops();
                for (k, policy, reason, n) in &drops {
                    let mut l = svc_labels(k);
                    l.push(KeyValue::new("policy", *policy));
                    l.push(KeyValue::new("reason", *reason));
                    o.observe(*n, &l);
                }
                // Zero for every direction of every policy-bearing service nothing dropped yet.
                for (k, _) in d.local_instances() {
                    for policy in ["ingress", "egress"] {
                        if !drops
                            .iter()
                            .any(|(dk, p, r, _)| dk == &k && *p == policy && *r == "proxy")
                        {
                            let mut l = svc_labels(&k);
                            l.push(KeyValue::new("policy", policy));
                            l.push(KeyValue::new("reason", "proxy"));
                            o.observe(0, &l);
                        }
                    }
                }
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_gauge("rune_policy_local_instances")
        .with_description("Instances on this node that network policy applies to")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                o.observe(d.local_instances().iter().map(|(_, n)| *n as u64).sum(), &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_gauge("rune_policy_local_instances_by_service")
        .with_description("Instances on this node that a service's network policy applies to, by service")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                for (k, n) in d.local_instances() {
                    o.observe(n as u64, &svc_labels(&k));
                }
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_gauge("rune_policy_rules")
        .with_description("Network policy rules compiled into the data plane's view")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                o.observe(d.policy_rules() as u64, &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_counter("rune_dataplane_connections")
        .with_description("Connections to service VIPs by result: forwarded, denied, no_endpoint, stale; from_node: taken by this node's gateway for one of its instances")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                for (k, result, n) in d.stats.connections() {
                    let mut l = svc_labels(&k);
                    l.push(KeyValue::new("result", result));
                    o.observe(n, &l);
                }
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_counter("rune_dataplane_bytes")
        .with_description("Bytes carried by finished proxied connections, by direction")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                for (k, direction, n) in d.stats.byte_counts() {
                    let mut l = svc_labels(&k);
                    l.push(KeyValue::new("direction", direction));
                    o.observe(n, &l);
                }
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_counter("rune_dataplane_gateway_refused")
        .with_description(
            "Connections to the node gateway closed unserved: from an address that is no other node's gateway, or without the cluster's gateway key",
        )
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                o.observe(d.stats.gateway_strangers.load(Ordering::Relaxed), &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .i64_observable_gauge("rune_dataplane_active_connections")
        .with_description("Connections open through the proxy")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                o.observe(d.stats.active.load(Ordering::Relaxed), &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(dp);
    meter
        .u64_observable_gauge("rune_dataplane_kernel_enforcement")
        .with_description("1 when runed's nftables table enforces policy, 0 when only the proxy does")
        .with_callback(move |o| {
            if let Some(d) = weak.upgrade() {
                o.observe(u64::from(d.kernel_status().enforcing), &[]);
            }
        })
        .build();
}

/// `rune_vip_allocations_total` and `rune_endpoints_published_total{service,namespace}`, counted
/// from the applied entries' changes, so they count what the log decided, once.
pub fn network_changes(provider: &opentelemetry_sdk::metrics::SdkMeterProvider, log: &Arc<Log>) {
    use rune_statemachine::{Action, Kind};
    let meter = provider.meter("rune");
    let vips = meter
        .u64_counter("rune_vip_allocations")
        .with_description("Service VIPs allocated")
        .build();
    let endpoints = meter
        .u64_counter("rune_endpoints_published")
        .with_description("Changes of a service's endpoints published through the log")
        .build();
    // Zero from the start: every existing service's series, and the allocation count.
    vips.add(0, &[]);
    let known: Vec<(String, String)> = match log.read().map_err(|e| e.to_string()).and_then(|txn| {
        let t = txn
            .open_table(rune_statemachine::STATE_TABLE)
            .map_err(|e| e.to_string())?;
        rune_statemachine::store::list_records::<rune_statemachine::store::ServiceRecord, _>(
            &t,
            &rune_statemachine::store::services_prefix(None),
        )
        .map_err(|e| e.to_string())
    }) {
        Ok(v) => v
            .into_iter()
            .map(|r| (r.spec.namespace().to_string(), r.spec.name))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the services for their metrics");
            Vec::new()
        }
    };
    let labels = |ns: &str, name: &str| {
        [
            opentelemetry::KeyValue::new("service", name.to_string()),
            opentelemetry::KeyValue::new("namespace", ns.to_string()),
        ]
    };
    for (ns, name) in &known {
        endpoints.add(0, &labels(ns, name));
    }
    let mut rx = log.subscribe();
    log.follow("network-metrics", async move {
        loop {
            let entry = match rx.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "network metrics fell behind the log; counts are low");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for c in &entry.changes {
                match (c.kind, c.action) {
                    (Kind::Vip, Action::Created) => vips.add(1, &[]),
                    (Kind::Service, Action::Created) => endpoints.add(0, &labels(&c.namespace, &c.name)),
                    (Kind::Endpoints, _) => endpoints.add(
                        1,
                        &[
                            opentelemetry::KeyValue::new("service", c.name.clone()),
                            opentelemetry::KeyValue::new("namespace", c.namespace.clone()),
                        ],
                    ),
                    _ => {}
                }
            }
        }
    });
}

/// The edge ingress's certificate states and request counts (zero for unknown hosts' 404s and
/// every exposed host until it is asked for).
pub fn ingress(provider: &opentelemetry_sdk::metrics::SdkMeterProvider, ing: &Arc<rune_ingress::Ingress>) {
    let weak = Arc::downgrade(ing);
    provider
        .meter("rune")
        .u64_observable_gauge("rune_acme_certificates")
        .with_description("TLS hosts by certificate state: pending, ready, error")
        .with_callback(move |o| {
            if let Some(i) = weak.upgrade() {
                let states = i.certificate_states();
                for st in ["pending", "ready", "error"] {
                    let n = states.values().filter(|c| c.state == st).count() as u64;
                    o.observe(n, &[opentelemetry::KeyValue::new("state", st)]);
                }
            }
        })
        .build();
    let weak = Arc::downgrade(ing);
    provider
        .meter("rune")
        .i64_observable_gauge("rune_acme_certificate_expiry_timestamp_seconds")
        .with_description(
            "When each exposed host's served certificate expires (Unix time): alert on it, a failing renewal leaves the state ready until then",
        )
        .with_callback(move |o| {
            if let Some(i) = weak.upgrade() {
                for (host, c) in i.certificate_states().iter().filter(|(_, c)| c.not_after > 0) {
                    o.observe(c.not_after, &[opentelemetry::KeyValue::new("host", host.clone())]);
                }
            }
        })
        .build();
    let weak = Arc::downgrade(ing);
    provider
        .meter("rune")
        .u64_observable_gauge("rune_ingress_connections")
        .with_description("Client connections the edge ingress serves now, websockets included")
        .with_callback(move |o| {
            if let Some(i) = weak.upgrade() {
                o.observe(i.connections().0 as u64, &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(ing);
    provider
        .meter("rune")
        .u64_observable_gauge("rune_ingress_connections_limit")
        .with_description("ingress.max-connections: past it new connections wait in the listen backlog")
        .with_callback(move |o| {
            if let Some(i) = weak.upgrade() {
                o.observe(i.connections().1 as u64, &[]);
            }
        })
        .build();
    let weak = Arc::downgrade(ing);
    provider
        .meter("rune")
        .u64_observable_counter("rune_ingress_requests")
        .with_description("Requests answered by the edge ingress, by host and status")
        .with_callback(move |o| {
            if let Some(i) = weak.upgrade() {
                let mut counts: std::collections::BTreeMap<(String, u16), u64> =
                    i.requests().into_iter().map(|(h, s, n)| ((h, s), n)).collect();
                counts
                    .entry((rune_ingress::UNKNOWN_HOST.to_string(), 404))
                    .or_insert(0);
                for host in i.routes().by_host.keys() {
                    if !counts.keys().any(|(h, _)| h == host) {
                        counts.insert((host.clone(), 200), 0);
                    }
                }
                for ((host, status), n) in counts {
                    o.observe(
                        n,
                        &[
                            opentelemetry::KeyValue::new("host", host),
                            opentelemetry::KeyValue::new("status", i64::from(status)),
                        ],
                    );
                }
            }
        })
        .build();
}

/// How each projection follows the log, and the orchestrator's work queue.
pub fn projections(
    provider: &opentelemetry_sdk::metrics::SdkMeterProvider,
    projections: &[Arc<rune_log::projection::Projection>],
    orchestrator: &Arc<rune_orchestrator::Orchestrator>,
) {
    use opentelemetry::KeyValue;
    let meter = provider.meter("rune");
    let weak: Vec<_> = projections.iter().map(Arc::downgrade).collect();
    let each = move |f: fn(&rune_log::projection::Projection) -> f64| {
        let weak = weak.clone();
        move |o: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
            for p in weak.iter().filter_map(std::sync::Weak::upgrade) {
                o.observe(f(&p), &[KeyValue::new("projection", p.name())]);
            }
        }
    };
    // The name predates the other projections; it is kept so alerts on it keep working.
    meter
        .f64_observable_gauge("rune_dataplane_stale_seconds")
        .with_description("How long a projection (dns, dataplane, ingress, orchestrator) has lagged the applied log; past the stale budget it fails closed")
        .with_callback(each(|p| p.stale_seconds()))
        .build();
    meter
        .f64_observable_gauge("rune_projection_applied_index")
        .with_description("The last log index a projection's view reflects")
        .with_callback(each(|p| p.applied_index() as f64))
        .build();
    meter
        .f64_observable_counter("rune_projection_rebuilds")
        .with_description("Full rebuilds of a projection from the state (the first build included)")
        .with_callback(each(|p| p.rebuilds() as f64))
        .build();
    meter
        .f64_observable_counter("rune_projection_errors")
        .with_description("Failed reads, rebuilds and applies of a projection (an unreadable record, say)")
        .with_callback(each(|p| p.errors() as f64))
        .build();
    meter
        .f64_observable_counter("rune_projection_deltas")
        .with_description("Typed changes a projection applied entry by entry")
        .with_callback(each(|p| p.applied_deltas() as f64))
        .build();
    let o = Arc::downgrade(orchestrator);
    let stat = move |f: fn(rune_orchestrator::LoopStats) -> f64| {
        let o = o.clone();
        move |obs: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
            if let Some(o) = o.upgrade() {
                obs.observe(f(o.stats()), &[]);
            }
        }
    };
    meter
        .f64_observable_gauge("rune_orchestrator_queue_depth")
        .with_description("Services waiting to be reconciled")
        .with_callback(stat(|s| s.queue_depth as f64))
        .build();
    meter
        .f64_observable_counter("rune_orchestrator_reconciles")
        .with_description("Services reconciled")
        .with_callback(stat(|s| s.reconciles as f64))
        .build();
    meter
        .f64_observable_counter("rune_orchestrator_reconcile_seconds")
        .with_description("Time spent reconciling services")
        .with_callback(stat(|s| s.reconcile_seconds))
        .build();
    meter
        .f64_observable_gauge("rune_orchestrator_last_pass_seconds")
        .with_description("How long the last reconcile pass took")
        .with_callback(stat(|s| s.last_pass_seconds))
        .build();
}
