//! What the shim fails at, typed; `service::internal` is the one place it
//! becomes a ttrpc status for containerd (an agent's refusal keeps its
//! code, found in the error's causes).

use std::path::PathBuf;

use husk_runtime::container::ContainerError;
use husk_runtime::sandbox::SandboxError;
use husk_runtime::util::IoError;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// containerd's runtime options or the shim's configuration file.
    #[error("{0}")]
    Config(String),
    #[error("shim configuration {}", .path.display())]
    ConfigFile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("containerd's runtime options")]
    Options(#[from] containerd_shim::protos::protobuf::Error),
    #[error("reading the bundle's config.json")]
    Bundle(#[from] oci_spec::OciSpecError),
    /// What the bundle or containerd asks that husk cannot do in a guest
    /// (a relative bind source, a stdio scheme, a logger path).
    #[error("{0}")]
    Unsupported(String),
    #[error("mounting the rootfs ({typ}): {message}")]
    Rootfs { typ: String, message: String },
    #[error("the runtime")]
    Runtime(#[from] husk_runtime::config::ConfigError),
    #[error("starting the container")]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Join(#[from] husk_runtime::container::NotJoined),
    #[error("the pod's sandbox")]
    Sandbox(#[from] SandboxError),
    /// A pod's container came before (or after) its pod's sandbox.
    #[error("{0}")]
    Pod(String),
}

pub type Result<T> = std::result::Result<T, ShimError>;
