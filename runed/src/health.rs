//! Is runed well? One answer for `/healthz`, its verbose form, gRPC health checking and the
//! systemd watchdog, so that they never disagree.
//!
//! runed is healthy while the log applies what it writes, the orchestrator finishes reconcile
//! passes, the projections (DNS, data plane, ingress) keep up within their stale budget, and it
//! is not shutting down. The watchdog asks less: only the two loops that a wedged process stops
//! (the log and the orchestrator), since a stale projection fails closed on its own and a restart
//! would not help it; nor does it ask for a leader: a member cut off from its quorum keeps
//! serving what it has (DNS, the data plane, its instances) until the network heals, where a
//! restart would only take that away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rune_log::projection::Projection;
use rune_log::Log;

/// How long the log may hold written but unapplied entries without applying any of them.
pub const APPLY_STALL_BUDGET: Duration = Duration::from_secs(10);
/// How long the orchestrator may go without finishing a reconcile pass (it runs one at every
/// applied change and every 2 s).
pub const RECONCILE_BUDGET: Duration = Duration::from_secs(30);

/// One component's state, as `/healthz?verbose` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// `log`, `orchestrator`, `dns`, `dataplane` or `ingress`.
    pub name: &'static str,
    /// Whether it is well.
    pub ok: bool,
    /// Its position and lag, or what is wrong.
    pub detail: String,
}

/// Everything health looks at.
pub struct Health {
    log: Arc<Log>,
    orchestrator: Arc<rune_orchestrator::Orchestrator>,
    /// The DNS, the data plane, the ingress (edge nodes) and the orchestrator's picture.
    projections: Vec<Arc<Projection>>,
    stale_budget: Duration,
    shutting_down: AtomicBool,
    /// The applied index last seen, and when it last moved (or the log was caught up).
    progress: Mutex<(u64, Instant)>,
}

impl Health {
    /// Health over runed's parts.
    pub fn new(
        log: Arc<Log>,
        orchestrator: Arc<rune_orchestrator::Orchestrator>,
        projections: Vec<Arc<Projection>>,
        stale_budget: Duration,
    ) -> Self {
        Self {
            log,
            orchestrator,
            projections,
            stale_budget,
            shutting_down: AtomicBool::new(false),
            progress: Mutex::new((0, Instant::now())),
        }
    }

    /// From now on runed is stopping: unhealthy, on purpose.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// `liveness`: the watchdog's question, which a member without a leader passes.
    fn log_component(&self, liveness: bool) -> Component {
        let (_, last, applied) = self.log.positions();
        let stalled_for = match self.progress.lock() {
            Ok(mut p) => {
                if applied != p.0 || applied >= last {
                    *p = (applied, Instant::now());
                }
                p.1.elapsed()
            }
            Err(_) => Duration::ZERO,
        };
        let lag = last.saturating_sub(applied);
        let (ok, detail) = if liveness && !self.log.alive() {
            (false, "stopped, or its state cannot be read".to_string())
        } else if !liveness && !self.log.healthy() {
            (
                false,
                "no leader known, stopped, or its state cannot be read".to_string(),
            )
        } else if lag > 0 && stalled_for > APPLY_STALL_BUDGET {
            (
                false,
                format!(
                    "has applied nothing for {:.0} s with {lag} entries written (applied {applied})",
                    stalled_for.as_secs_f64()
                ),
            )
        } else {
            (true, format!("applied {applied}, lag {lag} entries"))
        };
        Component {
            name: "log",
            ok,
            detail,
        }
    }

    /// The watchdog asks without the picture (`with_picture` false): a restart does not make
    /// an unreadable state readable.
    fn orchestrator_component(&self, with_picture: bool) -> Component {
        let d = self.orchestrator.since_reconcile();
        let (ok, detail) = if d > RECONCILE_BUDGET {
            (
                false,
                format!(
                    "has not reconciled for {:.0} s (budget {} s)",
                    d.as_secs_f64(),
                    RECONCILE_BUDGET.as_secs()
                ),
            )
        } else {
            match self.orchestrator.projection() {
                // Reconciling, but from a picture of the state that stopped following the log
                // (an unreadable record, say): it starts and stops nothing it should.
                Some(p) if with_picture && p.stale() => (
                    false,
                    format!(
                        "its picture of the state is {:.0} s behind the log (applied {}; {} read errors)",
                        p.stale_seconds(),
                        p.applied_index(),
                        p.errors()
                    ),
                ),
                Some(p) => (
                    true,
                    format!(
                        "reconciled {:.1} s ago, applied {}, queue {}",
                        d.as_secs_f64(),
                        p.applied_index(),
                        self.orchestrator.stats().queue_depth
                    ),
                ),
                None => (true, format!("reconciled {:.1} s ago", d.as_secs_f64())),
            }
        };
        Component {
            name: "orchestrator",
            ok,
            detail,
        }
    }

    fn projection(&self, p: &Projection) -> Component {
        let (name, applied, stale_seconds) = (p.name(), p.applied_index(), p.stale_seconds());
        let ok = !p.stale();
        let detail = if ok {
            format!("applied {applied}, lag {stale_seconds:.1} s")
        } else if p.rebuilds() == 0 {
            format!(
                "never built from the state ({} read errors): failing closed",
                p.errors()
            )
        } else {
            format!(
                "{stale_seconds:.0} s behind the log (stale budget {} s): failing closed",
                self.stale_budget.as_secs()
            )
        };
        Component { name, ok, detail }
    }

    /// Every component, in a fixed order.
    pub fn components(&self) -> Vec<Component> {
        let mut v = vec![self.log_component(false), self.orchestrator_component(true)];
        // The orchestrator's picture is part of its own line above.
        v.extend(
            self.projections
                .iter()
                .filter(|p| p.name() != "orchestrator")
                .map(|p| self.projection(p)),
        );
        v
    }

    /// Every component and the verdict drawn from them: `Ok` when healthy, else the first
    /// reason, one line.
    fn evaluate(&self) -> (Vec<Component>, Result<(), String>) {
        let components = self.components();
        let verdict = if self.shutting_down.load(Ordering::Relaxed) {
            Err("shutting down".into())
        } else {
            match components.iter().find(|c| !c.ok) {
                None => Ok(()),
                Some(c) => Err(format!("{} {}", c.name, c.detail)),
            }
        };
        (components, verdict)
    }

    /// `Ok` when healthy, else the first reason, one line.
    pub fn check(&self) -> Result<(), String> {
        self.evaluate().1
    }

    /// Whether the loops a wedged process would stop still make progress: the watchdog's test.
    pub fn alive(&self) -> Result<(), String> {
        for c in [self.log_component(true), self.orchestrator_component(false)] {
            if !c.ok {
                return Err(format!("{} {}", c.name, c.detail));
            }
        }
        Ok(())
    }

    /// `/healthz`: 200 `ok`, or 503 with the reason; `verbose` lists every component as
    /// Kubernetes' `?verbose` does (`[+]log applied 12, lag 0 entries`).
    pub fn report(&self, verbose: bool) -> (bool, String) {
        let (components, verdict) = self.evaluate();
        let mut out = String::new();
        if verbose {
            for c in &components {
                out.push_str(&format!(
                    "[{}]{} {}\n",
                    if c.ok { '+' } else { '-' },
                    c.name,
                    c.detail
                ));
            }
        }
        match &verdict {
            Ok(()) => out.push_str("ok\n"),
            Err(why) => out.push_str(&format!("unhealthy: {why}\n")),
        }
        (verdict.is_ok(), out)
    }

    /// Whether runed is stopping.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}
