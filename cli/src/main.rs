//! husk: Docker's command line for containers that each run in their own
//! microVM. `husk run` restores a sandbox from the runtime's template (or
//! boots one with `--boot cold`), hands it the image as a read-only erofs
//! drive and runs the container there; its output and exit code are the
//! container's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

mod cluster;
mod compose;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::os::unix::net::UnixStream;

use husk_protocol::agent::{SignalProcessRequest, TtyWinResizeRequest};
use husk_runtime::container::record::{LogWriter, Record, Records, Status};
use husk_runtime::container::spec::{parse_memory, ProcessOptions};
use husk_runtime::container::{
    copy_to_log, ContainerSpec, Mount, MountSource, Net, Plan, Resources,
};
use husk_runtime::guest::{ctx, rpc_message, AgentConn, Io};
use husk_runtime::image::{default_store_dir, normalize, ImageStore};
use husk_runtime::net::ports::{docker_ports, parse_publish};
use husk_runtime::storage::volume::VolumeStore;
use husk_runtime::{Boot, NetworkMode, Runtime};

/// Exit code for husk's own failures, as Docker's 125.
const HUSK_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "husk",
    version,
    about = "Run OCI containers, each in its own microVM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command in a new container, in its own microVM.
    Run(Box<RunArgs>),
    /// List containers.
    Ps {
        /// Show all containers (default shows just running).
        #[arg(short, long)]
        all: bool,
    },
    /// Run a command in a running container.
    Exec {
        /// Keep stdin open and pass it to the process.
        #[arg(short, long)]
        interactive: bool,
        /// Give the process a terminal.
        #[arg(short, long)]
        tty: bool,
        container: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Print a container's output.
    Logs {
        /// Follow the output until the container exits.
        #[arg(short, long)]
        follow: bool,
        container: String,
    },
    /// Stop containers: SIGTERM, then SIGKILL after a grace period.
    Stop {
        /// Seconds to wait before killing.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Send a signal to containers.
    Kill {
        /// Signal name or number.
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Show containers as JSON (Docker's field names where they apply).
    Inspect {
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers.
    Rm {
        /// Kill a running container first.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Pull an image from a registry (as `image pull`).
    Pull { reference: String },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage named volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Make or join a cluster of husk hosts (huskd).
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// The cluster's nodes.
    #[command(subcommand)]
    Node(cluster::NodeCmd),
    /// Services: replicated tasks across the cluster, each in a microVM.
    #[command(subcommand)]
    Service(cluster::ServiceCmd),
    /// The cluster's changes (nodes, services, tasks) as they happen.
    Events {
        #[arg(long)]
        format: Option<String>,
    },
    /// Stacks: the services of a compose file, deployed together.
    #[command(subcommand)]
    Stack(cluster::StackCmd),
    /// Show husk's version and where its parts are.
    Version,
    /// Show system-wide information: containers, images, network,
    /// confinement, where things are.
    Info,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Pull an image from a registry (linux/amd64).
    Pull { reference: String },
    /// Import images from an OCI-layout or docker-archive tarball.
    Import { file: PathBuf },
    /// List images.
    Ls,
    /// Remove images.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume (an ext4 file system, 1 GiB, sparse).
    Create { name: String },
    /// List volumes.
    Ls,
    /// Show a volume as JSON.
    Inspect { name: String },
    /// Remove volumes (not while a sandbox uses one).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BootArg {
    /// Restore the cached template snapshot (booted once, on first use).
    Template,
    /// Boot the guest kernel.
    Cold,
}

#[derive(Args)]
struct RunArgs {
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
    /// How the microVM starts.
    #[arg(long, value_enum, default_value = "template")]
    boot: BootArg,
    image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn check_kvm() -> Result<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) => bail!("/dev/kvm: {e}: husk runs each container in a KVM virtual machine"),
    }
}

fn random_id() -> Result<String> {
    let mut b = [0u8; 6];
    husk_runtime::util::getrandom(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn env_file(path: &Path) -> Result<Vec<String>> {
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
fn host_path(p: &str, create: bool, what: &str) -> Result<std::path::PathBuf> {
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

fn check_target(what: &str, dst: &str) -> Result<()> {
    husk_runtime::container::lifecycle::check_target(dst).with_context(|| what.to_string())
}

/// A `-v` argument: a named volume or a host path (shared over virtio-fs).
fn parse_volume(v: &str) -> Result<Mount> {
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
fn parse_mount(m: &str) -> Result<Mount> {
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

/// What a failed create, start or exec means for the exit code: Docker's
/// 127 for a command that is not there, 126 for one that cannot run, by
/// the agent's code for the refusal.
fn start_failure_code(e: &anyhow::Error) -> u8 {
    let code = e
        .chain()
        .find_map(|c| c.downcast_ref::<husk_runtime::guest::RpcError>())
        .and_then(|r| r.code);
    match code {
        Some(ttrpc::Code::NOT_FOUND) => 127,
        Some(ttrpc::Code::PERMISSION_DENIED) => 126,
        _ => HUSK_ERROR,
    }
}

/// An error with the exit code it should end husk with.
struct Failure(u8, anyhow::Error);

impl Failure {
    /// A create or start that failed: its exit code says why (127, 126).
    fn starting(e: anyhow::Error) -> Failure {
        Failure(start_failure_code(&e), e)
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(HUSK_ERROR, e.into())
    }
}

/// Set in the background husk that `run -d` starts: the container id it
/// runs.
const DETACHED_ENV: &str = "HUSK_DETACHED_ID";

fn volumes() -> Result<VolumeStore> {
    VolumeStore::open(&husk_runtime::default_data_dir().join("volumes"))
}

fn records() -> Result<Records> {
    Records::open(&husk_runtime::default_data_dir().join("containers"))
}

fn run(a: Box<RunArgs>) -> Result<u8, Failure> {
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
        .collect::<Result<Vec<_>>>()?;
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
    };
    let plan = spec.plan(&store)?;
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
fn detach(records: &Records, mut record: Record) -> Result<u8, Failure> {
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
fn run_container(
    rt: &Runtime,
    a: &RunArgs,
    plan: Plan,
    store: &ImageStore,
    log: &LogWriter,
    records: &Records,
    record: &mut Record,
) -> Result<husk_protocol::agent::WaitProcessResponse, Failure> {
    let starting = plan.acquire(store, &volumes()?)?.start(rt)?;
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
    // this terminal.
    let tee = |t: Box<dyn Write + Send>| (!detached).then_some(t);
    let mut streams = c.take_streams();
    let out = copy_to_log(
        streams.stdout.take(),
        "stdout",
        log.clone(),
        tee(Box::new(std::io::stdout())),
    );
    let err = copy_to_log(
        streams.stderr.take(),
        "stderr",
        log.clone(),
        tee(Box::new(std::io::stderr())),
    );
    let _raw = (a.tty && !detached).then(|| Terminal::attach(c.agent(), c.id(), ""));
    if let Some(input) = streams.stdin.take() {
        forward_stdin(input);
    }
    let t_run = std::time::Instant::now();
    let status = c.wait()?;
    let _ = out.join();
    let _ = err.join();
    let ran = t_run.elapsed();
    let t_down = std::time::Instant::now();
    let times = c.timings();
    let id = c.id().to_string();
    let down = c.remove(Duration::from_secs(20));
    if let Err(e) = down.remove {
        eprintln!("husk: removing container {id}: {e:#}");
    }
    if let Err(e) = down.shutdown {
        eprintln!("husk: stopping the sandbox: {e:#}");
    }
    if std::env::var_os("HUSK_TIMINGS").is_some() {
        // For bench/run: where a run's time went, in seconds.
        eprintln!(
            "husk-timings: template={:.4} agent-ready={:.4} identity={:.4} sandbox={:.4} create-start={:.4} run={:.4} teardown={:.4}",
            times.sandbox.template.as_secs_f64(),
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

/// `--mount` tmpfs mounts, then `-v`, then the other `--mount`s: host
/// paths are shared (and numbered) in the order they were given.
fn mounts(a: &RunArgs) -> Result<Vec<Mount>> {
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

/// Copies this process's stdin to a process's stdin stream. Detached: the
/// process may exit before stdin ends. End of input is a half-close, which
/// reaches the process after the data (a CloseStdin call could overtake
/// data still on its way).
fn forward_stdin(mut input: UnixStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut input);
        let _ = input.shutdown(std::net::Shutdown::Write);
    });
}

/// This terminal, while a container's terminal is attached to it: raw
/// (keys go to the container as typed) and its size followed; restored
/// when dropped. Without a terminal on stdin, only the size is sent (none).
struct Terminal {
    saved: Option<libc::termios>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn window_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize we own; fd 1 may not be a tty, in
    // which case the call fails and nothing is read.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

impl Terminal {
    fn attach(agent: &AgentConn, id: &str, exec_id: &str) -> Terminal {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a termios we own.
        let saved = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::isatty(0) == 1 && libc::tcgetattr(0, &mut t) == 0 {
                let mut raw = t;
                libc::cfmakeraw(&mut raw);
                libc::tcsetattr(0, libc::TCSANOW, &raw);
                Some(t)
            } else {
                None
            }
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The size is polled: a SIGWINCH handler would need a thread of its
        // own anyway, and a resize is rare.
        if let Some(first) = window_size() {
            let (stop2, containers) = (stop.clone(), agent.containers.clone());
            let (id, exec_id) = (id.to_string(), exec_id.to_string());
            std::thread::spawn(move || {
                let mut last = None;
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    let size = window_size().unwrap_or(first);
                    if last != Some(size) {
                        let req = TtyWinResizeRequest {
                            container_id: id.clone(),
                            exec_id: exec_id.clone(),
                            rows: size.0.into(),
                            cols: size.1.into(),
                            ..Default::default()
                        };
                        let _ = containers.tty_win_resize(ctx(Duration::from_secs(10)), &req);
                        last = Some(size);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
        }
        Terminal { saved, stop }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.saved {
            // SAFETY: restores the attributes read from fd 0 in attach.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// The agent of a running container's sandbox.
fn agent_of(id: &str) -> Result<(Record, AgentConn)> {
    let r = records()?.get(id)?;
    if r.status != Status::Running {
        bail!("container {} is not running", r.id);
    }
    let agent = husk_runtime::sandbox::connect_running(
        &husk_runtime::default_run_dir(),
        &r.id,
        Duration::from_secs(5),
    )
    .with_context(|| format!("reaching container {}", r.id))?;
    Ok((r, agent))
}

fn exec(
    interactive: bool,
    tty: bool,
    container: &str,
    command: Vec<String>,
) -> Result<u8, Failure> {
    let (r, agent) = agent_of(container)?;
    let exec_id = format!("exec-{}", random_id()?);
    let mut env = r.env.clone();
    if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let process = serde_json::json!({
        "args": command, "cwd": r.cwd, "env": env, "terminal": tty,
        "user": {"uid": 0, "gid": 0},
    });
    let io = Io {
        stdin: interactive,
        stdout: true,
        stderr: !tty,
    };
    let mut streams = match agent.exec(&r.id, &exec_id, &process, io) {
        Ok(s) => s,
        Err(e) => return Err(Failure::starting(e)),
    };
    let pipe = |from: Option<UnixStream>, mut to: Box<dyn Write + Send>| {
        std::thread::spawn(move || {
            if let Some(mut from) = from {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.flush();
            }
        })
    };
    let out = pipe(streams.stdout.take(), Box::new(std::io::stdout()));
    let err = pipe(streams.stderr.take(), Box::new(std::io::stderr()));
    let _raw = tty.then(|| Terminal::attach(&agent, &r.id, &exec_id));
    if let Some(input) = streams.stdin.take() {
        forward_stdin(input);
    }
    let status = agent.wait(&r.id, &exec_id)?;
    let _ = out.join();
    let _ = err.join();
    Ok(u8::try_from(status.status).unwrap_or(HUSK_ERROR))
}

/// A signal by name (`TERM`, `SIGTERM`) or number.
fn parse_signal(s: &str) -> Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    Ok(match name.as_str() {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "STOP" => 19,
        "CONT" => 18,
        _ => bail!("unknown signal {s:?}"),
    })
}

fn signal(container: &str, sig: u32) -> Result<Record> {
    let (r, agent) = agent_of(container)?;
    let req = SignalProcessRequest {
        container_id: r.id.clone(),
        signal: sig,
        ..Default::default()
    };
    agent
        .containers
        .signal_process(ctx(Duration::from_secs(30)), &req)
        .map_err(|e| anyhow::anyhow!("signalling {}: {}", r.id, rpc_message(&e)))?;
    Ok(r)
}

/// Waits until `id`'s record says exited (its husk finished).
fn wait_exited(id: &str, timeout: Duration) -> Result<bool> {
    let rs = records()?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match rs.get(id) {
            Ok(r) if r.status != Status::Exited => {}
            _ => return Ok(true),
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(time: u64, containers: &[String]) -> Result<()> {
    for c in containers {
        let r = records()?.get(c)?;
        if r.status == Status::Running {
            signal(&r.id, 15)?;
            if !wait_exited(&r.id, Duration::from_secs(time))? {
                let _ = signal(&r.id, 9);
                wait_exited(&r.id, Duration::from_secs(60))?;
            }
        }
        println!("{c}");
    }
    Ok(())
}

fn rm(force: bool, containers: &[String]) -> Result<()> {
    let rs = records()?;
    for c in containers {
        let r = rs.get(c)?;
        if r.status == Status::Running {
            if !force {
                bail!("container {} is running: stop it first, or rm -f", r.id);
            }
            let _ = signal(&r.id, 9);
            if !wait_exited(&r.id, Duration::from_secs(60))? {
                bail!("container {} did not stop", r.id);
            }
        }
        // Its husk may have removed it already (--rm).
        if rs.get(&r.id).is_ok() {
            rs.remove(&r.id)?;
        }
        println!("{c}");
    }
    Ok(())
}

fn ps(all: bool) -> Result<()> {
    println!(
        "{:<14} {:<28} {:<22} {:<20} {:<24} NAMES",
        "CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "PORTS"
    );
    for r in records()?.list()? {
        if !all && r.status != Status::Running {
            continue;
        }
        let status = match (r.status, r.exit_code) {
            (Status::Running, _) => format!(
                "Up {} s",
                husk_runtime::container::record::now().saturating_sub(r.created)
            ),
            (Status::Created, _) => "Created".into(),
            (Status::Exited, Some(c)) => format!("Exited ({c})"),
            (Status::Exited, None) => "Exited (failed)".into(),
        };
        let mut cmd = format!("{:?}", r.command.join(" "));
        if cmd.len() > 22 {
            cmd.truncate(19);
            cmd.push_str("...");
        }
        let short: String = r.id.chars().take(12).collect();
        let ports = match (&r.network, r.status) {
            (Some(n), Status::Running) => n
                .ports
                .iter()
                .map(|p| {
                    format!(
                        "{}->{}/{}",
                        std::net::SocketAddr::new(p.host_ip, p.host_port),
                        p.container_port,
                        p.protocol
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            _ => String::new(),
        };
        println!(
            "{short:<14} {:<28} {cmd:<22} {status:<20} {ports:<24} {}",
            r.image, r.id
        );
    }
    Ok(())
}

fn inspect(containers: &[String]) -> Result<()> {
    let rs = records()?;
    let mut out = Vec::new();
    for c in containers {
        let r = rs.get(c)?;
        let status = match r.status {
            Status::Created => "created",
            Status::Running => "running",
            Status::Exited => "exited",
        };
        out.push(serde_json::json!({
            "Id": r.id,
            "Name": format!("/{}", r.id),
            "Created": r.created,
            "Path": r.command.first(),
            "Args": r.command.get(1..).unwrap_or_default(),
            "Image": r.image,
            "State": {
                "Status": status,
                "Running": r.status == Status::Running,
                "ExitCode": r.exit_code.unwrap_or(match (&r.error, r.failure_code) {
                    (None, _) => 0,
                    (Some(_), code) => code.unwrap_or(HUSK_ERROR).into(),
                }),
                "OOMKilled": r.oom_killed,
                "Error": r.error.clone().unwrap_or_default(),
                "Pid": if r.status == Status::Running { r.owner_pid } else { 0 },
            },
            "Config": {"Env": r.env, "WorkingDir": r.cwd, "Cmd": r.command},
            "Mounts": r.volumes.iter().map(|(name, dst, ro)| if name.starts_with('/') {
                serde_json::json!({
                    "Type": "bind", "Source": name, "Destination": dst, "RW": !ro,
                    "Propagation": "rprivate",
                })
            } else {
                serde_json::json!({
                    "Type": "volume", "Name": name, "Destination": dst, "RW": !ro,
                    "Driver": "local",
                })
            }).collect::<Vec<_>>(),
            "NetworkSettings": match &r.network {
                Some(n) if r.status == Status::Running => serde_json::json!({
                    "IPAddress": n.ip, "IPPrefixLen": n.prefix, "Gateway": n.gateway,
                    "MacAddress": n.mac, "Ports": docker_ports(&n.ports),
                    "Networks": {"bridge": {"IPAddress": n.ip, "IPPrefixLen": n.prefix,
                        "Gateway": n.gateway, "MacAddress": n.mac}},
                }),
                // Docker empties these once a container stops.
                _ => serde_json::json!({"IPAddress": "", "Gateway": "", "MacAddress": "",
                    "Ports": {}, "Networks": {}}),
            },
            "LogPath": rs.log_path(&r.id),
            "HostConfig": {"AutoRemove": r.auto_remove},
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn logs(follow: bool, container: &str) -> Result<()> {
    let rs = records()?;
    let r = rs.get(container)?;
    let path = rs.log_path(&r.id);
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let mut at = husk_runtime::container::record::replay(&path, 0, &mut out, &mut err)?;
    if !follow {
        return Ok(());
    }
    loop {
        let running = rs
            .get(&r.id)
            .map(|x| x.status == Status::Running)
            .unwrap_or(false);
        std::thread::sleep(Duration::from_millis(200));
        at = husk_runtime::container::record::replay(&path, at, &mut out, &mut err)?;
        out.flush()?;
        if !running {
            break;
        }
    }
    Ok(())
}

fn volume(cmd: VolumeCmd) -> Result<()> {
    let store = volumes()?;
    match cmd {
        VolumeCmd::Create { name } => {
            store.create(&name, husk_runtime::storage::volume::DEFAULT_SIZE)?;
            println!("{name}");
        }
        VolumeCmd::Ls => {
            println!("{:<8} VOLUME NAME", "DRIVER");
            for v in store.list()? {
                println!("{:<8} {}", "local", v.name);
            }
        }
        VolumeCmd::Inspect { name } => {
            let v = store.get(&name)?;
            let info = serde_json::json!([{
                "Name": v.name, "Driver": "local", "Mountpoint": v.disk,
                "Options": {"size": v.size.to_string(), "type": "ext4"},
            }]);
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        VolumeCmd::Rm { names } => {
            for n in names {
                store.remove(&n)?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

fn info() -> Result<()> {
    let rt = Runtime::locate()?;
    let all = records()?.list()?;
    let running = all.iter().filter(|r| r.status == Status::Running).count();
    let images = ImageStore::open(&default_store_dir())?.list()?.len();
    let kvm = match check_kvm() {
        Ok(()) => "usable".to_string(),
        Err(e) => format!("{e:#}"),
    };
    println!("Containers: {}", all.len());
    println!(" Running: {running}");
    println!(" Stopped: {}", all.len() - running);
    println!("Images: {images}");
    println!("Server Version: husk {}", env!("CARGO_PKG_VERSION"));
    println!("Isolation: one KVM microVM per container (husk-vmm)");
    println!(" /dev/kvm: {kvm}");
    println!(
        " VMM confinement: {}",
        if rt.confine {
            format!(
                "namespaces (mnt, pid, ipc), chroot, uid {}, cgroup husk/<id>",
                husk_runtime::vmm::jail::vmm_uid()
            )
        } else {
            "off (not root, or HUSK_CONFINE=0)".into()
        }
    );
    println!(" Kernel: {}", rt.kernel.display());
    println!(" Guest image: {}", rt.guest_image.display());
    println!(" husk-vmm: {}", rt.vmm.display());
    println!(
        "Network: bridge {} {}/{} (NAT), none",
        rt.network.bridge, rt.network.subnet, rt.network.prefix
    );
    println!("Root Dir: {}", husk_runtime::default_data_dir().display());
    println!("Run Dir: {}", rt.run_dir.display());
    println!("Templates: {}", rt.cache_dir.join("templates").display());
    Ok(())
}

/// Pulls `reference` with a progress bar per layer (on a terminal).
fn pull(store: &ImageStore, reference: &str) -> Result<husk_runtime::image::ImageRecord> {
    use husk_runtime::image::pull::PullEvent;
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let multi = MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let bars: Arc<Mutex<HashMap<String, ProgressBar>>> = Arc::default();
    let style = ProgressStyle::with_template("{prefix}: {msg} [{bar:30}] {bytes}/{total_bytes}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let short = |d: &str| {
        d.trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect::<String>()
    };
    let events = {
        let bars = bars.clone();
        let reference = reference.to_string();
        Arc::new(move |e: PullEvent| {
            let Ok(mut bars) = bars.lock() else { return };
            match e {
                PullEvent::Resolved { digest, layers } => {
                    let _ = multi.println(format!("{reference}: resolved to {digest}"));
                    for (d, size) in layers {
                        let b = multi.add(ProgressBar::new(size));
                        b.set_style(style.clone());
                        b.set_prefix(short(&d));
                        b.set_message("Waiting");
                        bars.insert(d, b);
                    }
                }
                PullEvent::Exists { digest } => {
                    if let Some(b) = bars.get(&digest) {
                        b.finish_with_message("Already exists");
                    }
                }
                PullEvent::Progress { digest, bytes } => {
                    if let Some(b) = bars.get(&digest) {
                        b.set_message("Downloading");
                        b.inc(bytes);
                    }
                }
                PullEvent::Done { digest } => {
                    if let Some(b) = bars.get(&digest) {
                        b.finish_with_message("Pull complete");
                    }
                }
            }
        })
    };
    let r = store.pull(reference, events);
    for b in bars
        .lock()
        .map(|b| b.values().cloned().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        if !b.is_finished() {
            b.abandon_with_message("Failed");
        }
    }
    r
}

fn image(cmd: ImageCmd) -> Result<()> {
    let store = ImageStore::open(&default_store_dir())?;
    match cmd {
        ImageCmd::Pull { reference } => {
            let r = pull(&store, &reference)?;
            println!("Status: Downloaded image for {}", r.name);
            println!("{}", r.name);
        }
        ImageCmd::Import { file } => {
            for r in store.import(&file)? {
                println!("Loaded image: {} ({})", r.name, r.short_id());
            }
        }
        ImageCmd::Ls => {
            println!(
                "{:<40} {:<14} {:>7}",
                "REPOSITORY:TAG", "IMAGE ID", "LAYERS"
            );
            for r in store.list()? {
                println!("{:<40} {:<14} {:>7}", r.name, r.short_id(), r.layers.len());
            }
        }
        ImageCmd::Rm { images } => {
            for i in images {
                let r = store.remove(&i)?;
                println!("Untagged: {}", r.name);
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Ps { all } => ps(all).map(|_| 0).map_err(Failure::from),
        Cmd::Exec {
            interactive,
            tty,
            container,
            command,
        } => exec(interactive, tty, &container, command),
        Cmd::Logs { follow, container } => {
            logs(follow, &container).map(|_| 0).map_err(Failure::from)
        }
        Cmd::Stop { time, containers } => stop(time, &containers).map(|_| 0).map_err(Failure::from),
        Cmd::Kill {
            signal: sig,
            containers,
        } => parse_signal(&sig)
            .and_then(|n| {
                containers
                    .iter()
                    .try_for_each(|c| signal(c, n).map(|_| println!("{c}")))
            })
            .map(|_| 0)
            .map_err(Failure::from),
        Cmd::Inspect { containers } => inspect(&containers).map(|_| 0).map_err(Failure::from),
        Cmd::Rm { force, containers } => rm(force, &containers).map(|_| 0).map_err(Failure::from),
        Cmd::Image(c) => image(c).map(|_| 0).map_err(Failure::from),
        Cmd::Pull { reference } => image(ImageCmd::Pull { reference })
            .map(|_| 0)
            .map_err(Failure::from),
        Cmd::Volume(c) => volume(c).map(|_| 0).map_err(Failure::from),
        Cmd::Cluster(c) => cluster::cluster(c).map(|_| 0).map_err(Failure::from),
        Cmd::Node(c) => cluster::node(c).map(|_| 0).map_err(Failure::from),
        Cmd::Service(c) => cluster::service(c).map(|_| 0).map_err(Failure::from),
        Cmd::Stack(c) => cluster::stack(c).map(|_| 0).map_err(Failure::from),
        Cmd::Events { format } => cluster::events(format).map(|_| 0).map_err(Failure::from),
        Cmd::Info => info().map(|_| 0).map_err(Failure::from),
        Cmd::Version => Runtime::locate()
            .map(|rt| {
                println!("husk {}", env!("CARGO_PKG_VERSION"));
                println!("husk-vmm: {}", rt.vmm.display());
                println!("kernel: {}", rt.kernel.display());
                println!("guest image: {}", rt.guest_image.display());
                println!("templates: {}", rt.cache_dir.join("templates").display());
                println!("images: {}", default_store_dir().display());
                0
            })
            .map_err(Failure::from),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, e)) => {
            eprintln!("husk: {e:#}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker() {
        use husk_runtime::guest::RpcError;
        let refused = |code, message: &str| {
            anyhow::Error::new(RpcError {
                op: "CreateContainer c".into(),
                code,
                message: message.into(),
            })
            .context("starting c")
        };
        let nope = "exec: \"nope\": executable file not found in $PATH";
        assert_eq!(
            start_failure_code(&refused(Some(ttrpc::Code::NOT_FOUND), nope)),
            127
        );
        assert_eq!(
            start_failure_code(&refused(Some(ttrpc::Code::PERMISSION_DENIED), "x")),
            126
        );
        // By the code, not the text: an internal error that says "not found"
        // is husk's own failure, and so is a broken connection.
        assert_eq!(
            start_failure_code(&refused(Some(ttrpc::Code::INTERNAL), nope)),
            HUSK_ERROR
        );
        assert_eq!(start_failure_code(&refused(None, nope)), HUSK_ERROR);
        assert_eq!(
            start_failure_code(&anyhow::anyhow!("cgroup: EBUSY")),
            HUSK_ERROR
        );
    }

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
