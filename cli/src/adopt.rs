//! Containers whose owner died while they ran (`run -d`'s background husk
//! or a foreground `husk run` killed) are adopted by the next husk command
//! that looks at containers: a new background husk holds the sandbox
//! again, waits for the container's end and records it, as the owner would
//! have. One that cannot be held again is removed and recorded as ended,
//! with why: no sandbox is left running without an owner.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use husk_runtime::container::record::{alive, Records, Status};
use husk_runtime::container::Container;
use husk_runtime::util::chain;
use husk_runtime::Runtime;

use crate::container::records;
use crate::error::{Failure, HUSK_ERROR};
use crate::volume::volumes;

/// Set in the background husk that adopts a container: its id.
pub(crate) const ADOPT_ENV: &str = "HUSK_ADOPT_ID";

/// Adopts every container whose owner is gone. A failure is printed and
/// the command goes on.
pub(crate) fn adopt_orphans() {
    let Ok(records) = records() else { return };
    let Ok(orphans) = records.orphans() else {
        return;
    };
    for r in orphans {
        if let Err(e) = adopt(&records, &r.id) {
            eprintln!("husk: adopting container {}: {e:#}", r.id);
        }
    }
}

fn adopt(records: &Records, id: &str) -> anyhow::Result<()> {
    // Two commands may find the same orphan: the second one, once it holds
    // the claim, sees the first one's adopter as the owner.
    let _claim = records.claim(id)?;
    let mut r = records.read(id)?;
    if r.status == Status::Exited || alive(r.owner_pid) {
        return Ok(());
    }
    let child = Command::new("/proc/self/exe")
        .env(ADOPT_ENV, id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: the terminal's signals are not its.
        .process_group(0)
        .spawn()
        .context("starting a husk to hold it")?;
    r.owner_pid = child.id();
    records.save(&r)?;
    Ok(())
}

/// The adopting husk's work: container `id`'s sandbox held again, its end
/// waited for and recorded (its log copier, if it had one, still writes
/// its output).
pub(crate) fn adopted(id: &str) -> Result<u8, Failure> {
    let records = records()?;
    let rt = Runtime::locate()?;
    let mut r = records.read(id)?;
    let found = volumes().and_then(|store| {
        // Named volumes only: host paths (binds) have no lease.
        let leases = r
            .volumes
            .iter()
            .filter(|(name, _, _)| !name.starts_with('/'))
            .map(|(name, _, _)| store.lease(name))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Container::find(&rt, id, leases)?)
    });
    let c = match found {
        Ok(c) => c,
        Err(e) => {
            if let Err(rm) = rt.remove_left(id) {
                eprintln!("husk: removing the sandbox of {id}: {}", chain(&rm));
            }
            r.status = Status::Exited;
            r.error = Some(format!(
                "its husk died while it ran, and its sandbox could not be held again: {e:#}"
            ));
            r.failure_code = Some(HUSK_ERROR);
            records.save(&r)?;
            return Err(Failure(HUSK_ERROR, e));
        }
    };
    let status = c.wait();
    if let Err(e) = c.remove(Duration::from_secs(20)) {
        eprintln!("husk: stopping the sandbox of {id}: {}", chain(&e));
    }
    let mut r = records.read(id)?;
    r.status = Status::Exited;
    match &status {
        Ok(s) => {
            r.exit_code = Some(s.status);
            r.oom_killed = s.oom_killed;
        }
        Err(e) => r.error = Some(chain(e)),
    }
    if r.auto_remove {
        records.remove(id)?;
    } else {
        records.save(&r)?;
    }
    Ok(0)
}
