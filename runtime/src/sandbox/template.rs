//! Template VMs: one booted, agent-ready guest per (VMM, kernel, guest
//! image, machine shape, drive slots), paused and snapshotted into the
//! cache. Sandboxes restore from it instead of booting.
//!
//! The cache key is a hash of those inputs, files named by path, size,
//! modification time and inode: a rebuilt kernel or image gets a new
//! template; the one it supersedes is removed. A template is built under an
//! exclusive lock on its directory, so concurrent sandbox starts (parallel
//! tests, several CLI calls) boot it once and the rest wait for it.
//!
//! A template has drive slots, placeholder drives of zero size: a restored
//! sandbox gets its own images and volumes by naming new backing files for
//! them in the load request.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sandbox::{Result, SandboxError};
use crate::util::{shown, IoContext};
use husk_vmm_api::{CreateRequest, VmState};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Runtime;
use crate::sandbox::machine::{vm_config, Machine, BOOT_ARGS, RO_SLOTS, RW_SLOTS};
use crate::util::tail;
use crate::util::Lock;
use crate::vmm::jail::Share;
use crate::vmm::{VmmClient, VmmError, VmmProcess};

/// Bumped when what a template holds, or how it is booted, changes.
pub const FORMAT: u32 = 3;
/// How long a template's cold boot may take to agent-ready (guest kernels
/// are emulated on some hosts: tens of seconds there).
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// How long husk-vmm may take to write or load a snapshot: it writes or
/// copies the guest's memory (hundreds of MiB), on a host that may be busy
/// starting many sandboxes. Only a hung VMM reaches it (a load that times
/// out rebuilds the template), so it is generous.
pub(crate) const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A file input of a template, named precisely enough to see it change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct FileId {
    path: PathBuf,
    len: u64,
    mtime_ns: i128,
    dev: u64,
    ino: u64,
}

impl FileId {
    pub(super) fn of(path: &Path) -> Result<FileId> {
        let path = path.canonicalize().at(|| shown(path))?;
        let m = std::fs::metadata(&path).at(|| shown(&path))?;
        Ok(FileId {
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            dev: m.dev(),
            ino: m.ino(),
            path,
        })
    }
}

/// Everything a template depends on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Inputs {
    format: u32,
    vmm: FileId,
    kernel: FileId,
    guest_image: FileId,
    cpu_template: Option<FileId>,
    machine: Machine,
    boot_args: String,
    ro_slots: usize,
    rw_slots: usize,
}

impl Inputs {
    fn of(rt: &Runtime, machine: &Machine) -> Result<Inputs> {
        Ok(Inputs {
            format: FORMAT,
            vmm: FileId::of(&rt.vmm)?,
            kernel: FileId::of(&rt.kernel)?,
            guest_image: FileId::of(&rt.guest_image)?,
            cpu_template: machine
                .cpu_template
                .as_deref()
                .map(FileId::of)
                .transpose()?,
            machine: machine.clone(),
            boot_args: BOOT_ARGS.into(),
            ro_slots: RO_SLOTS,
            rw_slots: RW_SLOTS,
        })
    }

    fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("inputs serialize");
        let digest = Sha256::digest(&json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether the files it was built from are still the same.
    fn current(&self) -> bool {
        let same = |f: &FileId| FileId::of(&f.path).is_ok_and(|now| now == *f);
        same(&self.vmm)
            && same(&self.kernel)
            && same(&self.guest_image)
            && self.cpu_template.iter().all(same)
    }

    /// Same artifacts and machine, another build of them: what a new
    /// template supersedes.
    fn same_slot(&self, other: &Inputs) -> bool {
        self.vmm.path == other.vmm.path
            && self.kernel.path == other.kernel.path
            && self.guest_image.path == other.guest_image.path
            && self.machine == other.machine
    }
}

/// A ready template.
#[derive(Clone, Debug)]
pub struct Template {
    pub key: String,
    pub dir: PathBuf,
    pub snapshot: PathBuf,
    pub memory: PathBuf,
    /// The zero-size file behind unused drive slots.
    pub placeholder: PathBuf,
    /// This call booted it (the cache had none for these inputs).
    pub built: bool,
    /// How long its cold boot to agent-ready took, when built here.
    pub boot_time: Option<Duration>,
}

impl Template {
    /// The template for `machine` with `rt`'s artifacts: from the cache, or
    /// booted and snapshotted now.
    pub fn ensure(rt: &Runtime, machine: &Machine) -> Result<Template> {
        let inputs = Inputs::of(rt, machine)?;
        let key = inputs.key();
        let root = rt.cache_dir.join("templates");
        let dir = root.join(&key);
        let _lock = lock_dir(&dir)?;
        let mut t = Template {
            snapshot: dir.join("vm.snap"),
            memory: dir.join("vm.mem"),
            placeholder: dir.join("empty.img"),
            key,
            dir: dir.clone(),
            built: false,
            boot_time: None,
        };
        let ready = dir.join("ready");
        let cached = std::fs::read(&ready)
            .ok()
            .and_then(|b| serde_json::from_slice::<Inputs>(&b).ok());
        if cached.as_ref() == Some(&inputs)
            && t.snapshot.exists()
            && t.memory.exists()
            && t.placeholder.exists()
        {
            return Ok(t);
        }
        let _ = std::fs::remove_file(&ready);
        t.boot_time = Some(t.build(rt, machine)?);
        let json = serde_json::to_vec_pretty(&inputs).map_err(|source| SandboxError::Encode {
            what: "the template's inputs",
            source,
        })?;
        std::fs::write(&ready, json).at(|| shown(&ready))?;
        t.built = true;
        remove_superseded(&root, &t.key, &inputs);
        Ok(t)
    }

    /// Forgets this template (a restore from it was refused): the next
    /// `ensure` builds it again.
    pub fn invalidate(&self) {
        if let Ok(Some(_l)) = Lock::take(&self.dir.join("lock"), true) {
            let _ = std::fs::remove_file(self.dir.join("ready"));
        }
    }

    /// Cold-boots the guest to agent-ready, pauses it and snapshots it.
    fn build(&self, rt: &Runtime, machine: &Machine) -> Result<Duration> {
        let work = self.dir.join("build");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).at(|| shown(&work))?;
        File::create(&self.placeholder).at(|| shown(&self.placeholder))?;
        let slots = vec![self.placeholder.clone(); RO_SLOTS + RW_SLOTS];
        let console = work.join("boot.log");
        // The template's NIC is backed by a tap on nothing; each restored
        // sandbox gets its own.
        let tap = rt.network.tap(false)?;
        let config = vm_config(
            rt,
            machine,
            &slots,
            &work.join("v.sock"),
            Some(&console),
            tap.fd(),
            None,
        );
        let cfg = work.join("vm.json");
        let json = serde_json::to_vec_pretty(&config).map_err(|source| SandboxError::Encode {
            what: "the VM config",
            source,
        })?;
        std::fs::write(&cfg, json).at(|| shown(&cfg))?;
        let log = self.dir.join("vmm.log");
        let started = Instant::now();
        let mut vmm = VmmProcess::spawn(
            &rt.vmm,
            &["--config-file".as_ref(), cfg.as_os_str()],
            work.join("api.sock"),
            work.join("v.sock"),
            &log,
            &[tap.fd()],
            rt.jail_for(
                &work,
                &format!("template-{}", self.key),
                // Writable slots open it read-write (it has no bytes to write).
                vec![Share::rw(&self.placeholder)],
                machine,
            )
            .as_ref(),
        )?;
        crate::guest::wait_for_agent(&mut vmm, &log, BOOT_TIMEOUT).map_err(|source| {
            SandboxError::TemplateBoot {
                key: self.key.clone(),
                console: tail(&console, 2000),
                source,
            }
        })?;
        let boot = started.elapsed();
        let tmp_snap = work.join("vm.snap");
        let tmp_mem = work.join("vm.mem");
        let api = VmmClient::new(&vmm.api, SNAPSHOT_TIMEOUT);
        api.set_state(VmState::Paused).map_err(VmmError::from)?;
        api.create_snapshot(&CreateRequest {
            snapshot_path: tmp_snap.clone(),
            mem_file_path: tmp_mem.clone(),
        })
        .map_err(VmmError::from)?;
        drop(vmm);
        std::fs::rename(&tmp_mem, &self.memory).at(|| shown(&self.memory))?;
        std::fs::rename(&tmp_snap, &self.snapshot).at(|| shown(&self.snapshot))?;
        let _ = std::fs::rename(&console, self.dir.join("boot.log"));
        let _ = std::fs::remove_dir_all(&work);
        let built = self.dir.join("built");
        File::create(&built)
            .and_then(|mut note| {
                writeln!(
                    note,
                    "cold boot to agent-ready: {:.2} s",
                    boot.as_secs_f64()
                )
            })
            .at(|| shown(&built))?;
        Ok(boot)
    }
}

