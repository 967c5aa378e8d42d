//! A sandbox's record, `<run dir>/.records/<id>.json`: what another
//! process of ours needs to find the sandbox again after the one that
//! started it is gone (huskd restarted): which process is its VMM, its
//! cgroups, the guest devices of its drives, its address and published
//! ports. It is kept outside the sandbox's directory, which the confined
//! VMM can write (its sockets live there): a VMM must not be able to name
//! the processes, cgroups or ports that a restarted huskd acts on.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::net::ports::PortMapping;
use crate::sandbox::{Result, SandboxError};
use crate::util::{shown, IoContext};

/// The records' directory under the run directory (its name is not a
/// sandbox id: ids do not start with '.').
const DIR: &str = ".records";

fn path(run_dir: &Path, id: &str) -> PathBuf {
    run_dir.join(DIR).join(format!("{id}.json"))
}

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
    /// Written once the sandbox is up (replaced atomically; root's, 0600).
    pub fn save(&self, run_dir: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let json = serde_json::to_vec_pretty(self).map_err(|source| SandboxError::Encode {
            what: "the sandbox record",
            source,
        })?;
        let dir = run_dir.join(DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .at(|| shown(&dir))?;
        let tmp = dir.join(format!("{}.json.tmp", self.id));
        let _ = std::fs::remove_file(&tmp);
        let write = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| f.write_all(&json))
        };
        // The directory goes when its last record does (`remove`): made
        // again if that happened just now.
        let wrote = match write() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .and_then(|_| write()),
            other => other,
        };
        wrote.at(|| shown(&tmp))?;
        let to = path(run_dir, &self.id);
        Ok(std::fs::rename(&tmp, &to).at(|| shown(&to))?)
    }

    /// The record of sandbox `id`; an error names a missing or unreadable
    /// one.
    pub fn load(run_dir: &Path, id: &str) -> Result<SandboxRecord> {
        let path = path(run_dir, id);
        let bytes = std::fs::read(&path).at(|| shown(&path))?;
        let r: SandboxRecord =
            serde_json::from_slice(&bytes).map_err(|source| SandboxError::Record {
                path: path.clone(),
                reason: source.to_string(),
            })?;
        if r.id != id {
            return Err(SandboxError::Record {
                path,
                reason: format!("it names sandbox {:?}", r.id),
            });
        }
        Ok(r)
    }

    /// Removes the record of `id`, if there is one, and the records'
    /// directory once it is empty (a run directory with no sandboxes is
    /// empty).
    pub fn remove(run_dir: &Path, id: &str) {
        let _ = std::fs::remove_file(path(run_dir, id));
        let _ = std::fs::remove_dir(run_dir.join(DIR));
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
        assert_eq!(SandboxRecord::load(d.path(), "t1").unwrap(), r);
        assert!(SandboxRecord::load(d.path(), "t2").is_err());
        std::fs::write(path(d.path(), "t1"), b"{\"id\": 1}").unwrap();
        let e = crate::util::chain(&SandboxRecord::load(d.path(), "t1").unwrap_err());
        assert!(e.contains("t1.json"), "{e}");
        SandboxRecord::remove(d.path(), "t1");
        assert!(SandboxRecord::load(d.path(), "t1").is_err());
        assert!(
            !d.path().join(DIR).exists(),
            "an empty records directory goes"
        );
        r.save(d.path()).unwrap();
    }
}
