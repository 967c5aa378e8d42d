//! A CRI v1 client on containerd's unix socket, shared by the CRI test
//! and bench/ctr's pod starter (tests/examples/cri_pods.rs).

use std::path::PathBuf;

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata};
use tonic::transport::Channel;

pub async fn connect(socket: PathBuf) -> Result<RuntimeServiceClient<Channel>, String> {
    // The URI is not used: every connection is the unix socket.
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    Ok(RuntimeServiceClient::new(channel))
}

/// A pod named `name` in Kubernetes namespace `namespace`, hostname `name`.
pub fn pod_config(name: &str, namespace: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}