/// The exclusive lock on template directory `dir`, waited for; made
/// again if a removal of the directory (a superseded template) won.
fn lock_dir(dir: &Path) -> Result<Lock> {
    let mut tries = 0;
    loop {
        std::fs::create_dir_all(dir).at(|| shown(dir))?;
        match Lock::take(&dir.join("lock"), true) {
            Ok(Some(l)) => return Ok(l),
            Err(e) if tries < 3 && e.source.kind() == std::io::ErrorKind::NotFound => tries += 1,
            Err(e) => return Err(e.into()),
            Ok(None) => tries += 1,
        }
        if tries > 3 {
            return Err(crate::util::IoError {
                what: format!("locking {}", dir.join("lock").display()),
                source: std::io::Error::other("removed again each time it was taken"),
            }
            .into());
        }
    }
}

/// Removes templates that `inputs` supersedes (same artifact paths and
/// machine, older builds) and those whose artifacts changed or are gone (a
/// deleted checkout). One in use elsewhere (locked) is left.
fn remove_superseded(root: &Path, key: &str, inputs: &Inputs) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if dir.file_name().and_then(|n| n.to_str()) == Some(key) {
            continue;
        }
        let Some(old) = std::fs::read(dir.join("ready"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Inputs>(&b).ok())
        else {
            continue;
        };
        if !inputs.same_slot(&old) && old.current() {
            continue;
        }
        let Ok(Some(_l)) = Lock::take(&dir.join("lock"), false) else {
            continue;
        };
        // Its container templates go with it: none may be mid-restore.
        if let Some(_held) = super::parked::lock_all(&dir) {
            // Restored VMs keep their mappings of a removed memory file.
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rt(dir: &Path) -> Runtime {
        for f in ["vmm", "kernel", "image"] {
            std::fs::write(dir.join(f), f).unwrap();
        }
        Runtime {
            vmm: dir.join("vmm"),
            kernel: dir.join("kernel"),
            guest_image: dir.join("image"),
            cache_dir: dir.join("cache"),
            run_dir: dir.join("run"),
            network: crate::net::NetworkConfig::default(),
            confine: false,
            virtiofsd: "/nonexistent".into(),
            profile: false,
            start_gate: crate::sandbox::StartGate {
                dir: dir.join("gate"),
                slots: 0,
            },
        }
    }

    #[test]
    fn a_changed_input_is_another_template() {
        let d = tempfile::tempdir().unwrap();
        let rt = rt(d.path());
        let m = Machine::default();
        let k = Inputs::of(&rt, &m).unwrap().key();
        assert_eq!(k, Inputs::of(&rt, &m).unwrap().key(), "stable");
        let more_mem = Machine {
            mem_mib: 512,
            ..Machine::default()
        };
        assert_ne!(k, Inputs::of(&rt, &more_mem).unwrap().key());
        // A rebuilt guest image (new contents, new inode) is a new template.
        std::fs::write(d.path().join("image.new"), "image v2").unwrap();
        std::fs::rename(d.path().join("image.new"), d.path().join("image")).unwrap();
        let k2 = Inputs::of(&rt, &m).unwrap().key();
        assert_ne!(k, k2);
        // ...and it supersedes the old one (same paths, same machine).
        let old = Inputs::of(&rt, &m).unwrap();
        assert!(old.same_slot(&Inputs::of(&rt, &m).unwrap()));
        assert!(!old.same_slot(&Inputs::of(&rt, &more_mem).unwrap()));
        assert!(old.current());
        std::fs::write(d.path().join("kernel"), "kernel v2").unwrap();
        assert!(!old.current(), "a rewritten kernel");
    }

    #[test]
    fn a_missing_artifact_is_named() {
        let d = tempfile::tempdir().unwrap();
        let mut rt = rt(d.path());
        rt.kernel = d.path().join("no-kernel");
        let e = Template::ensure(&rt, &Machine::default()).unwrap_err();
        assert!(format!("{e:#}").contains("no-kernel"), "{e:#}");
    }
}
