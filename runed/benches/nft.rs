//! Programming runed's nftables table, in a network namespace of its own (root and Debian's
//! nftables): for 10, 100, 1,000 and 5,000 services, each with a VIP, two local containers
//! and an ingress policy, `cargo bench -p runed --bench nft` prints
//! - the time to compute the table's model from the view,
//! - a full load (the table replaced whole: runed's start, or recovery), median of 5,
//! - one service's change applied as a delta, p50/p99 of 40 of each kind: its endpoints gone
//!   then back (the commonest change: instances turn unready, then ready again), and its
//!   endpoints gone with its policy moved to a prefix length no other policy uses, then back
//!   (the policy chains rewritten). The changes run back to back with warm caches: a lower
//!   bound of the kernel's time in runed, where other work runs between changes. With how
//!   many commands a delta holds, and what is computed before a change is loaded, p50 over
//!   both kinds: the data plane's way (its kept model brought up to date with the changed
//!   service, and the patch turned into commands) beside the earlier way (the view's whole
//!   model, compared with and diffed against the loaded one),
//! - reading the drop counts (the two drop sets listed), median of 10;
//!
//! and, with one more service whose policy names all the others (ingress from their
//! namespace, the published specs' egress to `0.0.0.0/0` by port name), the same
//! unready-and-back changes: the kept model's patch per change and the kernel's time, to
//! show whether a change's cost grows with how many services a peer names.

mod common;

use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use rune_dataplane::live::Live;
use rune_dataplane::nft::{self, Model};
use rune_dataplane::policy::SvcKey;
use rune_dataplane::testing::{change_one, naming_all, synthetic, unready};

