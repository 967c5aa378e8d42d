//! Healthchecks (Docker's HEALTHCHECK, Swarm's semantics): run in the
//! task's container every interval; after `retries` failures in a row,
//! outside the start period, the task is unhealthy and stopped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_runtime::container::Control as ContainerControl;
use husk_runtime::util::chain;

use super::{stop, Control, Executor};
use crate::types::{Health, Healthcheck, TaskState};
use crate::util::lock;

impl Executor {
    pub(super) fn report_health(&self, task: &str, health: Health) {
        let mut last = lock(&self.last);
        let Some(r) = last.get_mut(task).filter(|r| r.state == TaskState::Running) else {
            return;
        };
        if r.health != Some(health) {
            r.health = Some(health);
            let _ = self.reports.send(r.clone());
        }
    }

    /// Runs the healthcheck every interval until the task ends; after
    /// `retries` failures in a row (outside the start period) the task is
    /// unhealthy and stopped, as Swarm does, so its slot gets a new one.
    pub(super) fn watch_health(
        self: Arc<Self>,
        id: String,
        hc: Healthcheck,
        env: Vec<String>,
        container: ContainerControl,
        ctl: Arc<Mutex<Control>>,
    ) {
        let started = std::time::Instant::now();
        let interval = Duration::from_millis(hc.interval_ms.max(100));
        let timeout = Duration::from_millis(hc.timeout_ms.max(100));
        let rest = hc.test.get(1..).unwrap_or_default();
        let args: Vec<String> = if hc.test.first().map(String::as_str) == Some("CMD-SHELL") {
            vec!["/bin/sh".into(), "-c".into(), rest.join(" ")]
        } else {
            rest.to_vec()
        };
        let process = serde_json::json!({
            "args": args, "cwd": "/", "env": env, "terminal": false,
            "user": {"uid": 0, "gid": 0},
        });
        self.report_health(&id, Health::Starting);
        let mut failures = 0u64;
        for n in 0u64.. {
            let deadline = std::time::Instant::now() + interval;
            while std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                let c = lock(&ctl);
                if c.finished || c.stop {
                    return;
                }
            }
            let ok = probe(&container, &format!("health-{n}"), &process, timeout);
            if ok {
                failures = 0;
                self.report_health(&id, Health::Healthy);
                continue;
            }
            if started.elapsed() < Duration::from_millis(hc.start_period_ms) {
                continue;
            }
            failures += 1;
            if failures >= hc.retries.max(1) {
                tracing::info!("task {id}: unhealthy after {failures} failed checks: stopping it");
                self.report_health(&id, Health::Unhealthy);
                lock(&ctl).unhealthy = true;
                stop(&ctl, &id);
                return;
            }
        }
    }
}

/// One healthcheck run: exit 0 within `timeout`.
fn probe(
    c: &ContainerControl,
    exec_id: &str,
    process: &serde_json::Value,
    timeout: Duration,
) -> bool {
    match c.exec_within(exec_id, process, timeout) {
        Ok(status) => status == Some(0),
        Err(e) => {
            tracing::debug!("task {}: healthcheck: {}", c.id(), chain(&e));
            false
        }
    }
}
