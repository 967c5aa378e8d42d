//! OCI runtime specs for containers of an image, the way `docker run`
//! derives them: the image config's Entrypoint, Cmd, Env, WorkingDir and
//! User, overridden by what the user asked for.

use std::path::PathBuf;

use crate::container::{ContainerError::Invalid, Result};
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// What `husk run` may override.
#[derive(Clone, Debug, Default)]
pub struct ProcessOptions {
    /// Replaces the image's Cmd when not empty.
    pub cmd: Vec<String>,
    /// Replaces the image's Entrypoint (and drops its Cmd, as Docker does);
    /// `Some(vec![])` clears it.
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE`, after the image's (a key given again wins).
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// `uid[:gid]` or `root`.
    pub user: Option<String>,
    pub tty: bool,
    pub hostname: Option<String>,
    /// Memory limit in bytes (`--memory`).
    pub memory: Option<i64>,
    /// CPUs, fractional (`--cpus`): a CFS quota over a 100 ms period.
    pub cpus: Option<f64>,
    /// A network namespace of its own (`--network none`: loopback only)
    /// instead of the sandbox's.
    pub own_network: bool,
}

/// `--memory` values: bytes, or with a b/k/m/g suffix (Docker's).
pub fn parse_memory(s: &str) -> Result<i64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.chars().last() {
        Some('b') => (&t[..t.len() - 1], 1),
        Some('k') => (&t[..t.len() - 1], 1 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t.as_str(), 1),
    };
    let n: i64 = num
        .parse()
        .map_err(|_| Invalid(format!("memory {s:?}: a number with b, k, m or g")))?;
    let bytes = n.checked_mul(mult).filter(|b| *b >= 6 << 20);
    bytes.ok_or_else(|| Invalid(format!("memory {s:?}: at least 6m")))
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// runc's default spec (oci-spec's) with the root at `root` (relative to
/// the agent's storage directory), sharing the sandbox's network namespace
/// as containers of a pod do.
pub fn base_spec(root: &str, args: Vec<String>, terminal: bool) -> Spec {
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args));
    process.set_terminal(Some(terminal));
    spec.set_process(Some(process));
    let mut r = spec.root().clone().unwrap_or_default();
    r.set_path(PathBuf::from(root));
    r.set_readonly(Some(false));
    spec.set_root(Some(r));
    let mut linux = spec.linux().clone().unwrap_or_default();
    let ns: Vec<_> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Network)
        .collect();
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    spec
}

/// The capabilities `docker run` gives a container (moby's default set),
/// wider than runc's spec default: ping (NET_RAW), chown, setuid programs.
fn docker_capabilities() -> Result<oci_spec::runtime::LinuxCapabilities> {
    const CAPS: [&str; 14] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let set = serde_json::json!(CAPS);
    serde_json::from_value(serde_json::json!({
        "bounding": set, "effective": set, "permitted": set,
    }))
    .map_err(|source| crate::container::ContainerError::Json {
        what: "the default capabilities".into(),
        source,
    })
}

/// `uid[:gid]` (numbers) or `root`.
fn parse_user(u: &str) -> Result<(u32, u32)> {
    if u.is_empty() || u == "root" || u == "0" {
        return Ok((0, 0));
    }
    let (uid, gid) = u.split_once(':').unwrap_or((u, u));
    match (uid.parse(), gid.parse()) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        _ => Err(Invalid(format!(
            "user {u:?}: give a numeric uid[:gid] (user names are not looked up yet)"
        ))),
    }
}

/// The spec for a container of `image` with `opts` applied.
pub fn container_spec(
    image: &ImageConfiguration,
    opts: &ProcessOptions,
    root: &str,
) -> Result<Spec> {
    let cfg = image.config().clone().unwrap_or_default();
    let (entrypoint, image_cmd) = match &opts.entrypoint {
        Some(e) => (e.clone(), Vec::new()),
        None => (
            cfg.entrypoint().clone().unwrap_or_default(),
            cfg.cmd().clone().unwrap_or_default(),
        ),
    };
    let cmd = if opts.cmd.is_empty() {
        image_cmd
    } else {
        opts.cmd.clone()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(Invalid(
            "no command: the image has no Entrypoint or Cmd, and none was given".into(),
        ));
    }
    let mut env: Vec<String> = Vec::new();
    for e in cfg
        .env()
        .clone()
        .unwrap_or_default()
        .iter()
        .chain(&opts.env)
    {
        let Some((key, _)) = e.split_once('=') else {
            return Err(Invalid(format!("environment {e:?} is not KEY=VALUE")));
        };
        if key.is_empty() {
            return Err(Invalid(format!("environment {e:?} has no name")));
        }
        env.retain(|x| x.split_once('=').map(|(k, _)| k) != Some(key));
        env.push(e.clone());
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.into());
    }
    if opts.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let cwd = opts
        .workdir
        .clone()
        .or_else(|| cfg.working_dir().clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(Invalid(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }
    let user = opts
        .user
        .clone()
        .or_else(|| cfg.user().clone())
        .unwrap_or_default();
    let (uid, gid) = parse_user(&user)?;

    let mut spec = base_spec(root, args, opts.tty);
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(cwd));
    let mut u = process.user().clone();
    u.set_uid(uid);
    u.set_gid(gid);
    process.set_user(u);
    process.set_capabilities(Some(docker_capabilities()?));
    spec.set_process(Some(process));
    spec.set_hostname(opts.hostname.clone());
    if opts.own_network {
        let mut linux = spec.linux().clone().unwrap_or_default();
        let mut ns = linux.namespaces().clone().unwrap_or_default();
        let mut net = oci_spec::runtime::LinuxNamespace::default();
        net.set_typ(LinuxNamespaceType::Network);
        ns.push(net);
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
    }
    if opts.memory.is_some() || opts.cpus.is_some() {
        let mut resources = serde_json::json!({});
        if let Some(m) = opts.memory {
            resources["memory"] = serde_json::json!({"limit": m});
        }
        if let Some(c) = opts.cpus {
            if !(c > 0.0 && c <= 256.0) {
                return Err(Invalid(format!("cpus {c}: between 0 and 256")));
            }
            resources["cpu"] =
                serde_json::json!({"quota": (c * 100_000.0) as i64, "period": 100_000});
        }
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_resources(Some(serde_json::from_value(resources).map_err(
            |source| crate::container::ContainerError::Json {
                what: "the resource limits".into(),
                source,
            },
        )?));
        spec.set_linux(Some(linux));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(json: serde_json::Value) -> ImageConfiguration {
        serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": json,
        }))
        .unwrap()
    }

    fn process(img: &ImageConfiguration, opts: &ProcessOptions) -> oci_spec::runtime::Process {
        container_spec(img, opts, "image")
            .unwrap()
            .process()
            .clone()
            .unwrap()
    }

    #[test]
    fn docker_run_semantics() {
        let img = image(serde_json::json!({
            "Entrypoint": ["/bin/ep"], "Cmd": ["a"], "Env": ["A=1", "PATH=/bin"],
            "WorkingDir": "/w"
        }));
        let s = container_spec(&img, &ProcessOptions::default(), "image").unwrap();
        let p = s.process().clone().unwrap();
        assert_eq!(p.args().clone().unwrap(), ["/bin/ep", "a"]);
        assert_eq!(p.cwd(), &PathBuf::from("/w"));
        assert_eq!(p.env().clone().unwrap(), ["A=1", "PATH=/bin"]);

        let opts = ProcessOptions {
            cmd: vec!["b".into()],
            env: vec!["A=2".into()],
            ..Default::default()
        };
        let p = process(&img, &opts);
        assert_eq!(p.args().clone().unwrap(), ["/bin/ep", "b"]);
        assert_eq!(p.env().clone().unwrap(), ["PATH=/bin", "A=2"]);

        // --entrypoint drops the image's Cmd.
        let opts = ProcessOptions {
            entrypoint: Some(vec!["sh".into()]),
            ..Default::default()
        };
        let p = process(&img, &opts);
        assert_eq!(p.args().clone().unwrap(), ["sh"]);

        let bare = image(serde_json::json!({}));
        let e = container_spec(&bare, &ProcessOptions::default(), "image").unwrap_err();
        assert!(e.to_string().contains("no command"), "{e}");
        let opts = ProcessOptions {
            cmd: vec!["x".into()],
            user: Some("nobody".into()),
            ..Default::default()
        };
        assert!(container_spec(&bare, &opts, "image").is_err());
        let opts = ProcessOptions {
            cmd: vec!["x".into()],
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        };
        assert!(container_spec(&bare, &opts, "image").is_err());
        let opts = ProcessOptions {
            cmd: vec!["x".into()],
            user: Some("1000:100".into()),
            ..Default::default()
        };
        let p = process(&bare, &opts);
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 100));
        assert!(p.env().clone().unwrap()[0].starts_with("PATH="));
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert!(parse_memory("1k").is_err());
        assert!(parse_memory("lots").is_err());
        let opts = ProcessOptions {
            cmd: vec!["x".into()],
            memory: Some(64 << 20),
            cpus: Some(0.5),
            ..Default::default()
        };
        let s = container_spec(&bare, &opts, "image").unwrap();
        let r = s.linux().clone().unwrap().resources().clone().unwrap();
        assert_eq!(r.memory().unwrap().limit(), Some(64 << 20));
        assert_eq!(r.cpu().clone().unwrap().quota(), Some(50_000));
        let has_netns = |s: &Spec| {
            s.linux()
                .clone()
                .unwrap()
                .namespaces()
                .clone()
                .unwrap()
                .iter()
                .any(|n| n.typ() == LinuxNamespaceType::Network)
        };
        assert!(!has_netns(&s), "containers share the sandbox's network");
        let caps = s.process().clone().unwrap().capabilities().clone().unwrap();
        let bounding = caps.bounding().clone().unwrap();
        assert!(bounding.contains(&oci_spec::runtime::Capability::NetRaw));
        assert_eq!(bounding.len(), 14);
        let opts = ProcessOptions {
            cmd: vec!["x".into()],
            own_network: true,
            ..Default::default()
        };
        assert!(has_netns(&container_spec(&bare, &opts, "image").unwrap()));
    }
}
