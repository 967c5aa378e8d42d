//! A client of the local huskd: its control socket (Unix, no TLS: the
//! socket's file mode is the access control, as docker.sock's).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb::cluster_client::ClusterClient;

/// The control socket huskd listens on: `$HUSK_HOST` (a path, or
/// `unix://path`), else /run/husk/huskd.sock.
pub fn default_socket() -> PathBuf {
    match std::env::var("HUSK_HOST") {
        Ok(h) if !h.is_empty() => PathBuf::from(h.strip_prefix("unix://").unwrap_or(&h)),
        _ => PathBuf::from("/run/husk/huskd.sock"),
    }
}

/// huskd's control socket did not answer.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to huskd at {} (is it running? HUSK_HOST names another socket)", .socket.display())]
pub struct ConnectError {
    pub socket: PathBuf,
    #[source]
    pub source: tonic::transport::Error,
}

/// A client of the huskd listening on `socket`.
pub async fn local_client(socket: &Path) -> Result<ClusterClient<Channel>, ConnectError> {
    let path = socket.to_path_buf();
    let failed = |source| ConnectError {
        socket: socket.to_path_buf(),
        source,
    };
    let ch = Endpoint::try_from("http://huskd.local")
        .map_err(failed)?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(failed)?;
    Ok(ClusterClient::new(ch).max_decoding_message_size(64 << 20))
}