const TABLE: &str = "runebench";
const RANGE: (u16, u16) = (20_000, 21_999);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Service `i`'s change to `view` as `DataPlane::program` makes it: the kept model's patch
/// turned into commands, then loaded at once. Both timed; with the commands' count and
/// encoding.
fn change(
    rt: &tokio::runtime::Runtime,
    lib: &nft::Nft,
    live: &mut Live,
    view: &rune_dataplane::table::Table,
    i: usize,
    ports: &std::collections::BTreeMap<(SvcKey, u16), u16>,
) -> (Duration, Duration, usize, Option<String>) {
    let started = Instant::now();
    let changed = BTreeSet::from([SvcKey::new("bench", &format!("s{i}"))]);
    let patch = live.update(view, Some(&changed), ports);
    let cmds = nft::delta_patch(TABLE, &patch);
    let patched = started.elapsed();
    let (n, encoded) = (cmds.len(), nft::encode(cmds.clone()).ok());
    let started = Instant::now();
    rt.block_on(nft::apply(lib, cmds)).expect("delta");
    (patched, started.elapsed(), n, encoded)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn main() {
    let ns = format!("rune-nft-bench-{}", std::process::id());
    // Deleted on the way out, a failed load included.
    let _gone = common::DeleteNetns(ns.clone());
    if !common::enter_netns(&ns) {
        println!("skipped: needs root, ip(8) and nft(8)");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let lib = nft::Nft::open().expect("libnftables (Debian's nftables)");
    println!("nftables programming, one network namespace, one run\n");
    println!("| services | model µs | full load ms | unready or ready again p50 / p99 ms | endpoints and policy's prefix length p50 / p99 ms | most commands per change | kept model's patch per change p50 µs (both kinds) | whole model and delta per change p50 µs (both kinds) | read counters ms |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    // 5,000: how the per-change work grows past the sizes.
    for n in [10, 100, 1000, 5000] {
        let (t, ports) = synthetic(n);
        let started = Instant::now();
        let base = Model::of(&t, &ports, RANGE);
        let model_us = started.elapsed().as_secs_f64() * 1e6;
        let mut loads: Vec<Duration> = (0..5)
            .map(|_| {
                let started = Instant::now();
                rt.block_on(nft::apply(&lib, nft::full(TABLE, &base)))
                    .expect("full load");
                started.elapsed()
            })
            .collect();
        let mut live = Live::build(&t, &ports, RANGE);
        let mut commands = 0;
        // Per kind of change: the kernel's time for it; the views and what their patches
        // encoded, to check against the earlier way after.
        let mut changes = [Vec::new(), Vec::new()];
        let mut patches = Vec::new();
        let mut done = Vec::new();
        for (kind, times) in changes.iter_mut().enumerate() {
            for round in 0..40 {
                let i = (round / 2 * 7) % n;
                let view = match (round % 2, kind) {
                    (1, _) => t.clone(),
                    (_, 0) => unready(&t, i),
                    _ => change_one(&t, i, 0),
                };
                let (patched, kernel, n, encoded) = change(&rt, &lib, &mut live, &view, i, &ports);
                patches.push(patched);
                times.push(kernel);
                commands = commands.max(n);
                done.push((view, encoded));
            }
        }
        // The earlier way, apart (its sweeps of the whole model would leave the caches cold
        // for the kernel's time above): the view's whole model, then its difference from
        // the loaded one.
        let mut computes = Vec::new();
        let mut current = base.clone();
        for (view, encoded) in done {
            let started = Instant::now();
            let next = Model::of(&view, &ports, RANGE);
            let whole = if next == current {
                Vec::new()
            } else {
                nft::delta(TABLE, &current, &next)
            };
            computes.push(started.elapsed());
            assert_eq!(
                encoded,
                nft::encode(whole).ok(),
                "the patch and the whole models' difference agree"
            );
            current = next;
        }
        let [mut endpoints, mut policies] = changes;
        let mut reads: Vec<Duration> = (0..10)
            .map(|_| {
                let started = Instant::now();
                rt.block_on(nft::drops(&lib, TABLE)).expect("drops");
                started.elapsed()
            })
            .collect();
        if n == 1000 {
            common::summary(
                "nftables full load, 1,000 policy services",
                "ms",
                ms(pct(&mut loads, 0.5)),
                None,
                false,
            );
            common::summary(
                "nftables one service unready or ready again, 1,000 policy services, p50",
                "ms",
                ms(pct(&mut endpoints, 0.5)),
                None,
                false,
            );
            common::summary(
                "nftables one service's change rewriting the policy chains, 1,000 policy services, p50",
                "ms",
                ms(pct(&mut policies, 0.5)),
                None,
                false,
            );
        }
        println!(
            "| {n} | {model_us:.0} | {:.1} | {:.2} / {:.2} | {:.2} / {:.2} | {commands} | {:.0} | {:.0} | {:.2} |",
            ms(pct(&mut loads, 0.5)),
            ms(pct(&mut endpoints, 0.5)),
            ms(pct(&mut endpoints, 0.99)),
            ms(pct(&mut policies, 0.5)),
            ms(pct(&mut policies, 0.99)),
            pct(&mut patches, 0.5).as_secs_f64() * 1e6,
            pct(&mut computes, 0.5).as_secs_f64() * 1e6,
            ms(pct(&mut reads, 0.5)),
        );
    }
    println!("\nWith one service naming every other (`bench/all`: ingress from their namespace, egress to 0.0.0.0/0 on `http`), each other service unready, then ready again\n");
    println!("| services | set elements | full load ms | kept model's patch per change p50 / p99 µs | kernel per change p50 / p99 ms |");
    println!("|--:|--:|--:|--:|--:|");
    for n in [100, 1000, 5000] {
        let (t, ports) = synthetic(n);
        let t = naming_all(&t);
        let base = Model::of(&t, &ports, RANGE);
        let elements = [&base.ingress, &base.egress]
            .iter()
            .map(|a| a.port.len() + a.any.len() + a.net_port.len() + a.net_any.len())
            .sum::<usize>();
        let started = Instant::now();
        rt.block_on(nft::apply(&lib, nft::full(TABLE, &base)))
            .expect("full load");
        let load = started.elapsed();
        let mut live = Live::build(&t, &ports, RANGE);
        let (mut patches, mut kernel) = (Vec::new(), Vec::new());
        for round in 0..40 {
            let i = (round / 2 * 7) % n;
            let view = if round % 2 == 1 { t.clone() } else { unready(&t, i) };
            let (patched, applied, _, _) = change(&rt, &lib, &mut live, &view, i, &ports);
            patches.push(patched);
            kernel.push(applied);
        }
        assert_eq!(live.model(), &base, "back where it started");
        println!(
            "| {n} | {elements} | {:.1} | {:.0} / {:.0} | {:.2} / {:.2} |",
            ms(load),
            pct(&mut patches, 0.5).as_secs_f64() * 1e6,
            pct(&mut patches, 0.99).as_secs_f64() * 1e6,
            ms(pct(&mut kernel, 0.5)),
            ms(pct(&mut kernel, 0.99)),
        );
    }
}
