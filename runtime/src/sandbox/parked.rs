//! Container-ready templates: snapshots of a restored guest with its
//! container created and parked (the agent's containers/parked.rs), so a
//! start restores to a container that only has to exec.
//!
//! Why: creating a container is most of a start where the guest kernel is
//! emulated (libcontainer's create ~4.4 s of a ~9 s `husk run`,
//! docs/warm-starts.md), and it is the same work every time for the same
//! image and spec.
//!
//! The first start of a (base template, image, parked spec) builds one on
//! its way: the base template restored, placeholder sandbox files, the
//! container parked, the VM paused, snapshotted and resumed. It then goes
//! on exactly as later starts do, which restore the snapshot instead: the
//! sandbox's identity (StartSandbox rewrites the files in place, which the
//! parked container has bound), then LaunchContainer with the run's args,
//! environment, streams, host name and id.
//!
//! They live under their base template's directory (a rebuilt base takes
//! them with it), at most `KEEP` per base, the least recently used removed
//! first. A build is skipped, not waited for, while another process builds
//! the same one.
//!
//! Each template's `lock` (flock) keeps its files whole while they are
//! read: a restore holds it shared from finding the template until its
//! VMM has loaded the files (a restored VM keeps its own mapping after
//! that), a build or an eviction exclusively and without waiting, so
//! neither replaces nor removes files a restore is opening; each skips
//! instead. Forgetting a template (removing its `ready`) needs no lock: it
//! changes no file a restore reads, and a start that skipped it must not
//! keep a broken one in use.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use husk_protocol::agent::{CreateSandboxRequest, Storage};
use husk_vmm_api::{CreateRequest, VmState};
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guest::{ctx, AgentConn, GuestError, RpcError};
use crate::sandbox::template::{FileId, Template, SNAPSHOT_TIMEOUT};
use crate::sandbox::{Result, SandboxError};
use crate::util::{shown, IoContext, Lock};
use crate::vmm::{VmmClient, VmmError, VmmProcess};

/// A parked container's id in its guest until its launch renames it.
pub const PARKED_ID: &str = "parked";
/// Container templates kept per base template. Each holds a memory file
/// as large as the guest's RAM (sparse: what the guest touched).
pub const KEEP: usize = 8;
/// Bumped when what a container template holds changes.
const FORMAT: u32 = 2;
/// The placeholder a parked spec has for its program (never run, never
/// looked up).
const PLACEHOLDER_ARG: &str = "husk-parked";

/// A container to park in a sandbox before it is given its identity.
#[derive(Clone, Debug)]
pub struct Park {
    /// The spec as parked (`Park::new`).
    pub spec: Spec,
    /// The image's erofs (drive 0): part of the key.
    pub image: PathBuf,
    /// The program of the run that builds it, and the $PATH it is looked
    /// up with: read into the template's page cache (not part of the key;
    /// a later run of another program only reads its own from the drive).
    pub warm: Option<(String, String)>,
}

/// What happened to a sandbox's parked container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Parked {
    /// None was asked for.
    #[default]
    No,
    /// Restored with the container parked (`pid` in the guest).
    Restored { pid: u32 },
    /// Parked now, and the template built from it (the first start).
    Built { pid: u32 },
    /// Parked now; snapshotting it failed, so the next start builds again.
    NotSnapshotted { pid: u32, why: String },
    /// It could not be parked: the container is created the usual way,
    /// which reports the same problem if it is the spec's.
    Failed(String),
}

impl Parked {
    /// The parked container's pid, when there is one to launch.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Parked::Restored { pid } | Parked::Built { pid } => Some(*pid),
            Parked::NotSnapshotted { pid, .. } => Some(*pid),
            Parked::No | Parked::Failed(_) => None,
        }
    }

    /// One word for timings lines.
    pub fn word(&self) -> &'static str {
        match self {
            Parked::No => "no",
            Parked::Restored { .. } => "restored",
            Parked::Built { .. } => "built",
            Parked::NotSnapshotted { .. } => "not-snapshotted",
            Parked::Failed(_) => "failed",
        }
    }
}

impl Park {
    /// `spec` in its parked form: what may differ between runs of the same
    /// container (args, environment, host name) replaced by placeholders.
    pub fn new(spec: &Spec, image: &Path) -> Park {
        let warm = spec.process().as_ref().and_then(|p| {
            let program = p.args().as_ref()?.first()?.clone();
            let path = p
                .env()
                .as_ref()?
                .iter()
                .find_map(|e| e.strip_prefix("PATH="))?;
            Some((program, path.to_string()))
        });
        let mut spec = spec.clone();
        if let Some(mut p) = spec.process().clone() {
            p.set_args(Some(vec![PLACEHOLDER_ARG.to_string()]));
            // libcontainer then finds HOME for the user, as it would for
            // an environment without one; the launch's HOME wins.
            p.set_env(Some(Vec::new()));
            spec.set_process(Some(p));
        }
        spec.set_hostname(Some(PARKED_ID.to_string()));
        Park {
            spec,
            image: image.to_path_buf(),
            warm,
        }
    }

