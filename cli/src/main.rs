//! husk: Docker's command line for containers that each run in their own
//! microVM. `husk run` restores a sandbox from the runtime's template (or
//! boots one with `--boot cold`), hands it the image as a read-only erofs
//! drive and runs the container there; its output and exit code are the
//! container's.

mod adopt;
mod cluster;
mod container;
mod error;
mod image;
mod run;
mod system;
mod tty;
mod volume;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use husk_runtime::image::default_store_dir;
use husk_runtime::Runtime;

use crate::container::{exec, inspect, logs, parse_signal, ps, rm, signal, stop};
use crate::error::{Failure, HUSK_ERROR};
use crate::image::{image, ImageCmd};
use crate::run::{run, RunArgs};
use crate::system::info;
use crate::volume::{volume, VolumeCmd};

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
    /// For bench/run: one fork+exec of a command in an image's root in a
    /// new sandbox, outside any container (the floor a container start is
    /// measured against). Prints `bare-exec: status=… host-s=… guest-s=…
    /// setup-s=…` (host-s leaves out setup-s: the guest mounting the image,
    /// reading the program into its page cache, unmounting).
    #[command(hide = true)]
    BareExec {
        /// Leave the page cache cold: the program is read from the image's
        /// drive by its exec, as in a start without a container template
        /// (host-s still leaves out the image's mount and unmount).
        #[arg(long)]
        cold: bool,
        image: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    // husk run as a detached container's log copier, or as the adopter of
    // a container whose owner died: internal modes, not commands.
    if let Some(code) = husk_runtime::container::logcopy::run_if_asked() {
        return ExitCode::from(u8::try_from(code).unwrap_or(HUSK_ERROR));
    }
    if let Ok(id) = std::env::var(adopt::ADOPT_ENV) {
        return exit(adopt::adopted(&id));
    }
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Run(_)
            | Cmd::Ps { .. }
            | Cmd::Exec { .. }
            | Cmd::Logs { .. }
            | Cmd::Stop { .. }
            | Cmd::Kill { .. }
            | Cmd::Inspect { .. }
            | Cmd::Rm { .. }
            | Cmd::Info
    ) {
        adopt::adopt_orphans();
    }
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
        Cmd::BareExec {
            cold,
            image,
            command,
        } => system::bare_exec(&image, &command, !cold).map_err(Failure::from),
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
    exit(r)
}

fn exit(r: Result<u8, Failure>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, e)) => {
            eprintln!("husk: {e:#}");
            ExitCode::from(code)
        }
    }
}
