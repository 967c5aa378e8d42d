//! Named volumes: an ext4 file system in a sparse file per volume, handed to
//! a sandbox as a read-write drive. A volume is used by one sandbox at a time
//! (two guest kernels writing one ext4 would corrupt it): using one takes an
//! exclusive lock that lives as long as the `VolumeLease`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::storage::{Result, StorageError};
use crate::util::{shown, IoContext};
use serde::{Deserialize, Serialize};

/// Size of a new volume's (sparse) file system.
pub const DEFAULT_SIZE: u64 = 1 << 30;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    /// The ext4 image.
    pub disk: PathBuf,
    pub size: u64,
}

pub struct VolumeStore {
    root: PathBuf,
}

/// Holds a volume for one sandbox; dropping it lets others use the volume.
pub struct VolumeLease {
    pub volume: Volume,
    _lock: File,
}

/// Volume names are directory names: Docker's rule.
pub fn check_name(name: &str) -> Result<()> {
    let ok = name.len() >= 2
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(StorageError::InvalidName(name.into()));
    }
    Ok(())
}

impl VolumeStore {
    pub fn open(root: &Path) -> Result<VolumeStore> {
        std::fs::create_dir_all(root).at(|| shown(root))?;
        Ok(VolumeStore {
            root: root.to_path_buf(),
        })
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn get(&self, name: &str) -> Result<Volume> {
        check_name(name)?;
        let meta = self.dir(name).join("volume.json");
        let bytes = match std::fs::read(&meta) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotFound(name.into()))
            }
            Err(e) => return Err(e).at(|| shown(&meta))?,
        };
        serde_json::from_slice(&bytes)
            .map_err(|source| StorageError::Corrupt { path: meta, source })
    }

    /// Creates `name` (an existing one is returned as it is, as Docker).
    pub fn create(&self, name: &str, size: u64) -> Result<Volume> {
        check_name(name)?;
        if let Ok(v) = self.get(name) {
            return Ok(v);
        }
        let dir = self.dir(name);
        let tmp = self.root.join(format!(".{name}.new"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).at(|| shown(&tmp))?;
        let disk = tmp.join("disk.ext4");
        File::create(&disk)
            .and_then(|f| f.set_len(size))
            .at(|| shown(&disk))?;
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-L"])
            .arg(&name[..name.len().min(16)])
            .arg(&disk)
            .output()
            .at(|| "running mkfs.ext4 (apt install e2fsprogs)")?;
        if !out.status.success() {
            return Err(StorageError::Mkfs {
                name: name.into(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let v = Volume {
            name: name.into(),
            disk: dir.join("disk.ext4"),
            size,
        };
        // A Volume (strings and a number) always serializes.
        let record = serde_json::to_vec_pretty(&v).unwrap_or_default();
        std::fs::write(tmp.join("volume.json"), record).at(|| shown(&tmp))?;
        if std::fs::rename(&tmp, &dir).is_err() {
            // Created meanwhile by another husk: theirs stands.
            let _ = std::fs::remove_dir_all(&tmp);
            return self.get(name);
        }
        Ok(v)
    }

    pub fn list(&self) -> Result<Vec<Volume>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .at(|| shown(&self.root))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Ok(v) = self.get(&name) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Takes `name` for one sandbox, creating it if missing.
    pub fn lease(&self, name: &str) -> Result<VolumeLease> {
        let volume = self.create(name, DEFAULT_SIZE)?;
        let lock = lock(&volume.disk, false)?.ok_or_else(|| StorageError::InUse(name.into()))?;
        Ok(VolumeLease {
            volume,
            _lock: lock,
        })
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let v = self.get(name)?;
        let _held = lock(&v.disk, false)?.ok_or_else(|| StorageError::InUse(name.into()))?;
        Ok(std::fs::remove_dir_all(self.dir(name)).at(|| format!("removing volume {name}"))?)
    }
}

/// An exclusive lock on a volume's disk; None if another holds it.
fn lock(path: &Path, wait: bool) -> Result<Option<File>> {
    let f = File::open(path).at(|| shown(path))?;
    Ok(crate::util::flock_exclusive(f, wait).at(|| format!("locking {}", path.display()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_made_listed_leased_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let s = VolumeStore::open(d.path()).unwrap();
        assert!(check_name("a").is_err());
        assert!(check_name("../x").is_err());
        let v = s.create("data", 16 << 20).unwrap();
        assert_eq!(s.create("data", 1).unwrap(), v, "create again keeps it");
        assert_eq!(s.list().unwrap(), vec![v.clone()]);
        let lease = s.lease("data").unwrap();
        let e = s.lease("data").err().expect("a second lease");
        assert!(format!("{e:#}").contains("in use"), "{e:#}");
        assert!(s.remove("data").is_err());
        drop(lease);
        s.remove("data").unwrap();
        assert!(s.get("data").is_err());
    }
}
