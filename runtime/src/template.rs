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
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::jail::{JailSpec, Share};
use crate::vmm::api_request;
use crate::Lock;
use crate::Runtime;

/// Bumped when what a template holds, or how it is booted, changes.
pub const FORMAT: u32 = 3;
/// Read-only drive slots (container images) every guest has: vdb..vde.
pub const RO_SLOTS: usize = 4;
/// Read-write drive slots (volumes): vdf, vdg.
pub const RW_SLOTS: usize = 2;
/// How long a template's cold boot may take to agent-ready (guest kernels
/// are emulated on some hosts: tens of seconds there).
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// Kernel arguments of every husk guest: the agent as init, root on the
/// read-only erofs guest image. Quiet: console output is emulated I/O.
pub const BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off rootfstype=erofs init=/sbin/husk-agent quiet";

/// Every guest has one NIC (eth0 in the guest); the sandbox's tap backs
/// it after a restore.
pub const NET_IFACE: &str = "eth0";

/// The machine a sandbox gets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Machine {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// husk-vmm's host profile: "auto", "none" or a profile name.
    pub host_profile: String,
    /// A custom CPU template file, if any.
    pub cpu_template: Option<PathBuf>,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            vcpus: 1,
            mem_mib: 256,
            host_profile: "auto".into(),
            cpu_template: None,
        }
    }
}

/// A file input of a template, named precisely enough to see it change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct FileId {
    path: PathBuf,
    len: u64,
    mtime_ns: i128,
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> Result<FileId> {
        let path = path
            .canonicalize()
            .with_context(|| format!("{}", path.display()))?;
        let m = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
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

/// The drive id of slot `i` of a kind.
pub fn slot_id(read_only: bool, i: usize) -> String {
    format!("{}{i}", if read_only { "ro" } else { "rw" })
}

/// The guest device of slot `i` of a kind: slots follow the root drive
/// (vda), read-only ones first.
pub fn slot_device(read_only: bool, i: usize) -> String {
    let n = if read_only { i } else { RO_SLOTS + i };
    format!("/dev/vd{}", (b'b' + n as u8) as char)
}

/// husk-vmm's configuration for a guest with `slots` backing the drive
/// slots in order (read-only, then read-write).
pub(crate) fn vm_config(
    rt: &Runtime,
    machine: &Machine,
    slots: &[PathBuf],
    vsock: &Path,
    console: Option<&Path>,
    tap_fd: i32,
    fs_fd: Option<i32>,
) -> serde_json::Value {
    let mut drives = vec![serde_json::json!({
        "drive_id": "rootfs", "path_on_host": rt.guest_image,
        "is_root_device": true, "is_read_only": true,
    })];
    for (i, path) in slots.iter().enumerate() {
        let ro = i < RO_SLOTS;
        let n = if ro { i } else { i - RO_SLOTS };
        drives.push(serde_json::json!({
            "drive_id": slot_id(ro, n), "path_on_host": path,
            "is_root_device": false, "is_read_only": ro,
        }));
    }
    let mut mc = serde_json::json!({
        "vcpu_count": machine.vcpus, "mem_size_mib": machine.mem_mib,
        "host_profile": machine.host_profile,
    });
    if let Some(t) = &machine.cpu_template {
        mc["cpu_template"] = serde_json::json!(t);
    }
    let mut fs = serde_json::json!({"fs_id": crate::shared::FS_ID, "tag": crate::shared::FS_TAG});
    if let Some(fd) = fs_fd {
        fs["socket_fd"] = fd.into();
    }
    serde_json::json!({
        "boot-source": {"kernel_image_path": rt.kernel, "boot_args": BOOT_ARGS},
        "machine-config": mc,
        "drives": drives,
        "network-interfaces": [{"iface_id": NET_IFACE, "tap_fd": tap_fd}],
        "vsock": {"guest_cid": 3, "uds_path": vsock},
        "entropy": {},
        // Always there (a template's guest probes it); a backend only when
        // the sandbox shares host paths.
        "filesystems": [fs],
        "serial": console_config(console),
    })
}

pub(crate) fn console_config(console: Option<&Path>) -> serde_json::Value {
    match console {
        Some(p) => serde_json::json!({"output": {"file": p}}),
        None => serde_json::json!({"output": "none"}),
    }
}

/// A husk-vmm process with its sockets; killed when dropped. Confined, the
/// child is the jail's keeper (its exit is the VMM's).
pub(crate) struct VmmProcess {
    pub child: crate::child::Watched,
    pub api: PathBuf,
    pub vsock: PathBuf,
    /// The VMM's cgroup, when confined; removed after it.
    pub cgroup: Option<crate::jail::Cgroup>,
}

impl VmmProcess {
    /// Starts husk-vmm with `args`, logging to `log`; it inherits the
    /// descriptors `inherit` (its tap, its address lease).
    pub fn spawn(
        rt: &Runtime,
        args: &[&std::ffi::OsStr],
        api: PathBuf,
        vsock: PathBuf,
        log: &Path,
        inherit: &[i32],
        jail: Option<&crate::jail::JailSpec>,
    ) -> Result<VmmProcess> {
        let out = File::create(log).with_context(|| format!("{}", log.display()))?;
        let mut cmd = Command::new(&rt.vmm);
        let fds = inherit.to_vec();
        let (cgroup, plan) = match jail {
            Some(j) => {
                let cg = crate::jail::Cgroup::create(&j.cgroup)?;
                let plan = crate::jail::Plan::new(&j.root, &j.shares, Some(&cg))
                    .context("preparing the VMM's jail")?;
                (Some(cg), Some(plan))
            }
            None => (None, None),
        };
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe syscalls (fcntl; the jail's mount, unshare,
        // fork, chroot, set*id) on data prepared before; it allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &fds {
                    crate::network::keep_across_exec(*fd)?;
                }
                if let Some(p) = &plan {
                    p.enter()?;
                }
                Ok(())
            });
        }
        let child = cmd
            .args(args)
            .arg("--api-sock")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", rt.vmm.display()))?;
        Ok(VmmProcess {
            child: crate::child::Watched::new(child),
            api,
            vsock,
            cgroup,
        })
    }

    /// Fails with what the VMM said if it has exited.
    pub fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("husk-vmm exited ({status}): {}", tail(log, 2000));
        }
        Ok(())
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.child.kill_and_wait();
    }
}

