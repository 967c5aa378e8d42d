//! Which network a sandbox joins.

use serde::{Deserialize, Serialize};

/// How a sandbox is networked (`husk run --network`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A tap on the bridge, an address from its range, NAT outbound.
    #[default]
    Bridge,
    /// No network: the container has only loopback.
    None,
}

impl std::str::FromStr for NetworkMode {
    type Err = crate::net::NetError;
    fn from_str(s: &str) -> crate::net::Result<Self> {
        use crate::net::NetError::Invalid;
        match s {
            "bridge" | "default" | "husk0" => Ok(NetworkMode::Bridge),
            "none" => Ok(NetworkMode::None),
            "host" => Err(Invalid(
                "--network host: a husk container runs in its own VM and cannot share the host's network stack; publish ports with -p".into()
            )),
            other => Err(Invalid(format!("--network {other:?}: husk has the networks \"bridge\" and \"none\""))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_host_says_why_not() {
        assert!("host"
            .parse::<NetworkMode>()
            .unwrap_err()
            .to_string()
            .contains("-p"));
        assert_eq!("none".parse::<NetworkMode>().unwrap(), NetworkMode::None);
    }
}
