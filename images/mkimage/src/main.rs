//! husk-mkimage: build a small OCI image from layer directories.
//!
//! Example: husk-mkimage --name husk.local/busybox:latest --layer rootfs \
//!   --cmd '["sh"]' --oci-archive busybox.oci.tar --docker-archive busybox.tar

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use husk_mkimage::{build, write_atomic, ImageSpec};

#[derive(Parser)]
#[command(about = "Build a reproducible OCI image (OCI layout archive + docker-archive)")]
struct Args {
    /// Image reference with tag, e.g. husk.local/busybox:latest.
    #[arg(long)]
    name: String,
    /// A directory that becomes one layer; repeat, lowest layer first.
    #[arg(long = "layer", required = true)]
    layers: Vec<PathBuf>,
    /// Entrypoint as a JSON array of strings.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Cmd as a JSON array of strings.
    #[arg(long)]
    cmd: Option<String>,
    /// KEY=VALUE; repeatable.
    #[arg(long = "env")]
    env: Vec<String>,
    #[arg(long)]
    workdir: Option<String>,
    /// PORT/PROTO, e.g. 80/tcp; repeatable.
    #[arg(long = "expose")]
    expose: Vec<String>,
    /// Where to write the OCI image layout archive.
    #[arg(long)]
    oci_archive: Option<PathBuf>,
    /// Where to write the docker-archive.
    #[arg(long)]
    docker_archive: Option<PathBuf>,
}

fn json_array(what: &str, s: &Option<String>) -> Result<Option<Vec<String>>> {
    s.as_deref()
        .map(|s| {
            serde_json::from_str::<Vec<String>>(s)
                .with_context(|| format!("--{what} must be a JSON array of strings, got {s:?}"))
        })
        .transpose()
}

fn main() -> Result<()> {
    let a = Args::parse();
    let spec = ImageSpec {
        name: a.name,
        layers: a.layers,
        entrypoint: json_array("entrypoint", &a.entrypoint)?,
        cmd: json_array("cmd", &a.cmd)?,
        env: a.env,
        workdir: a.workdir,
        exposed_ports: a.expose,
    };
    let img = build(&spec)?;
    if let Some(p) = &a.oci_archive {
        write_atomic(p, &img.oci_archive)?;
    }
    if let Some(p) = &a.docker_archive {
        write_atomic(p, &img.docker_archive)?;
    }
    println!(
        "{} manifest={} config={}",
        spec.name, img.manifest_digest, img.config_digest
    );
    Ok(())
}