/// The last `max` bytes of a log file, for error messages.
pub(crate) fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
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
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        let _lock = Lock::take(&dir.join("lock"), true)?;
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
        std::fs::write(&ready, serde_json::to_vec_pretty(&inputs)?)
            .with_context(|| format!("{}", ready.display()))?;
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
        std::fs::create_dir_all(&work)?;
        File::create(&self.placeholder)
            .with_context(|| format!("{}", self.placeholder.display()))?;
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
        std::fs::write(&cfg, serde_json::to_vec_pretty(&config)?)?;
        let log = self.dir.join("vmm.log");
        let started = Instant::now();
        let mut vmm = VmmProcess::spawn(
            rt,
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
        crate::sandbox::wait_for_agent(&mut vmm, &log, BOOT_TIMEOUT).with_context(|| {
            format!(
                "template {}: the guest did not get to agent-ready; console: {}",
                self.key,
                tail(&console, 2000)
            )
        })?;
        let boot = started.elapsed();
        let tmp_snap = work.join("vm.snap");
        let tmp_mem = work.join("vm.mem");
        let call = |method: &str, path: &str, body: String| -> Result<()> {
            let (status, text) = api_request(&vmm.api, method, path, &body)?;
            if status >= 300 {
                bail!("{method} {path}: {status} {text}");
            }
            Ok(())
        };
        call("PATCH", "/vm", r#"{"state": "Paused"}"#.into())?;
        call(
            "PUT",
            "/snapshot/create",
            serde_json::json!({"snapshot_path": tmp_snap, "mem_file_path": tmp_mem}).to_string(),
        )?;
        drop(vmm);
        std::fs::rename(&tmp_mem, &self.memory)?;
        std::fs::rename(&tmp_snap, &self.snapshot)?;
        let _ = std::fs::rename(&console, self.dir.join("boot.log"));
        let _ = std::fs::remove_dir_all(&work);
        let mut note = File::create(self.dir.join("built"))?;
        writeln!(
            note,
            "cold boot to agent-ready: {:.2} s",
            boot.as_secs_f64()
        )?;
        Ok(boot)
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
        if let Ok(Some(_l)) = Lock::take(&dir.join("lock"), false) {
            // Restored VMs keep their mappings of a removed memory file.
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

impl Runtime {
    /// The jail for a VMM whose sockets and files live in `dir`: `dir`
    /// (writable), the kernel, guest image and CPU template (read-only)
    /// and `shares`; None when confinement is off.
    pub(crate) fn jail_for(
        &self,
        dir: &Path,
        cgroup: &str,
        mut shares: Vec<Share>,
        machine: &Machine,
    ) -> Option<JailSpec> {
        if !self.confine {
            return None;
        }
        shares.insert(0, Share::rw(dir));
        // Executed inside the jail: its own binary, at its host path.
        shares.push(Share::ro(&self.vmm));
        shares.push(Share::ro(&self.kernel));
        shares.push(Share::ro(&self.guest_image));
        if let Some(t) = &machine.cpu_template {
            shares.push(Share::ro(t));
        }
        Some(JailSpec {
            root: dir.join("jail"),
            shares,
            cgroup: cgroup.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(dir: &Path) -> Runtime {
        for f in ["vmm", "kernel", "image"] {
            std::fs::write(dir.join(f), f).unwrap();
        }
        Runtime {
            vmm: dir.join("vmm"),
            kernel: dir.join("kernel"),
            guest_image: dir.join("image"),
            cache_dir: dir.join("cache"),
            run_dir: dir.join("run"),
            network: crate::network::NetworkConfig::default(),
            confine: false,
            virtiofsd: "/nonexistent".into(),
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
    fn the_virtio_fs_device_is_always_there_and_backed_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let rt = rt(d.path());
        let m = Machine::default();
        let v = Path::new("/v.sock");
        let plain = vm_config(&rt, &m, &[], v, None, 5, None);
        assert_eq!(
            plain["filesystems"],
            serde_json::json!([{"fs_id": "shared", "tag": "husk-shared"}])
        );
        let backed = vm_config(&rt, &m, &[], v, None, 5, Some(7));
        assert_eq!(
            backed["filesystems"],
            serde_json::json!([{"fs_id": "shared", "tag": "husk-shared", "socket_fd": 7}])
        );
    }

    #[test]
    fn slots_map_to_guest_devices() {
        assert_eq!(slot_device(true, 0), "/dev/vdb");
        assert_eq!(slot_device(true, RO_SLOTS - 1), "/dev/vde");
        assert_eq!(slot_device(false, 0), "/dev/vdf");
        assert_eq!(slot_id(false, 1), "rw1");
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
