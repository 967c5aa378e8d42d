//! The cluster CA and join tokens, as Swarm has them: the CA (its key kept
//! in etcd, for managers) signs every node's certificate — CN the node id,
//! OU its role — and a join token names the CA by digest (so a joining
//! node can tell it reached the right cluster) and carries a secret (so
//! the cluster can tell the node was invited).

/// The cluster's certificates and join tokens.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Making or signing a key or certificate failed.
    #[error("{what}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the signing request is not valid: {0}")]
    BadCsr(String),
    /// A certificate a peer presented, or a PEM given, is not what a husk
    /// node's is.
    #[error("{0}")]
    BadCertificate(String),
    #[error("join token: expected HUSKTKN-1-<CA digest>-<secret>")]
    TokenForm,
    #[error("join token: malformed (the CA digest and the secret are 64 hex digits each)")]
    TokenDigits,
    #[error(transparent)]
    Io(#[from] husk_runtime::util::IoError),
}

pub type Result<T> = std::result::Result<T, PkiError>;

fn rcgen(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

use crate::types::Role;

/// The name every manager certificate carries and nodes verify: managers
/// move between addresses, the cluster's trust does not.
pub const MANAGER_NAME: &str = "manager.husk.cluster";
const TOKEN_PREFIX: &str = "HUSKTKN-1";
const OU_MANAGER: &str = "husk-manager";
const OU_WORKER: &str = "husk-worker";

/// Node certificates last a year: rotation is left to a later issue.
const NODE_CERT_DAYS: i64 = 365;

/// A new CA: (certificate PEM, key PEM).
pub fn new_ca(cluster_id: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(rcgen("generating the CA key"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "husk cluster CA");
    p.distinguished_name
        .push(DnType::OrganizationName, cluster_id);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time_now();
    p.not_before = now - std::time::Duration::from_secs(3600);
    p.not_after = now + std::time::Duration::from_secs(20 * 365 * 86400);
    let cert = p.self_signed(&key).map_err(rcgen("signing the CA"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A key and a signing request for it: what a joining node sends.
pub fn new_key_and_csr() -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(rcgen("generating the node key"))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(rcgen("making the signing request"))?;
    Ok((
        key.serialize_pem(),
        csr.pem().map_err(rcgen("encoding the request"))?,
    ))
}

/// Signs the key of `csr_pem` for node `node_id` in `role`; the request's
/// own subject and names are ignored (the CA says who the node is).
pub fn sign_node(
    ca_cert: &str,
    ca_key: &str,
    csr_pem: &str,
    node_id: &str,
    cluster_id: &str,
    role: Role,
) -> Result<String> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::BadCsr(e.to_string()))?;
    let key = KeyPair::from_pem(ca_key).map_err(rcgen("the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, key).map_err(rcgen("the CA certificate"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, node_id);
    p.distinguished_name.push(
        DnType::OrganizationalUnitName,
        match role {
            Role::Manager => OU_MANAGER,
            Role::Worker => OU_WORKER,
        },
    );
    p.distinguished_name
        .push(DnType::OrganizationName, cluster_id);
    // Every node certificate works both ways (it serves and it calls);
    // managers also answer to the shared manager name.
    p.subject_alt_names = vec![SanType::DnsName(
        node_dns(node_id).try_into().map_err(rcgen("node name"))?,
    )];
    if role == Role::Manager {
        p.subject_alt_names.push(SanType::DnsName(
            MANAGER_NAME.try_into().map_err(rcgen("name"))?,
        ));
    }
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time_now();
    p.not_before = now - std::time::Duration::from_secs(3600);
    p.not_after = now + std::time::Duration::from_secs(NODE_CERT_DAYS as u64 * 86400);
    let cert = p
        .signed_by(&csr.public_key, &issuer)
        .map_err(rcgen("signing the node certificate"))?;
    Ok(cert.pem())
}

/// The DNS name a node's certificate carries.
pub fn node_dns(node_id: &str) -> String {
    format!("{node_id}.node.husk.cluster")
}

/// Who a peer certificate (DER) says it is: (node id, role).
pub fn peer_identity(der: &[u8]) -> Result<(String, Role)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(format!("peer certificate: {e}")))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| PkiError::BadCertificate("peer certificate has no CN".into()))?;
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or_else(|| PkiError::BadCertificate("peer certificate has no OU".into()))?;
    let role = match ou {
        OU_MANAGER => Role::Manager,
        OU_WORKER => Role::Worker,
        _ => {
            return Err(PkiError::BadCertificate(format!(
                "peer certificate OU {ou:?} is no husk role"
            )))
        }
    };
    Ok((cn.to_string(), role))
}

/// The hex SHA-256 of a PEM certificate's DER.
pub fn cert_digest(pem: &str) -> Result<String> {
    let der = pem_der(pem)?;
    Ok(hex(&Sha256::digest(der)))
}

/// The DER of the first certificate in `pem`.
pub fn pem_der(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let c = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::BadCertificate(format!("not a PEM certificate: {e}")))?;
    Ok(c.to_vec())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new token secret: 32 random bytes, hex.
pub fn new_secret() -> Result<String> {
    let mut b = [0u8; 32];
    husk_runtime::util::getrandom(&mut b)?;
    Ok(hex(&b))
}

/// `HUSKTKN-1-<CA digest>-<secret>`.
pub fn token(ca_digest: &str, secret: &str) -> String {
    format!("{TOKEN_PREFIX}-{ca_digest}-{secret}")
}

/// A token's (CA digest, secret), or what is wrong with it.
pub fn parse_token(t: &str) -> Result<(String, String)> {
    let rest = t
        .trim()
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|r| r.strip_prefix('-'))
        .ok_or(PkiError::TokenForm)?;
    let (ca, secret) = rest.split_once('-').ok_or(PkiError::TokenForm)?;
    let hex64 = |s: &str| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
    if !hex64(ca) || !hex64(secret) {
        return Err(PkiError::TokenDigits);
    }
    Ok((ca.to_string(), secret.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let (ca, _) = new_ca("c1").unwrap();
        let d = cert_digest(&ca).unwrap();
        let s = new_secret().unwrap();
        let t = token(&d, &s);
        assert_eq!(parse_token(&t).unwrap(), (d.clone(), s));
        for bad in ["", "HUSKTKN-1-abc-def", "SWMTKN-1-x-y", &t[..t.len() - 1]] {
            assert!(parse_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_certificates_name_node_and_role() {
        let (ca, ca_key) = new_ca("c1").unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let pem = sign_node(&ca, &ca_key, &csr, "node1", "c1", Role::Manager).unwrap();
        let (id, role) = peer_identity(&pem_der(&pem).unwrap()).unwrap();
        assert_eq!((id.as_str(), role), ("node1", Role::Manager));
        let pem = sign_node(&ca, &ca_key, &csr, "node2", "c1", Role::Worker).unwrap();
        assert_eq!(
            peer_identity(&pem_der(&pem).unwrap()).unwrap().1,
            Role::Worker
        );
        let e = sign_node(
            &ca,
            &ca_key,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "n",
            "c1",
            Role::Worker,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("signing request"), "{e:#}");
    }
}
