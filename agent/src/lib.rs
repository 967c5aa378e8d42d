//! husk-agent as a library: the services and PID 1 duties, so the binary,
//! tests and fuzz targets share them.

pub mod containers;
pub mod executable;
pub mod init;
pub mod kmsg;
pub mod network;
pub mod panics;
pub mod profile;
pub mod reaper;
pub mod rpc;
pub mod sandbox;
pub mod server;
pub mod spawner;
pub mod stream;
pub mod trace;
pub mod warm;
