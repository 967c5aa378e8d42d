//! A sandbox's record, `<sandbox dir>/sandbox.json`: what another process
//! of ours needs to find the sandbox again after the one that started it
//! is gone (huskd restarted): which process is its VMM, its cgroups, the
//! guest devices of its drives, its address and published ports.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::net::ports::PortMapping;
use crate::sandbox::{Result, SandboxError};
use crate::util::{shown, IoContext};

const FILE: &str = "sandbox.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    /// The VMM process the runtime holds (a confined VMM's keeper) and
    /// when it started: together they name it even after its pid is reused.
    pub vmm_pid: u32,
    pub vmm_start_ticks: u64,
    pub cgroup: Vec<PathBuf>,
    /// The guest device of each drive, in order.
    pub devices: Vec<String>,
    /// Its address on the bridge, and the ports published to it.
    pub ip: Option<Ipv4Addr>,
    pub ports: Vec<PortMapping>,
    /// It shares host paths over virtio-fs, whose daemon dies with the
    /// process that started it: such a sandbox cannot be found again.
    pub shared: bool,
}

impl SandboxRecord {
    /// Written once the sandbox is up (replaced atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|source| SandboxError::Encode {
            what: "the sandbox record",
            source,
        })?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, json).at(|| shown(&tmp))?;
        Ok(std::fs::rename(&tmp, dir.join(FILE)).at(|| shown(dir))?)
    }

    /// The record in `dir`; an error names a missing or unreadable one.
    pub fn load(dir: &Path) -> Result<SandboxRecord> {
        let path = dir.join(FILE);
        let bytes = std::fs::read(&path).at(|| shown(&path))?;
        // Written by us, but a record is a file anyone with the run
        // directory could have changed: it is parsed, never trusted blindly
        // (the pid must still be the process that started then).
        serde_json::from_slice(&bytes).map_err(|source| SandboxError::Record {
            path,
            reason: source.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_bad_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let r = SandboxRecord {
            id: "t1".into(),
            vmm_pid: 42,
            vmm_start_ticks: 7,
            cgroup: vec!["/sys/fs/cgroup/husk/t1-0badf00d".into()],
            devices: vec!["/dev/vda".into()],
            ip: Some(Ipv4Addr::new(10, 88, 0, 2)),
            ports: Vec::new(),
            shared: false,
        };
        r.save(d.path()).unwrap();
        assert_eq!(SandboxRecord::load(d.path()).unwrap(), r);
        std::fs::write(d.path().join(FILE), b"{\"id\": 1}").unwrap();
        let e = crate::util::chain(&SandboxRecord::load(d.path()).unwrap_err());
        assert!(e.contains("sandbox.json"), "{e}");
        let none = tempfile::tempdir().unwrap();
        assert!(SandboxRecord::load(none.path()).is_err());
    }
}