    /// Its template's key under `base`.
    pub(super) fn key(&self, base: &Template) -> Result<String> {
        #[derive(Serialize)]
        struct Inputs<'a> {
            format: u32,
            base: &'a str,
            image: FileId,
            spec: serde_json::Value,
        }
        let encode = |source| SandboxError::Encode {
            what: "a container template's inputs",
            source,
        };
        let json = serde_json::to_vec(&Inputs {
            format: FORMAT,
            base: &base.key,
            image: FileId::of(&self.image)?,
            spec: canonical(serde_json::to_value(&self.spec).map_err(encode)?),
        })
        .map_err(encode)?;
        let digest = Sha256::digest(&json);
        Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// `v` with the same bytes whenever it means the same: objects' keys
/// sorted, and the capability sets (hash sets in oci-spec, serialized in
/// a per-process random order) sorted.
fn canonical(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let sorted: std::collections::BTreeMap<String, Value> = m
                .into_iter()
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("capabilities", Value::Object(sets)) => Value::Object(
                            sets.into_iter()
                                .map(|(set, caps)| (set, sorted_array(caps)))
                                .collect(),
                        ),
                        (_, v) => v,
                    };
                    (k, canonical(v))
                })
                .collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(canonical).collect()),
        v => v,
    }
}

fn sorted_array(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Array(mut a) => {
            a.sort_by_key(|x| x.to_string());
            serde_json::Value::Array(a)
        }
        v => v,
    }
}

/// What a ready container template records.
#[derive(Serialize, Deserialize)]
struct Ready {
    key: String,
    /// The parked container's pid in the guest.
    pid: u32,
}

fn dir_of(base: &Template, key: &str) -> PathBuf {
    base.dir.join("containers").join(key)
}

/// The template `key` under `base` as a restorable `Template`.
fn as_template(base: &Template, key: &str) -> Template {
    let dir = dir_of(base, key);
    Template {
        key: format!("{}/{key}", base.key),
        snapshot: dir.join("vm.snap"),
        memory: dir.join("vm.mem"),
        // Unused slots name the base's placeholder: the VM parked was
        // restored from the base.
        placeholder: base.placeholder.clone(),
        dir,
        built: false,
        boot_time: None,
    }
}

/// A container template found, its files kept as they are while this is
/// held.
pub(super) struct Found {
    pub template: Template,
    /// The parked container's pid in the guest.
    pub pid: u32,
    /// Shared: no build or eviction meanwhile.
    pub lock: Lock,
}

/// The ready container template `key` under `base`; marked used now (it
/// is kept longer). None while it is being built or evicted.
pub(super) fn find(base: &Template, key: &str) -> Option<Found> {
    let t = as_template(base, key);
    let lock = Lock::share(&t.dir.join("lock")).ok()??;
    let pid = ready_pid(&t, key)?;
    if let Ok(f) = std::fs::File::options()
        .write(true)
        .open(t.dir.join("ready"))
    {
        let _ = f.set_modified(SystemTime::now());
    }
    Some(Found {
        template: t,
        pid,
        lock,
    })
}

/// The parked pid recorded when `t`'s files are those of a finished
/// build of `key`.
fn ready_pid(t: &Template, key: &str) -> Option<u32> {
    let ready = std::fs::read(t.dir.join("ready")).ok()?;
    let ready: Ready = serde_json::from_slice(&ready).ok()?;
    (ready.key == key && t.snapshot.exists() && t.memory.exists()).then_some(ready.pid)
}

/// Forgets template `t` (a restore or launch from it failed): the next
/// start builds it again.
pub(super) fn invalidate(t: &Template) {
    let _ = std::fs::remove_file(t.dir.join("ready"));
}

