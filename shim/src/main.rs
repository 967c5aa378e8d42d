//! containerd-shim-husk-v2: containerd's runtime v2 shim (task API v2,
//! runtime type `io.containerd.husk.v2`) running each task's containers in
//! a husk microVM. One shim and one VM per group: a CRI pod (grouped by
//! `io.kubernetes.cri.sandbox-id`), else a single container.

mod config;
mod error;
mod io;
mod pod;
mod rootfs;
mod service;
mod spec;

fn main() {
    containerd_shim::run::<service::Service>("io.containerd.husk.v2", None)
}
