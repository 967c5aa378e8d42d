//! BareExec: one fork+exec of a command in an image's root, outside any
//! container. bench/run measures a container's start against it (the
//! floor: what starting the same program costs with no container around
//! it). The image's storages are mounted as for a create and released
//! after.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_protocol::agent::{BareExecRequest, BareExecResponse};

use super::{check_storage, relative_path, ContainersService, Invalid};
use crate::rpc::{causes, internal, invalid, time_left};
use crate::spawner::BARE_PATH;

/// Most arguments, and the longest one, a BareExec may carry.
const MAX_ARGS: usize = 64;
const MAX_ARG: usize = 4096;

/// What a BareExec must be before anything is mounted.
pub fn check_bare(req: &BareExecRequest) -> Result<(), Invalid> {
    relative_path("root", &req.root)?;
    if req.args.is_empty() || req.args.len() > MAX_ARGS {
        return Err(Invalid(format!(
            "{} args; send 1 to {MAX_ARGS}",
            req.args.len()
        )));
    }
    if let Some(a) = req
        .args
        .iter()
        .find(|a| a.len() > MAX_ARG || a.contains('\0'))
    {
        return Err(Invalid(format!(
            "arg {:?}…: longer than {MAX_ARG} bytes or holds a NUL byte",
            a.chars().take(32).collect::<String>()
        )));
    }
    if req.args[0].is_empty() {
        return Err(Invalid("args[0] is empty".into()));
    }
    for s in &req.storages {
        check_storage(s)?;
    }
    Ok(())
}

/// The program and what it loads read into the page cache, as a container
/// template's are (super::warm_parked): the floor is then measured with the
/// cache a parked container's launch has.
fn warm_program(root: &Path, program: &str) {
    if let Ok(r) = pathrs::Root::open(root) {
        let names = [program.to_string()];
        crate::warm::warm_names(&r, &names, BARE_PATH, Path::new("/"), super::WARM_BUDGET);
    }
}

impl ContainersService {
    pub fn bare_exec(
        &self,
        meta: &crate::rpc::Metadata,
        req: BareExecRequest,
    ) -> ttrpc::Result<BareExecResponse> {
        crate::rpc::check_version(meta)?;
        check_bare(&req)?;
        let _step = crate::profile::step("bare-exec");
        let mut taken = Vec::new();
        let t = Instant::now();
        let mut exec_time = Duration::ZERO;
        let r = (|| {
            for s in &req.storages {
                self.take_storage(s)?;
                taken.push(s.mount_point.clone());
            }
            let storage = self.dirs.storage();
            let storage_real = storage.canonicalize().unwrap_or_else(|_| storage.clone());
            let root = storage
                .join(&req.root)
                .canonicalize()
                .map_err(|e| invalid(format!("root {}: {e}", req.root)))?;
            if !root.starts_with(&storage_real) || !root.is_dir() {
                return Err(invalid(format!(
                    "root {} is not a directory inside the storage directory",
                    req.root
                )));
            }
            if req.warm {
                warm_program(&root, &req.args[0]);
            }
            let timeout = time_left(Duration::from_secs(30));
            let e = Instant::now();
            let r = self.spawner.bare(&root, &req.args, timeout);
            exec_time = e.elapsed();
            let (status, micros) =
                r.map_err(|e| internal(format!("bare exec of {:?}: {}", req.args[0], causes(&e))))?;
            Ok(BareExecResponse {
                status,
                micros,
                ..Default::default()
            })
        })();
        for point in taken {
            self.release_storage(&point);
        }
        r.map(|mut r| {
            r.setup_micros = t.elapsed().saturating_sub(exec_time).as_micros() as u64;
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(root: &str, args: &[&str]) -> BareExecRequest {
        BareExecRequest {
            root: root.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        assert!(check_bare(&req("img/rootfs", &["true"])).is_ok());
        for (r, why) in [
            (req("../etc", &["true"]), "relative path"),
            (req("/abs", &["true"]), "relative path"),
            (req("img", &[]), "send 1 to"),
            (req("img", &[""]), "args[0] is empty"),
            (req("img", &["a\0b"]), "NUL"),
        ] {
            let e = check_bare(&r).unwrap_err();
            assert!(e.0.contains(why), "{e}");
        }
        let many: Vec<&str> = vec!["x"; MAX_ARGS + 1];
        assert!(check_bare(&req("img", &many)).is_err());
    }
}
