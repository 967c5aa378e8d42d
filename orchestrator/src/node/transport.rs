//! Connections: the local control socket (Unix, no TLS: its file mode is
//! the access control, as docker.sock's), and the cluster endpoint (TLS;
//! mutual once a node has its certificate).

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pki;
pub use husk_cluster_api::client::{default_socket, local_client};

/// Reaching a manager or a node over the cluster endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{what}")]
    Grpc {
        what: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: timed out")]
    Timeout { what: String },
    #[error("TLS")]
    Tls(#[from] rustls::Error),
    /// The manager's certificates are not what the join token names.
    #[error("{0}")]
    WrongCluster(String),
}

pub type Result<T> = std::result::Result<T, TransportError>;

fn grpc(what: String) -> impl FnOnce(tonic::transport::Error) -> TransportError {
    move |source| TransportError::Grpc { what, source }
}

/// What a node knows to reach managers: the CA, and its own certificate
/// once it has one.
#[derive(Clone)]
pub struct Tls {
    pub ca_pem: String,
    pub identity: Option<(String, String)>,
}

/// A channel to the manager at `addr` (host:port), verifying it holds a
/// manager certificate of this cluster's CA.
pub async fn manager_channel(addr: &str, tls: &Tls) -> Result<Channel> {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca_pem))
        .domain_name(pki::MANAGER_NAME);
    if let Some((cert, key)) = &tls.identity {
        cfg = cfg.identity(Identity::from_pem(cert, key));
    }
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(grpc(format!("manager address {addr:?}")))?
        .tls_config(cfg)
        .map_err(grpc(format!("TLS for manager {addr}")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(grpc(format!("connecting to manager {addr}")))?;
    Ok(ch)
}

/// A channel to node `node_id` at `addr`, verifying its certificate names
/// that node.
pub async fn node_channel(addr: &str, node_id: &str, tls: &Tls) -> Result<Channel> {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca_pem))
        .domain_name(pki::node_dns(node_id));
    if let Some((cert, key)) = &tls.identity {
        cfg = cfg.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(grpc(format!("node address {addr:?}")))?
        .tls_config(cfg)
        .map_err(grpc(format!("TLS for node {node_id}")))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(grpc(format!("connecting to node {node_id} at {addr}")))
}

/// The CA a manager presents, checked against a join token's digest
/// before anything is sent: the joining node has no trust yet, the token
/// gives it (Swarm's scheme). The manager sends its chain, CA last.
pub async fn fetch_ca(addr: &str, want_digest: &str) -> Result<String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::Timeout {
            what: format!("connecting to {addr}"),
        })?
        .map_err(|source| TransportError::Io {
            what: format!("connecting to {addr}"),
            source,
        })?;
    let name = rustls::pki_types::ServerName::try_from(pki::MANAGER_NAME)
        .map_err(|e| TransportError::WrongCluster(format!("manager name: {e}")))?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| TransportError::Timeout {
        what: format!("TLS handshake with {addr}"),
    })?
    .map_err(|source| TransportError::Io {
        what: format!("TLS handshake with {addr}"),
        source,
    })?;
    let chain = tls.get_ref().1.peer_certificates().ok_or_else(|| {
        TransportError::WrongCluster(format!("{addr}: the manager sent no certificate"))
    })?;
    let Some(ca) = chain.last().filter(|_| chain.len() >= 2) else {
        return Err(TransportError::WrongCluster(format!(
            "{addr} did not present a husk manager's certificate chain"
        )));
    };
    let digest = pki::hex(&<sha2::Sha256 as sha2::Digest>::digest(ca.as_ref()));
    if digest != want_digest {
        return Err(TransportError::WrongCluster(format!(
            "{addr} belongs to another cluster: its CA does not match the join token"
        )));
    }
    Ok(pem_encode("CERTIFICATE", ca.as_ref()))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// Accepts any server certificate: used only to read the chain a
/// manager presents, which is then checked against the token's digest.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pem_encoding_round_trips() {
        let (ca, _) = crate::pki::new_ca("c").unwrap();
        let der = crate::pki::pem_der(&ca).unwrap();
        let again = super::pem_encode("CERTIFICATE", &der);
        assert_eq!(crate::pki::pem_der(&again).unwrap(), der);
    }
}
