//! husk-agent as a library: the services and PID 1 duties, so the binary,
//! tests and fuzz targets share them.

pub mod init;
pub mod rpc;
pub mod sandbox;
