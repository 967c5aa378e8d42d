//! `husk run`: arguments into a container spec, the record, the
//! container run to its end (or in the background with `-d`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use husk_runtime::container::record::{LogWriter, Record, Records, Status};
use husk_runtime::container::spec::{parse_memory, ProcessOptions};
use husk_runtime::container::{
    copy_to_log, logcopy, ContainerSpec, Mount, MountSource, Net, Plan, Resources,
};
use husk_runtime::guest::Io;
use husk_runtime::image::{default_store_dir, normalize, ImageStore};
use husk_runtime::net::ports::parse_publish;
use husk_runtime::sandbox::Parked;
use husk_runtime::util::chain;
use husk_runtime::{Boot, NetworkMode, Runtime};

use crate::container::records;
use crate::error::{Failure, HUSK_ERROR};
use crate::image::pull;
use crate::system::check_kvm;
use crate::tty::{forward_stdin, Terminal};
use crate::volume::volumes;

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum BootArg {
    /// Restore the cached template snapshot (booted once, on first use).
    Template,
    /// Boot the guest kernel.
    Cold,
    /// Restore a template with the container already created (built by
    /// the first run of the same image and options).
    Parked,
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Run in the background and print the container's id.
    #[arg(short, long)]
    detach: bool,
    /// Remove the container's record when it exits (its microVM always
    /// stops with it).
    #[arg(long)]
    rm: bool,
    /// Keep stdin open and pass it to the container.
    #[arg(short, long)]
    interactive: bool,
    /// Give the container a terminal.
    #[arg(short, long)]
    tty: bool,
    /// Set environment variables (KEY=VALUE).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines).
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Mount a named volume: NAME:/path[:ro] (created if missing).
    #[arg(short, long = "volume", value_name = "NAME:PATH[:ro]")]
    volume: Vec<String>,
    /// Attach a mount: type=volume,source=NAME,target=/path[,readonly] or
    /// type=tmpfs,target=/path.
    #[arg(long = "mount", value_name = "type=...,target=...")]
    mount: Vec<String>,
    /// The container's (and sandbox's) name.
    #[arg(long)]
    name: Option<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    workdir: Option<String>,
    /// uid[:gid] to run as.
    #[arg(short, long)]
    user: Option<String>,
    /// Overwrite the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// The container's host name.
    #[arg(long)]
    hostname: Option<String>,
    /// Memory limit (e.g. 256m, 1g): the container's, and the microVM gets
    /// it plus 128 MiB for its kernel and agent (256 MiB at least).
    #[arg(short, long)]
    memory: Option<String>,
    /// CPUs (e.g. 0.5, 2): the container's CFS quota, and as many vCPUs
    /// (rounded up).
    #[arg(long)]
    cpus: Option<f64>,
    /// Publish a container port on the host: [IP:]HOST:CONTAINER[/udp].
    #[arg(short, long = "publish", value_name = "[IP:]HOST:CONTAINER[/udp]")]
    publish: Vec<String>,
    /// The network: bridge (husk0, NAT outbound) or none (loopback only).
    #[arg(long, default_value = "bridge")]
    network: String,
    /// Pull the image: missing (when not in the store), always, never.
    #[arg(long, default_value = "missing")]
    pull: String,
    /// How the microVM starts: parked (a template with the container
    /// already created, made by the first run of the same image and
    /// options; containers that cannot be parked start as with template),
    /// template, or cold.
    #[arg(long, value_enum, default_value = "parked")]
    boot: BootArg,
    image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

pub(crate) fn random_id() -> Result<String> {
    Ok(husk_runtime::util::random_hex(6)?)
}

pub(crate) fn env_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            // A bare name takes its value from husk's environment, as Docker.
            if l.contains('=') {
                l.to_string()
            } else {
                format!("{l}={}", std::env::var(l).unwrap_or_default())
            }
        })
        .collect())
}

/// A host path as Docker takes it: absolute, or relative to the working
/// directory when it starts with `.`; `create` makes a missing directory
/// (`-v`), otherwise a missing path is an error (`--mount type=bind`).
pub(crate) fn host_path(p: &str, create: bool, what: &str) -> Result<std::path::PathBuf> {
    let path = std::env::current_dir()?.join(p);
    if !path.exists() {
        if !create {
            bail!(
                "{what}: bind source path does not exist: {}",
                path.display()
            );
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("{what}: creating {}", path.display()))?;
    }
    path.canonicalize()
        .with_context(|| format!("{what}: {}", path.display()))
}

