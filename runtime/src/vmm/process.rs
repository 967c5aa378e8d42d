//! A husk-vmm process: started (confined when asked) with the descriptors
//! it inherits, watched through a pidfd, killed when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{shown, IoContext};
use crate::vmm::{Result, VmmError};

use crate::util::child::{keep_across_exec, Watched};
use crate::util::tail;
use crate::vmm::cgroup::Cgroup;
use crate::vmm::jail::{JailSpec, Plan};

/// A husk-vmm process with its sockets; killed when dropped. Confined, the
/// child is the jail's keeper (its exit is the VMM's).
pub struct VmmProcess {
    pub child: Watched,
    pub api: PathBuf,
    pub vsock: PathBuf,
    /// The VMM's cgroup, when confined; removed after it.
    pub cgroup: Option<Cgroup>,
}

impl VmmProcess {
    /// Starts husk-vmm with `args`, logging to `log`; it inherits the
    /// descriptors `inherit` (its tap, its address lease).
    pub fn spawn(
        vmm: &Path,
        args: &[&std::ffi::OsStr],
        api: PathBuf,
        vsock: PathBuf,
        log: &Path,
        inherit: &[i32],
        jail: Option<&JailSpec>,
    ) -> Result<VmmProcess> {
        let out = File::create(log).at(|| shown(log))?;
        let mut cmd = Command::new(vmm);
        let fds = inherit.to_vec();
        let (cgroup, plan) = match jail {
            Some(j) => {
                let cg = Cgroup::create(&j.cgroup)?;
                let plan = Plan::new(&j.root, &j.shares, Some(&cg))?;
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
                    keep_across_exec(*fd)?;
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
            .stdout(out.try_clone().at(|| shown(log))?)
            .stderr(out)
            .spawn()
            .at(|| format!("starting {}", vmm.display()))?;
        Ok(VmmProcess {
            child: Watched::new(child),
            api,
            vsock,
            cgroup,
        })
    }

    /// Fails with what the VMM said if it has exited.
    pub fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait().at(|| "waiting for husk-vmm")? {
            return Err(VmmError::Exited {
                status,
                log: tail(log, 2000),
            });
        }
        Ok(())
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.child.kill_and_wait();
    }
}