/// Parks `park` in the guest behind `agent` (restored from `base`, not yet
/// given its identity): placeholder sandbox files first, as the container
/// binds them. Returns the parked container's pid.
pub(super) fn park(agent: &AgentConn, park: &Park, image_device: &str) -> Result<u32> {
    let files = CreateSandboxRequest {
        hostname: PARKED_ID.into(),
        ..Default::default()
    };
    agent
        .sandbox
        .create_sandbox(ctx(crate::guest::SLOW_CALL), &files)
        .map_err(|e| GuestError::from(RpcError::new("CreateSandbox (placeholder)", &e)))?;
    let storage = Storage {
        source: image_device.into(),
        fstype: "erofs".into(),
        options: vec!["ro".into()],
        mount_point: "image".into(),
        ..Default::default()
    };
    Ok(agent.park(
        PARKED_ID,
        &park.spec,
        vec![storage],
        true,
        park.warm.as_ref(),
    )?)
}

/// Snapshots the running VM `vmm` (its container parked, `pid`) as the
/// template `key` under `base`, and resumes it. The VMM writes into
/// `staging` (the sandbox's directory: a confined VMM sees no other);
/// the files are then moved into the cache. Skipped (Ok(false)) while
/// another process builds the same one.
pub(super) fn snapshot(
    base: &Template,
    key: &str,
    vmm: &VmmProcess,
    staging: &Path,
    pid: u32,
) -> Result<bool> {
    let t = as_template(base, key);
    std::fs::create_dir_all(&t.dir).at(|| shown(&t.dir))?;
    let Some(_lock) = Lock::take(&t.dir.join("lock"), false)? else {
        return Ok(false);
    };
    // The base was superseded and is being removed: a template under it
    // would be left behind, unused.
    if !base.dir.join("ready").exists() {
        return Ok(false);
    }
    // Another start built it since this one looked: kept as it is.
    if ready_pid(&t, key).is_some() {
        return Ok(false);
    }
    let ready = t.dir.join("ready");
    let _ = std::fs::remove_file(&ready);
    let (snap, mem) = (staging.join("parked.snap"), staging.join("parked.mem"));
    let api = VmmClient::new(&vmm.api, SNAPSHOT_TIMEOUT);
    api.set_state(VmState::Paused).map_err(VmmError::from)?;
    let made = api.create_snapshot(&CreateRequest {
        snapshot_path: snap.clone(),
        mem_file_path: mem.clone(),
    });
    // Resumed whatever the snapshot did: this start goes on.
    api.set_state(VmState::Resumed).map_err(VmmError::from)?;
    made.map_err(VmmError::from)?;
    move_file(&mem, &t.memory)?;
    move_file(&snap, &t.snapshot)?;
    let json = serde_json::to_vec(&Ready {
        key: key.into(),
        pid,
    })
    .map_err(|source| SandboxError::Encode {
        what: "a container template's record",
        source,
    })?;
    std::fs::write(&ready, json).at(|| shown(&ready))?;
    drop(_lock);
    evict(&base.dir.join("containers"), KEEP);
    Ok(true)
}

/// Moves `from` to `to`: a rename, or where they are on different file
/// systems (the run directory is often tmpfs, the cache on disk), a copy
/// of its data only (the memory file is as large as the guest's RAM and
/// mostly holes) through a temporary name (a reader never sees half a
/// file).
fn move_file(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let tmp = to.with_extension("tmp");
            sparse_copy(from, &tmp).at(|| shown(&tmp))?;
            std::fs::rename(&tmp, to).at(|| shown(to))?;
            let _ = std::fs::remove_file(from);
            Ok(())
        }
        r => Ok(r.at(|| shown(to))?),
    }
}