pub(crate) fn check_target(what: &str, dst: &str) -> Result<()> {
    husk_runtime::container::lifecycle::check_target(dst).with_context(|| what.to_string())
}

/// A `-v` argument: a named volume or a host path (shared over virtio-fs).
pub(crate) fn parse_volume(v: &str) -> Result<Mount> {
    let parts: Vec<&str> = v.split(':').collect();
    let (src, dst, ro) = match parts.as_slice() {
        [s, d] => (*s, *d, false),
        [s, d, "ro"] => (*s, *d, true),
        [s, d, "rw"] => (*s, *d, false),
        [_] => bail!("-v {v}: anonymous volumes are not supported yet; name one: -v NAME:{v}"),
        _ => bail!("-v {v}: expected NAME:/path[:ro] or /host/path:/path[:ro]"),
    };
    check_target(&format!("-v {v}"), dst)?;
    let source = if src.starts_with('/') || src.starts_with('.') {
        MountSource::Host(host_path(src, true, &format!("-v {v}"))?)
    } else {
        husk_runtime::storage::volume::check_name(src)?;
        MountSource::Volume(src.to_string())
    };
    Ok(Mount {
        source,
        target: dst.to_string(),
        read_only: ro,
    })
}

/// `--mount type=volume|bind,source=...,target=/path[,readonly]`, or
/// `type=tmpfs,target=/path`.
pub(crate) fn parse_mount(m: &str) -> Result<Mount> {
    let (mut typ, mut src, mut dst, mut ro) = ("volume", None, None, false);
    for kv in m.split(',') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "type" => typ = v,
            "source" | "src" => src = Some(v),
            "target" | "destination" | "dst" => dst = Some(v),
            "readonly" | "ro" => ro = v.is_empty() || v == "true" || v == "1",
            other => bail!("--mount {m}: unknown key {other:?}"),
        }
    }
    let dst = dst.ok_or_else(|| anyhow::anyhow!("--mount {m}: no target"))?;
    let what = format!("--mount {m}");
    check_target(&what, dst)?;
    let src = || src.ok_or_else(|| anyhow::anyhow!("--mount {m}: type {typ} needs a source"));
    let source = match typ {
        "volume" => {
            let name = src()?;
            husk_runtime::storage::volume::check_name(name)?;
            MountSource::Volume(name.into())
        }
        "bind" => MountSource::Host(host_path(src()?, false, &what)?),
        "tmpfs" => MountSource::Tmpfs,
        other => bail!("--mount {m}: type {other:?} is not volume, bind or tmpfs"),
    };
    Ok(Mount {
        source,
        target: dst.into(),
        read_only: ro,
    })
}

/// Set in the background husk that `run -d` starts: the container id it
/// runs.
pub(crate) const DETACHED_ENV: &str = "HUSK_DETACHED_ID";

