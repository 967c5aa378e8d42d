//! The shim's options: a TOML file named by containerd's runtime options
//! (`runtimeoptions.v1.Options.config_path`, what CRI sends for
//! `[...runtimes.husk.options] ConfigPath = "..."` and `ctr run
//! --runtime-config-path`), else `HUSK_SHIM_CONFIG`, else
//! `/etc/husk/shim.toml` if it exists. Every key is optional:
//!
//! ```toml
//! vmm = "/usr/lib/husk/husk-vmm"
//! kernel = "/usr/lib/husk/vmlinux"
//! image = "/usr/lib/husk/rootfs.erofs"
//! vcpus = 2
//! memory_mib = 512
//! host_profile = "auto"
//! cpu_template = "/etc/husk/cpu-template.json"
//! rootfs = "drive"      # or "virtiofs"
//! ```
//!
//! `rootfs`: a container of its own (not a CRI pod's) gets its image's
//! layers as one erofs drive, its writes kept in the guest's memory, so it
//! can start from a container template ("drive", the default); "virtiofs"
//! shares containerd's mount instead, writes going to its snapshot
//! (shim/src/rootfs.rs).

use std::path::{Path, PathBuf};

use crate::error::{Result, ShimError};
use husk_runtime::util::{shown, IoContext};
use husk_runtime::{Machine, Runtime};
use serde::Deserialize;

const DEFAULT_PATH: &str = "/etc/husk/shim.toml";

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShimConfig {
    pub vmm: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub image: Option<PathBuf>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
    pub host_profile: Option<String>,
    pub cpu_template: Option<PathBuf>,
    pub rootfs: Option<String>,
}

impl ShimConfig {
    /// The configuration for a task created with `options` (containerd's
    /// CreateTaskRequest.options: type URL and bytes).
    pub fn find(type_url: &str, options: &[u8]) -> Result<ShimConfig> {
        let named = if type_url.ends_with("runtimeoptions.v1.Options") {
            config_path(options)?
        } else if type_url.is_empty() {
            None
        } else {
            return Err(ShimError::Config(format!(
                "runtime options of type {type_url:?}: husk takes runtimeoptions.v1.Options (ConfigPath)"
            )));
        };
        let path = named
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HUSK_SHIM_CONFIG").map(PathBuf::from))
            .or_else(|| {
                Path::new(DEFAULT_PATH)
                    .exists()
                    .then(|| DEFAULT_PATH.into())
            });
        match path {
            None => Ok(ShimConfig::default()),
            Some(p) => ShimConfig::load(&p),
        }
    }

    pub fn load(path: &Path) -> Result<ShimConfig> {
        let text = std::fs::read_to_string(path)
            .at(|| format!("reading the shim configuration {}", shown(path)))?;
        let c: ShimConfig = toml::from_str(&text).map_err(|source| ShimError::ConfigFile {
            path: path.to_path_buf(),
            source,
        })?;
        if c.vcpus == Some(0) {
            return Err(ShimError::Config(format!(
                "shim configuration {}: vcpus must be at least 1",
                path.display()
            )));
        }
        if let Some(r) = c
            .rootfs
            .as_deref()
            .filter(|r| !["drive", "virtiofs"].contains(r))
        {
            return Err(ShimError::Config(format!(
                "shim configuration {}: rootfs {r:?}: use \"drive\" or \"virtiofs\"",
                path.display()
            )));
        }
        if c.memory_mib.is_some_and(|m| m < 128) {
            return Err(ShimError::Config(format!(
                "shim configuration {}: memory_mib must be at least 128",
                path.display()
            )));
        }
        Ok(c)
    }

    /// Whether a container's layers may be its root as a drive.
    pub fn drive_root(&self) -> bool {
        self.rootfs.as_deref() != Some("virtiofs")
    }

    /// The runtime with the configured artifacts.
    pub fn runtime(&self) -> Result<Runtime> {
        let mut rt = Runtime::locate()?;
        if let Some(p) = &self.vmm {
            rt.vmm = p.clone();
        }
        if let Some(p) = &self.kernel {
            rt.kernel = p.clone();
        }
        if let Some(p) = &self.image {
            rt.guest_image = p.clone();
        }
        Ok(rt)
    }

    /// The VM's defaults (before a container's own limits size it up).
    pub fn apply(&self, machine: &mut Machine) {
        if let Some(v) = self.vcpus {
            machine.vcpus = v;
        }
        if let Some(m) = self.memory_mib {
            machine.mem_mib = m;
        }
        if let Some(p) = &self.host_profile {
            machine.host_profile = p.clone();
        }
        if let Some(t) = &self.cpu_template {
            machine.cpu_template = Some(t.clone());
        }
    }
}

/// `config_path` (field 2, a string) of a runtimeoptions.v1.Options
/// message.
fn config_path(bytes: &[u8]) -> Result<Option<String>> {
    use containerd_shim::protos::protobuf::CodedInputStream;
    let mut s = CodedInputStream::from_bytes(bytes);
    let mut path = None;
    while let Some(tag) = s.read_raw_tag_or_eof()? {
        match (tag >> 3, tag & 7) {
            (2, 2) => path = Some(s.read_string()?),
            (_, wire) => {
                let wt = containerd_shim::protos::protobuf::rt::WireType::new(wire).ok_or_else(
                    || {
                        ShimError::Config(format!(
                            "containerd's runtime options: bad wire type {wire}"
                        ))
                    },
                )?;
                s.skip_field(wt)?;
            }
        }
    }
    Ok(path.filter(|p| !p.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_path_comes_from_runtime_options() {
        // type_url "x" (field 1), config_path "/etc/husk/a.toml" (field 2).
        let mut b = vec![0x0a, 1, b'x', 0x12, 16];
        b.extend_from_slice(b"/etc/husk/a.toml");
        assert_eq!(
            config_path(&b).unwrap().as_deref(),
            Some("/etc/husk/a.toml")
        );
        assert_eq!(config_path(&[]).unwrap(), None);
        assert!(config_path(&[0x12, 50, b'a']).is_err());
        let e = ShimConfig::find("types.example/other.Options", &[]).unwrap_err();
        assert!(e.to_string().contains("runtimeoptions.v1.Options"), "{e}");
    }

    #[test]
    fn a_file_sets_the_vm_and_bad_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shim.toml");
        std::fs::write(&p, "vcpus = 2\nmemory_mib = 512\nkernel = \"/k\"\n").unwrap();
        let c = ShimConfig::load(&p).unwrap();
        let mut m = Machine::default();
        c.apply(&mut m);
        assert_eq!((m.vcpus, m.mem_mib), (2, 512));
        assert_eq!(c.kernel.as_deref(), Some(Path::new("/k")));
        std::fs::write(&p, "vcpu = 2\n").unwrap();
        let e = husk_runtime::util::chain(&ShimConfig::load(&p).unwrap_err());
        assert!(e.contains("vcpu"), "{e}");
        std::fs::write(&p, "memory_mib = 64\n").unwrap();
        let e = husk_runtime::util::chain(&ShimConfig::load(&p).unwrap_err());
        assert!(e.contains("at least 128"), "{e}");
    }
}