/// Copies `from`'s data extents to a new `to` of the same length, leaving
/// its holes holes (SEEK_DATA/SEEK_HOLE).
fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(from)?;
    let dst = std::fs::File::create(to)?;
    let len = src.metadata()?.len();
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; it moves only its offset.
        let r = unsafe { libc::lseek(src.as_raw_fd(), off as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match std::io::Error::last_os_error() {
            // No data at or after `off`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let Some(data) = seek(off, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = data;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        off = end;
    }
    dst.set_len(len)?;
    dst.sync_all()
}

/// Removes the least recently used container templates in `root` beyond
/// `keep` (one being built or restored elsewhere, locked, is left).
fn evict(root: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut all: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .map(|d| {
            let used = std::fs::metadata(d.join("ready"))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (used, d)
        })
        .collect();
    if all.len() <= keep {
        return;
    }
    all.sort();
    let extra = all.len() - keep;
    for (_, dir) in all.into_iter().take(extra) {
        if let Ok(Some(_l)) = Lock::take(&dir.join("lock"), false) {
            // Restored VMs keep their mappings of a removed memory file.
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Exclusive locks on all container templates of the base template in
/// `base_dir`, taken without waiting: None while one is being restored or
/// built (its base must stay).
pub(super) fn lock_all(base_dir: &Path) -> Option<Vec<Lock>> {
    let Ok(entries) = std::fs::read_dir(base_dir.join("containers")) else {
        return Some(Vec::new());
    };
    entries
        .flatten()
        .map(|e| Lock::take(&e.path().join("lock"), false).ok().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_parked_form_drops_what_differs_between_runs() {
        let mut a = crate::container::spec::base_spec("image", vec!["sh".into()], false);
        a.set_hostname(Some("web-1".into()));
        let mut b = crate::container::spec::base_spec("image", vec!["nginx".into()], false);
        b.set_hostname(Some("web-2".into()));
        let mut p = b.process().clone().unwrap();
        p.set_env(Some(vec!["A=1".into()]));
        b.set_process(Some(p));
        let img = Path::new("/img");
        let form = |s: &Spec| canonical(serde_json::to_value(&Park::new(s, img).spec).unwrap());
        assert_eq!(form(&a), form(&b));
        // What the init applies before it parks stays: another cwd is
        // another template.
        let mut c = a.clone();
        let mut p = c.process().clone().unwrap();
        p.set_cwd("/srv".into());
        c.set_process(Some(p));
        assert_ne!(form(&a), form(&c));
        // The capability sets' order (random per process) is not part of it.
        let mut shuffled = serde_json::to_value(&a).unwrap();
        shuffled["process"]["capabilities"]["bounding"] =
            serde_json::json!(["CAP_KILL", "CAP_AUDIT_WRITE", "CAP_NET_BIND_SERVICE"]);
        let mut again = shuffled.clone();
        again["process"]["capabilities"]["bounding"] =
            serde_json::json!(["CAP_AUDIT_WRITE", "CAP_NET_BIND_SERVICE", "CAP_KILL"]);
        assert_eq!(canonical(shuffled), canonical(again));
    }

    #[test]
    fn a_sparse_copy_keeps_the_data_and_the_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let (from, to) = (d.path().join("from"), d.path().join("to"));
        let f = std::fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 20 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        sparse_copy(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        // Far fewer blocks than 64 MiB (the file system's allocation
        // granularity aside).
        let blocks = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(blocks < 8 << 20, "{blocks} bytes allocated");
    }

    #[test]
    fn a_template_being_read_is_neither_replaced_nor_evicted() {
        let d = tempfile::tempdir().unwrap();
        let base = Template {
            key: "base".into(),
            dir: d.path().to_path_buf(),
            snapshot: d.path().join("vm.snap"),
            memory: d.path().join("vm.mem"),
            placeholder: d.path().join("empty.img"),
            built: false,
            boot_time: None,
        };
        let t = as_template(&base, "k");
        std::fs::create_dir_all(&t.dir).unwrap();
        std::fs::write(&t.snapshot, b"s").unwrap();
        std::fs::write(&t.memory, b"m").unwrap();
        let ready = serde_json::to_vec(&Ready {
            key: "k".into(),
            pid: 7,
        })
        .unwrap();
        std::fs::write(t.dir.join("ready"), ready).unwrap();
        std::fs::write(t.dir.join("lock"), b"").unwrap();

        let found = find(&base, "k").expect("ready");
        assert_eq!(found.pid, 7);
        // A second reader shares it; a build and an eviction skip it
        // while it is read.
        assert!(find(&base, "k").is_some());
        assert!(Lock::take(&t.dir.join("lock"), false).unwrap().is_none());
        evict(&base.dir.join("containers"), 0);
        assert!(t.dir.exists());
        assert!(
            lock_all(&base.dir).is_none(),
            "its base stays while it is read"
        );
        drop(found);
        assert_eq!(lock_all(&base.dir).map(|l| l.len()), Some(1));

        // Being built (or evicted): not found meanwhile.
        let building = Lock::take(&t.dir.join("lock"), false).unwrap().unwrap();
        assert!(find(&base, "k").is_none());
        drop(building);
        // Forgotten even while read: it is broken for every reader.
        let reading = find(&base, "k").expect("ready");
        invalidate(&t);
        drop(reading);
        assert!(find(&base, "k").is_none(), "forgotten");
    }

    #[test]
    fn the_least_recently_used_go_first() {
        let d = tempfile::tempdir().unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let dir = d.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            let f = std::fs::File::create(dir.join("ready")).unwrap();
            f.set_modified(old + Duration::from_secs(i as u64)).unwrap();
        }
        // "a" used last.
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("a/ready"))
            .unwrap();
        f.set_modified(SystemTime::now()).unwrap();
        evict(d.path(), 2);
        let left: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .filter(|n| d.path().join(n).exists())
            .collect();
        assert_eq!(left, ["a", "c"]);
    }
}