pub(crate) fn run(a: Box<RunArgs>) -> Result<u8, Failure> {
    check_kvm()?;
    let rt = Runtime::locate()?;
    let store = ImageStore::open(&default_store_dir())?;
    let image = match (store.get(&a.image), a.pull.as_str()) {
        (Ok(i), "missing" | "never") => i,
        (_, "always") => pull(&store, &a.image)?,
        // husk.local/ names local images only (the samples): never pulled.
        (Err(e), "missing") if !a.image.starts_with("husk.local/") => {
            eprintln!("Unable to find image '{}' locally", normalize(&a.image));
            pull(&store, &a.image)
                .map_err(|p| anyhow::anyhow!("{e:#}; pulling it failed: {p:#}"))?
        }
        (Err(e), "missing" | "never") => return Err(e.into()),
        (_, other) => {
            return Err(anyhow::anyhow!("--pull {other:?}: use always, missing or never").into())
        }
    };
    let mut env = Vec::new();
    for f in &a.env_file {
        env.extend(env_file(f)?);
    }
    env.extend(a.env.iter().cloned());
    let child_id = std::env::var(DETACHED_ENV).ok();
    let id = match (&child_id, &a.name) {
        (Some(id), _) => id.clone(),
        (None, Some(n)) => n.clone(),
        (None, None) => random_id()?,
    };
    husk_runtime::sandbox::check_id(&id)?;
    let network: NetworkMode = a.network.parse()?;
    let ports = a
        .publish
        .iter()
        .map(|p| parse_publish(p))
        .collect::<Result<Vec<_>, _>>()?;
    if network == NetworkMode::None && !ports.is_empty() {
        return Err(anyhow::anyhow!("-p needs a network: --network none has none").into());
    }
    let mut spec = ContainerSpec::new(&id, image.clone());
    spec.hostname = a.hostname.clone();
    spec.process = ProcessOptions {
        cmd: a.command.clone(),
        entrypoint: a.entrypoint.as_ref().map(|e| {
            if e.is_empty() {
                Vec::new()
            } else {
                vec![e.clone()]
            }
        }),
        env,
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        tty: a.tty,
        ..Default::default()
    };
    spec.mounts = mounts(&a)?;
    spec.net = match network {
        NetworkMode::Bridge => Net::Bridge(ports),
        NetworkMode::None => Net::None,
    };
    spec.resources = Resources {
        memory: a.memory.as_deref().map(parse_memory).transpose()?,
        nano_cpus: a.cpus.map(|c| (c * 1e9).round() as i64),
    };
    spec.boot = match a.boot {
        BootArg::Template => Boot::Template,
        BootArg::Cold => Boot::Cold,
        BootArg::Parked => Boot::Parked,
    };
    let plan = spec.plan(Some(&store))?;
    let process = plan.oci.process().clone().unwrap_or_default();
    let records = records()?;
    let mut record = Record {
        id: id.clone(),
        image: image.name.clone(),
        command: process.args().clone().unwrap_or_default(),
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().display().to_string(),
        created: husk_runtime::container::record::now(),
        status: Status::Created,
        exit_code: None,
        oom_killed: false,
        error: None,
        failure_code: None,
        owner_pid: std::process::id(),
        auto_remove: a.rm,
        volumes: plan.mounted.clone(),
        network: None,
    };
    if a.detach && child_id.is_none() {
        return detach(&records, record);
    }
    if child_id.is_some() {
        record = records.get(&id)?;
        record.owner_pid = std::process::id();
        records.save(&record)?;
    } else {
        records.create(&record)?;
    }
    let log = LogWriter::create(&records.log_path(&id))?;
    let r = run_container(&rt, &a, plan, &store, &log, &records, &mut record);
    record.status = Status::Exited;
    match &r {
        Ok(status) => {
            record.exit_code = Some(status.status);
            record.oom_killed = status.oom_killed;
        }
        Err(Failure(code, e)) => {
            record.error = Some(format!("{e:#}"));
            record.failure_code = Some(*code);
        }
    }
    let ran = record.exit_code.is_some();
    if a.rm || (!ran && child_id.is_none()) {
        let _ = records.remove(&id);
    } else {
        records.save(&record)?;
    }
    r.map(|s| u8::try_from(s.status).unwrap_or(HUSK_ERROR))
}

