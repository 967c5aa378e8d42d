//! What a request must be before anything is done for it: ids, paths
//! that stay inside their roots, storages, stdio names, specs and
//! processes. Pure functions (fuzzed: agent/fuzz).

use std::path::{Component, Path, PathBuf};

use husk_protocol::agent::{CreateContainerRequest, ExecProcessRequest, Stdio, Storage};
use nix::mount::MsFlags;
use oci_spec::runtime::{Process, Spec};

/// A request that is not valid, and why: the caller's mistake
/// (INVALID_ARGUMENT), found before anything is done for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<Invalid> for ttrpc::Error {
    fn from(e: Invalid) -> ttrpc::Error {
        crate::rpc::invalid(e.0)
    }
}

/// Filesystem types a Storage may name.
pub(super) const FSTYPES: &[&str] = &["erofs", "ext4", "virtiofs", "tmpfs"];

/// libcontainer's id rules: letters, digits, `_+-.`, not `.`/`..`, ≤ 128.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'))
}

/// A relative path of plain components: it cannot leave the directory it is
/// joined to, and it is safe in an overlay option string.
pub fn relative_path(field: &str, p: &str) -> Result<PathBuf, Invalid> {
    let path = Path::new(p);
    if p.is_empty()
        || p.len() > 1024
        || p.contains([',', ':', '\0'])
        || !path.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(Invalid(format!(
            "{field}: {p:?} must be a relative path of plain names (no '..', ',' or ':')"
        )));
    }
    Ok(path.to_path_buf())
}

/// Checks a Storage and returns its mount flags and data.
pub fn check_storage(s: &Storage) -> Result<(MsFlags, String), Invalid> {
    if !FSTYPES.contains(&s.fstype.as_str()) {
        return Err(Invalid(format!(
            "storage fstype {:?} is not one of {FSTYPES:?}",
            s.fstype
        )));
    }
    relative_path("storage mount_point", &s.mount_point)?;
    let ok_source = match s.fstype.as_str() {
        "erofs" | "ext4" => {
            s.source.starts_with("/dev/")
                && relative_path("source", &s.source["/dev/".len()..]).is_ok()
        }
        "virtiofs" => {
            !s.source.is_empty()
                && s.source.len() <= 36
                && s.source
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        }
        _ => s.source == "tmpfs",
    };
    if !ok_source {
        return Err(Invalid(format!(
            "storage source {:?} does not fit fstype {}",
            s.source, s.fstype
        )));
    }
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &s.options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            o if !o.is_empty()
                && o.len() <= 256
                && o.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"=_-.".contains(&b)) =>
            {
                data.push(o.to_string())
            }
            o => return Err(Invalid(format!("storage option {o:?} is not allowed"))),
        }
    }
    Ok((flags, data.join(",")))
}

pub(super) fn stdio_names(s: &Stdio, terminal: bool) -> Result<(), Invalid> {
    for (field, n) in [
        ("stdin", &s.stdin),
        ("stdout", &s.stdout),
        ("stderr", &s.stderr),
    ] {
        if !n.is_empty() && !husk_protocol::valid_stream_name(n) {
            return Err(Invalid(format!(
                "stdio.{field}: {n:?} is not a valid stream name"
            )));
        }
    }
    if terminal && !s.stderr.is_empty() {
        return Err(Invalid(
            "stdio.stderr must be empty with a terminal: its output is on stdout".into(),
        ));
    }
    Ok(())
}

/// A cgroups path: absolute, plain names.
pub(super) fn cgroups_path(p: &Path) -> Result<PathBuf, Invalid> {
    let s = p.to_string_lossy();
    match s.strip_prefix('/') {
        Some(rel) => relative_path("linux.cgroupsPath", rel).map(|_| p.to_path_buf()),
        None => Err(Invalid(format!(
            "linux.cgroupsPath {s:?} must be an absolute path"
        ))),
    }
}

/// Parses and checks what a CreateContainer request carries, before any
/// side effect: the spec, the storages, the rootfs path, the stdio names.
pub fn check_create(req: &CreateContainerRequest) -> Result<Spec, Invalid> {
    if !valid_id(&req.container_id) {
        return Err(Invalid(format!(
            "container_id {:?}: 1-128 of [A-Za-z0-9_+-.], not '.' or '..'",
            req.container_id
        )));
    }
    let spec: Spec =
        serde_json::from_slice(&req.oci_spec).map_err(|e| Invalid(format!("oci_spec: {e}")))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Invalid("oci_spec: no process".into()))?;
    if !matches!(process.args(), Some(a) if !a.is_empty()) {
        return Err(Invalid("oci_spec: process.args is empty".into()));
    }
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Invalid("oci_spec: no root".into()))?;
    relative_path("oci_spec root.path", &root.path().to_string_lossy())?;
    if let Some(p) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
        cgroups_path(&p)?;
    }
    for m in spec.mounts().iter().flatten() {
        if is_bind(m) {
            let src = m
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned());
            relative_path(
                &format!("bind mount on {}: source", m.destination().display()),
                src.as_deref().unwrap_or(""),
            )?;
        }
    }
    let mut points = Vec::new();
    for s in &req.storages {
        check_storage(s)?;
        if points.contains(&&s.mount_point) {
            return Err(Invalid(format!(
                "storage mount_point {:?} given twice",
                s.mount_point
            )));
        }
        points.push(&s.mount_point);
    }
    let stdio = req.stdio.as_ref().cloned().unwrap_or_default();
    let terminal = process.terminal().unwrap_or(false);
    stdio_names(&stdio, terminal)?;
    if req.parked {
        check_parked(&spec, &stdio, terminal)?;
    }
    Ok(spec)
}

