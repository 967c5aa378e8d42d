//! A confined VMM's cgroup: it accounts the VMM's memory and CPU, and
//! kills every process of a sandbox whose holder died without cleaning up.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::util::{shown, IoContext};
use crate::vmm::Result;

/// A VMM's cgroup: v2 (`/sys/fs/cgroup/husk/<name>`) where the unified
/// hierarchy has the memory controller, else v1 memory and cpu
/// hierarchies (`.../memory/husk/<name>`, `.../cpu/husk/<name>`).
#[derive(Debug)]
pub struct Cgroup {
    pub dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, open for the child to join by writing "0".
    pub(crate) procs: Vec<File>,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl Cgroup {
    /// A new group for `name` (a sandbox id), made unique: ids are unique
    /// per run directory only.
    pub fn create(name: &str) -> Result<Cgroup> {
        let name = format!("{name}-{}", crate::util::random_hex(4)?);
        let name = name.as_str();
        let root = Path::new(CGROUP_ROOT);
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
        let parents: Vec<PathBuf> = if v2 {
            let husk = root.join("husk");
            std::fs::create_dir_all(&husk).at(|| shown(&husk))?;
            // Controllers reach the sandboxes' groups through husk's.
            std::fs::write(husk.join("cgroup.subtree_control"), "+memory +cpu")
                .at(|| format!("enabling memory and cpu in {}", husk.display()))?;
            vec![husk]
        } else {
            ["memory", "cpu"]
                .iter()
                .map(|c| root.join(c).join("husk"))
                .collect()
        };
        let mut dirs = Vec::new();
        let mut procs = Vec::new();
        for p in &parents {
            sweep(p);
        }
        for p in parents {
            let d = p.join(name);
            std::fs::create_dir_all(&d).at(|| format!("creating cgroup {}", d.display()))?;
            let f = File::options()
                .write(true)
                .open(d.join("cgroup.procs"))
                .at(|| shown(&d.join("cgroup.procs")))?;
            dirs.push(d);
            procs.push(f);
        }
        Ok(Cgroup { dirs, procs })
    }

    /// The groups of a VMM started by an earlier process (a sandbox found
    /// again): removed, with what runs in them, when this is dropped.
    pub fn existing(dirs: Vec<PathBuf>) -> Cgroup {
        Cgroup {
            dirs,
            procs: Vec::new(),
        }
    }

    /// Memory charged to the group (the VMM: guest RAM it touched, its own
    /// heap, page cache of its files), bytes.
    pub fn memory(&self) -> Option<u64> {
        self.dirs.iter().find_map(|d| {
            ["memory.current", "memory.usage_in_bytes"]
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
                .and_then(|s| s.trim().parse().ok())
        })
    }
}

/// Removes groups under `parent` that a husk killed before its cleanup
/// left: empty, and older than a minute (a group just made by a sandbox
/// that is starting is empty too, briefly).
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let d = e.path();
        let old = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 60);
        let empty =
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
        if d.is_dir() && old && empty {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.procs.clear();
        kill_and_remove(&self.dirs);
    }
}

/// Kills what runs in `dirs` (VMMs whose sandbox is gone) and removes them.
fn kill_and_remove(dirs: &[PathBuf]) {
    for d in dirs {
        for pid in std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid read from our own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for d in dirs {
        // Empty once the VMM and its keeper are reaped; give a dying VMM a
        // few seconds.
        for _ in 0..250 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Kills the VMMs of sandbox `name` that outlived the process holding
/// them (a shim killed with SIGKILL) and removes their cgroups: the groups
/// `<name>-<8 hex>` that `Cgroup::create` makes.
pub fn kill_groups_of(name: &str) {
    let root = Path::new(CGROUP_ROOT);
    let parents = [
        root.join("husk"),
        root.join("memory/husk"),
        root.join("cpu/husk"),
    ];
    let mut dirs = Vec::new();
    for p in parents {
        let Ok(entries) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let ours = n
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|r| r.len() == 8 && r.bytes().all(|b| b.is_ascii_hexdigit()));
            if ours {
                dirs.push(e.path());
            }
        }
    }
    kill_and_remove(&dirs);
}