/// `run -d`: the container is run by a background husk; this one waits
/// until it runs (or failed) and prints its id.
pub(crate) fn detach(records: &Records, mut record: Record) -> Result<u8, Failure> {
    use std::os::unix::process::CommandExt;
    records.create(&record)?;
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(DETACHED_ENV, &record.id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // Its own session: the terminal's signals are not its.
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = records.remove(&record.id);
            return Err(Failure::from(e));
        }
    };
    record.owner_pid = child.id();
    records.save(&record)?;
    loop {
        let r = records.get(&record.id);
        match r {
            Ok(r) if r.status == Status::Running => {
                println!("{}", r.id);
                return Ok(0);
            }
            Ok(r) if r.status == Status::Exited => {
                if r.exit_code.is_some() {
                    // It ran and is done already.
                    println!("{}", r.id);
                    return Ok(0);
                }
                let _ = records.remove(&record.id);
                let why = r
                    .error
                    .unwrap_or_else(|| "the background husk exited".into());
                return Err(Failure(
                    r.failure_code.unwrap_or(HUSK_ERROR),
                    anyhow::anyhow!(why),
                ));
            }
            Ok(_) => {
                // One that dies before it records anything must not leave
                // this one waiting for ever.
                if let Ok(Some(status)) = child.try_wait() {
                    if records
                        .get(&record.id)
                        .is_ok_and(|r| r.status == Status::Created)
                    {
                        let _ = records.remove(&record.id);
                        return Err(Failure(
                            HUSK_ERROR,
                            anyhow::anyhow!(
                                "the background husk exited ({status}) before the container started"
                            ),
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(50))
            }
            // Removed: it ran with --rm and is gone.
            Err(_) => {
                println!("{}", record.id);
                return Ok(0);
            }
        }
    }
}

/// The container of `plan` run to its end: its exit status.
pub(crate) fn run_container(
    rt: &Runtime,
    a: &RunArgs,
    plan: Plan,
    store: &ImageStore,
    log: &LogWriter,
    records: &Records,
    record: &mut Record,
) -> Result<husk_protocol::agent::WaitProcessResponse, Failure> {
    let starting = plan.acquire(Some(store), Some(&volumes()?))?.start(rt)?;
    let detached = a.detach;
    // A terminal merges stderr into its output, as a pty does.
    let io = Io {
        stdin: a.interactive && !detached,
        stdout: true,
        stderr: !a.tty,
    };
    let mut c = starting.create(io).map_err(Failure::starting)?;
    record.status = Status::Running;
    record.network = c.net_info();
    records.save(record)?;
    // Output goes to the log (for `husk logs`) and, unless detached, to
    // this terminal. Detached, a process of its own copies it: the
    // container outlives this husk if it dies (another adopts it).
    let mut streams = c.take_streams();
    let copied = if detached {
        let copier = logcopy::spawn(
            Path::new("/proc/self/exe"),
            &mut streams,
            &records.log_path(&record.id),
        )
        .context("starting the log copier")?;
        Copied::Process(copier)
    } else {
        let tee = |t: Box<dyn Write + Send>| Some(t);
        Copied::Threads(
            copy_to_log(
                streams.stdout.take(),
                "stdout",
                log.clone(),
                tee(Box::new(std::io::stdout())),
            ),
            copy_to_log(
                streams.stderr.take(),
                "stderr",
                log.clone(),
                tee(Box::new(std::io::stderr())),
            ),
        )
    };
    let _raw = (a.tty && !detached).then(|| Terminal::attach(c.agent(), c.id(), ""));
    if let Some(input) = streams.stdin.take() {
        forward_stdin(input);
    }
    let t_run = std::time::Instant::now();
    let status = c.wait()?;
    copied.finish();
    let ran = t_run.elapsed();
    let steps = timings_asked().then(|| c.guest_profile());
    let t_down = std::time::Instant::now();
    let times = c.timings();
    let id = c.id().to_string();
    if let Err(e) = c.remove(Duration::from_secs(20)) {
        eprintln!("husk: ending container {id} and its sandbox: {}", chain(&e));
    }
    match steps {
        Some(Ok(p)) => eprintln!("husk-guest-steps: {}", guest_steps(&p)),
        Some(Err(e)) => eprintln!("husk: reading the guest's steps: {}", chain(&e)),
        None => {}
    }
    if timings_asked() {
        // For bench/run: where a run's time went, in seconds.
        match &times.parked {
            Parked::Failed(why) | Parked::NotSnapshotted { why, .. } => {
                eprintln!("husk: the container template was not made: {why}")
            }
            _ => {}
        }
        eprintln!(
            "husk-timings: parked={} gate={:.4} template={:.4} park={:.4} agent-ready={:.4} identity={:.4} sandbox={:.4} create-start={:.4} run={:.4} teardown={:.4}",
            times.parked.word(),
            times.sandbox.gate.as_secs_f64(),
            times.sandbox.template.as_secs_f64(),
            times.sandbox.park.as_secs_f64(),
            times.sandbox.agent_ready.as_secs_f64(),
            times.sandbox.identity.as_secs_f64(),
            times.sandbox_total.as_secs_f64(),
            times.create_start.as_secs_f64(),
            ran.as_secs_f64(),
            t_down.elapsed().as_secs_f64()
        );
    }
    Ok(status)
}

fn timings_asked() -> bool {
    std::env::var_os("HUSK_TIMINGS").is_some()
}

/// The agent's steps as `name=seconds[/forks/context switches/page
/// faults]`, space-separated, in the order they ended.
fn guest_steps(p: &husk_protocol::agent::ProfileResponse) -> String {
    let mut out: Vec<String> = p
        .steps
        .iter()
        .map(|s| {
            let secs = s.micros as f64 / 1e6;
            // One token per step: a name's blanks and '=' (libcontainer's
            // messages) become '_'.
            let name: String = s
                .name
                .chars()
                .map(|c| {
                    if c.is_whitespace() || c == '=' {
                        '_'
                    } else {
                        c
                    }
                })
                .collect();
            if s.counted {
                let faults = if s.page_faults_counted {
                    s.page_faults.to_string()
                } else {
                    "-".into()
                };
                format!(
                    "{name}={secs:.4}/{}/{}/{faults}",
                    s.forks, s.context_switches
                )
            } else {
                format!("{name}={secs:.4}")
            }
        })
        .collect();
    if p.dropped > 0 {
        out.push(format!("dropped={}", p.dropped));
    }
    out.join(" ")
}

/// Where a container's output is being copied to its log.
enum Copied {
    Threads(std::thread::JoinHandle<()>, std::thread::JoinHandle<()>),
    Process(husk_runtime::util::child::Watched),
}

impl Copied {
    /// Waits for what the container printed to be logged (its streams end
    /// with its processes; a copier still going after a few seconds is
    /// left to end with the VM).
    fn finish(self) {
        match self {
            Copied::Threads(out, err) => {
                let _ = out.join();
                let _ = err.join();
            }
            Copied::Process(mut p) => {
                let _ = p.wait_timeout(Duration::from_secs(5));
            }
        }
    }
}

/// `--mount` tmpfs mounts, then `-v`, then the other `--mount`s: host
/// paths are shared (and numbered) in the order they were given.
pub(crate) fn mounts(a: &RunArgs) -> Result<Vec<Mount>> {
    let volumes = a.volume.iter().map(|v| parse_volume(v));
    let given = a.mount.iter().map(|m| parse_mount(m));
    let (tmpfs, others): (Vec<_>, Vec<_>) = given
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .partition(|m| m.source == MountSource::Tmpfs);
    let mut all = tmpfs;
    all.extend(volumes.collect::<Result<Vec<_>>>()?);
    all.extend(others);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_arguments() {
        let m = |source, target: &str, read_only| Mount {
            source,
            target: target.into(),
            read_only,
        };
        assert_eq!(
            parse_volume("data:/data:ro").unwrap(),
            m(MountSource::Volume("data".into()), "/data", true)
        );
        assert!(!parse_volume("data:/data").unwrap().read_only);
        // -v makes a missing host directory, as Docker does; --mount
        // type=bind refuses one.
        let d = tempfile::tempdir().unwrap();
        let made = d.path().join("new/dir");
        let arg = format!("{}:/data:ro", made.display());
        assert_eq!(
            parse_volume(&arg).unwrap(),
            m(
                MountSource::Host(made.canonicalize().unwrap()),
                "/data",
                true
            )
        );
        let missing = d.path().join("missing");
        let e =
            parse_mount(&format!("type=bind,source={},target=/x", missing.display())).unwrap_err();
        assert!(
            format!("{e:#}").contains("bind source path does not exist"),
            "{e:#}"
        );
        assert!(!missing.exists());
        assert_eq!(
            parse_mount(&format!("type=bind,src={},dst=/x,readonly", made.display())).unwrap(),
            m(MountSource::Host(made.canonicalize().unwrap()), "/x", true)
        );
        assert!(parse_mount("type=bind,target=/x").is_err());
        assert!(parse_volume("/data").is_err());
        assert!(parse_volume("data:rel").is_err());
        assert!(parse_volume("data:/a/../b").is_err());
        assert!(parse_volume("data:/d:rx").is_err());
    }

    #[test]
    fn env_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("env");
        std::fs::write(&f, "# comment\nA=1\n\nB = 2\n").unwrap();
        assert_eq!(env_file(&f).unwrap(), ["A=1", "B = 2"]);
    }
}