/// What a parked container cannot have: stdio (its launch gives it), a
/// terminal (not relayed to a launched process yet), a seccomp filter
/// (its init receives its process under the filter, which may forbid
/// that) or hooks.
fn check_parked(spec: &Spec, stdio: &Stdio, terminal: bool) -> Result<(), Invalid> {
    if stdio != &Stdio::default() {
        return Err(Invalid(
            "parked: stdio must be empty (LaunchContainer gives the streams)".into(),
        ));
    }
    if terminal {
        return Err(Invalid(
            "parked: a process with a terminal cannot be parked yet".into(),
        ));
    }
    if spec.linux().as_ref().is_some_and(|l| l.seccomp().is_some()) {
        return Err(Invalid(
            "parked: a container with a seccomp filter cannot be parked yet".into(),
        ));
    }
    if spec.hooks().is_some() {
        // A parked container is started when it is made: its start hooks
        // would run then, once per template, not at each launch.
        return Err(Invalid(
            "parked: a container with OCI hooks cannot be parked".into(),
        ));
    }
    Ok(())
}

/// A bind mount, by type or by option (runc accepts either).
pub(super) fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// Parses and checks an exec request's process.
pub fn check_exec(req: &ExecProcessRequest) -> Result<Process, Invalid> {
    if !valid_id(&req.container_id) {
        return Err(Invalid(format!(
            "container_id {:?} is not valid",
            req.container_id
        )));
    }
    if !valid_id(&req.exec_id) {
        return Err(Invalid(format!(
            "exec_id {:?}: 1-128 of [A-Za-z0-9_+-.]",
            req.exec_id
        )));
    }
    let p: Process =
        serde_json::from_slice(&req.process).map_err(|e| Invalid(format!("process: {e}")))?;
    if !matches!(p.args(), Some(a) if !a.is_empty()) {
        return Err(Invalid("process.args is empty".into()));
    }
    if !p.cwd().is_absolute() {
        return Err(Invalid(format!(
            "process.cwd {:?} must be absolute",
            p.cwd()
        )));
    }
    let stdio = req.stdio.as_ref().cloned().unwrap_or_default();
    stdio_names(&stdio, p.terminal().unwrap_or(false))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn storage(source: &str, fstype: &str, point: &str) -> Storage {
        Storage {
            source: source.into(),
            fstype: fstype.into(),
            mount_point: point.into(),
            ..Default::default()
        }
    }

    #[test]
    pub(super) fn paths_cannot_escape() {
        assert!(relative_path("f", "images/busybox").is_ok());
        for bad in ["", "/abs", "../x", "a/../../b", "a,b", "a:b", "./a"] {
            assert!(relative_path("f", bad).is_err(), "{bad}");
        }
        assert!(cgroups_path(Path::new("/husk/c1")).is_ok());
        assert!(cgroups_path(Path::new("husk/c1")).is_err());
        assert!(cgroups_path(Path::new("/husk/../..")).is_err());
    }

    #[test]
    pub(super) fn storages_are_checked() {
        assert!(check_storage(&storage("/dev/vdb", "erofs", "img")).is_ok());
        assert!(check_storage(&storage("/dev/../etc", "erofs", "img")).is_err());
        assert!(check_storage(&storage("/dev/vdb", "nfs", "img")).is_err());
        assert!(check_storage(&storage("/dev/vdb", "ext4", "/img")).is_err());
        assert!(check_storage(&storage("tag1", "virtiofs", "img")).is_ok());
        let mut s = storage("tmpfs", "tmpfs", "t");
        s.options = vec!["ro".into(), "size=64m".into()];
        let (flags, data) = check_storage(&s).unwrap();
        assert!(flags.contains(MsFlags::MS_RDONLY));
        assert_eq!(data, "size=64m");
        s.options = vec!["lowerdir=/,x".into()];
        assert!(check_storage(&s).is_err());
    }

    #[test]
    pub(super) fn create_requests_are_checked() {
        let spec = br#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"img/rootfs"}}"#;
        let mut req = CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec: spec.to_vec(),
            ..Default::default()
        };
        check_create(&req).unwrap();
        req.container_id = "../c1".into();
        assert!(check_create(&req).unwrap_err().0.contains("container_id"));
        req.container_id = "c1".into();
        req.oci_spec = b"{not json".to_vec();
        assert!(check_create(&req).unwrap_err().0.starts_with("oci_spec"));
        req.oci_spec = spec.to_vec();
        req.stdio = Some(Stdio {
            stdout: "a/b".into(),
            ..Default::default()
        })
        .into();
        assert!(check_create(&req).unwrap_err().0.contains("stdio.stdout"));
        req.stdio = None.into();
        req.oci_spec =
            br#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"/"}}"#
                .to_vec();
        assert!(check_create(&req).unwrap_err().0.contains("root.path"));
    }
}
