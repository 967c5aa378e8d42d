//! What a node is in its cluster (its id, role, certificates, managers),
//! kept in its state directory.

use serde::{Deserialize, Serialize};

use crate::node::transport::Tls;
use crate::types::Role;

/// What a node is in its cluster; kept in `<state>/identity.json` (0600:
/// it holds the node's private key).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: String,
    pub cluster_id: String,
    pub role: Role,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub managers: Vec<String>,
    pub etcd: Vec<String>,
    pub advertise: String,
}

impl Identity {
    pub fn tls(&self) -> Tls {
        Tls {
            ca_pem: self.ca_pem.clone(),
            identity: Some((self.cert_pem.clone(), self.key_pem.clone())),
        }
    }
}
