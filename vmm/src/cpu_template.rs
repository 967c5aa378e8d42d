//! CPU templates (Firecracker's custom template format: CPUID and MSR
//! modifiers as bitmaps) and host profiles (a template plus the guest kernel
//! arguments a host needs).
//!
//! A template alone is not always enough: this machine's nested KVM (kvm_pvm)
//! puts XSAVE, POPCNT and SMAP back into the CPUID a VMM sets, so the guest must
//! also be told on its command line. A host profile carries both, is detected
//! and logged, and every CPUID bit the host refuses is logged after setting it.

use std::path::Path;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TemplateError {
    #[error("bad bitmap {bitmap:?}: {why}")]
    Bitmap { bitmap: String, why: &'static str },
    #[error("bad number {0:?}: expected decimal or 0x-prefixed hex")]
    Number(String),
    #[error("unknown register {0:?} (eax, ebx, ecx or edx)")]
    Register(String),
    #[error("reading CPU template {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {what}: {source}")]
    Parse {
        what: String,
        source: serde_json::Error,
    },
    #[error("unknown host profile {0:?} (built in: {1})")]
    UnknownProfile(String, String),
}

/// A bitmap: which bits to force (mask) and to what (value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bitmap {
    pub mask: u64,
    pub value: u64,
}

impl Bitmap {
    /// Parses `0b` followed by one of `0`, `1`, `x` per bit, most significant
    /// first; `_` separators are ignored. Fewer digits than `width` leave the
    /// high bits alone.
    pub fn parse(s: &str, width: u32) -> Result<Bitmap, TemplateError> {
        let err = |why| TemplateError::Bitmap {
            bitmap: s.to_string(),
            why,
        };
        let digits = s
            .strip_prefix("0b")
            .ok_or_else(|| err("must start with 0b"))?;
        let digits: Vec<char> = digits.chars().filter(|c| *c != '_').collect();
        if digits.is_empty() {
            return Err(err("no bits"));
        }
        if digits.len() > width as usize {
            return Err(err("more bits than the register has"));
        }
        let mut b = Bitmap::default();
        for (i, c) in digits.iter().rev().enumerate() {
            let bit = 1u64 << i;
            match c {
                '0' => b.mask |= bit,
                '1' => {
                    b.mask |= bit;
                    b.value |= bit;
                }
                'x' | 'X' => {}
                _ => return Err(err("bits must be 0, 1 or x")),
            }
        }
        Ok(b)
    }

    pub fn apply(&self, v: u64) -> u64 {
        (v & !self.mask) | (self.value & self.mask)
    }
}

fn parse_number(s: &str) -> Result<u32, TemplateError> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| TemplateError::Number(s.to_string()))
}

fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Num(u32),
        Str(String),
    }
    match N::deserialize(d)? {
        N::Num(n) => Ok(n),
        N::Str(s) => parse_number(&s).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidRegister {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl<'de> Deserialize<'de> for CpuidRegister {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "eax" => Ok(CpuidRegister::Eax),
            "ebx" => Ok(CpuidRegister::Ebx),
            "ecx" => Ok(CpuidRegister::Ecx),
            "edx" => Ok(CpuidRegister::Edx),
            _ => Err(serde::de::Error::custom(TemplateError::Register(s))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RegisterModifier {
    pub register: CpuidRegister,
    #[serde(deserialize_with = "bitmap32")]
    pub bitmap: Bitmap,
}

fn bitmap32<'de, D: Deserializer<'de>>(d: D) -> Result<Bitmap, D::Error> {
    Bitmap::parse(&String::deserialize(d)?, 32).map_err(serde::de::Error::custom)
}
fn bitmap64<'de, D: Deserializer<'de>>(d: D) -> Result<Bitmap, D::Error> {
    Bitmap::parse(&String::deserialize(d)?, 64).map_err(serde::de::Error::custom)
}

/// KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the subleaf must match.
pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
pub struct CpuidLeafModifier {
    #[serde(deserialize_with = "number")]
    pub leaf: u32,
    #[serde(deserialize_with = "number", default)]
    pub subleaf: u32,
    #[serde(default)]
    pub flags: u32,
    pub modifiers: Vec<RegisterModifier>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MsrModifier {
    #[serde(deserialize_with = "number")]
    pub addr: u32,
    #[serde(deserialize_with = "bitmap64")]
    pub bitmap: Bitmap,
}

/// A custom CPU template.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CpuTemplate {
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default)]
    pub msr_modifiers: Vec<MsrModifier>,
}

impl CpuTemplate {
    pub fn from_json(what: &str, json: &str) -> Result<Self, TemplateError> {
        serde_json::from_str(json).map_err(|source| TemplateError::Parse {
            what: what.to_string(),
            source,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, TemplateError> {
        let json = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&path.display().to_string(), &json)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Detect {
    /// The profile applies when /sys/module/<this> exists.
    pub sysfs_module: Option<String>,
}

/// What a host needs beyond a stock VMM setup.
#[derive(Debug, Clone, Deserialize)]
pub struct HostProfile {
    pub name: String,
    #[serde(default)]
    pub detect: Detect,
    #[serde(default)]
    pub kernel_args: Vec<String>,
    #[serde(default)]
    pub cpu_template: CpuTemplate,
}

/// Profiles compiled into the VMM; their source of truth is
/// guest-kernel/host-profiles/, shared with the qemu boot script.
const BUILT_IN: &[(&str, &str)] = &[(
    "kvm-pvm",
    include_str!("../../guest-kernel/host-profiles/kvm-pvm.json"),
)];

impl HostProfile {
    pub fn built_in(name: &str) -> Result<HostProfile, TemplateError> {
        let (_, json) = BUILT_IN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            TemplateError::UnknownProfile(
                name.to_string(),
                BUILT_IN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
        serde_json::from_str(json).map_err(|source| TemplateError::Parse {
            what: format!("built-in host profile {name}"),
            source,
        })
    }

    /// The built-in profile whose detection matches this host, with why.
    pub fn detect(
        sysfs_module_root: &Path,
    ) -> Result<Option<(HostProfile, String)>, TemplateError> {
        for (name, _) in BUILT_IN {
            let p = HostProfile::built_in(name)?;
            if let Some(m) = &p.detect.sysfs_module {
                if sysfs_module_root.join(m).exists() {
                    let why = format!("module {m} is loaded");
                    return Ok(Some((p, why)));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps() {
        let b = Bitmap::parse("0b1x0", 32).unwrap();
        assert_eq!(
            b,
            Bitmap {
                mask: 0b101,
                value: 0b100
            }
        );
        assert_eq!(b.apply(0b011), 0b110);
        assert_eq!(Bitmap::parse("0b1_0", 32).unwrap().mask, 0b11);
        assert!(Bitmap::parse("1x0", 32).is_err());
        assert!(Bitmap::parse("0b2", 32).is_err());
        assert!(Bitmap::parse("0b", 32).is_err());
        assert!(Bitmap::parse(&format!("0b{}", "x".repeat(33)), 32).is_err());
    }

    #[test]
    fn built_in_profile_parses_and_clears_what_the_emulator_cannot_run() {
        let p = HostProfile::built_in("kvm-pvm").unwrap();
        assert!(p.kernel_args.iter().any(|a| a == "noxsave"));
        let leaf1 = p
            .cpu_template
            .cpuid_modifiers
            .iter()
            .find(|m| m.leaf == 1)
            .unwrap();
        let ecx = leaf1
            .modifiers
            .iter()
            .find(|m| m.register == CpuidRegister::Ecx)
            .unwrap();
        // CX16 (13), POPCNT (23), XSAVE (26) are cleared.
        for bit in [13, 23, 26] {
            assert_eq!(ecx.bitmap.apply(u64::MAX) & (1 << bit), 0, "bit {bit}");
        }
        assert!(HostProfile::built_in("nope").is_err());
    }

    #[test]
    fn template_errors_name_the_problem() {
        let e = CpuTemplate::from_json(
            "t",
            r#"{"cpuid_modifiers":[{"leaf":"0xzz","modifiers":[]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("0xzz"), "{e}");
        let e = CpuTemplate::from_json(
            "t",
            r#"{"cpuid_modifiers":[{"leaf":1,"modifiers":[{"register":"esp","bitmap":"0b1"}]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("esp"), "{e}");
    }

    #[test]
    fn detection_uses_sysfs() {
        let d = tempfile::tempdir().unwrap();
        assert!(HostProfile::detect(d.path()).unwrap().is_none());
        std::fs::create_dir(d.path().join("kvm_pvm")).unwrap();
        let (p, why) = HostProfile::detect(d.path()).unwrap().unwrap();
        assert_eq!(p.name, "kvm-pvm");
        assert!(why.contains("kvm_pvm"));
    }
}
