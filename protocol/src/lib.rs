//! The husk agent API, shared by the host runtime (client) and husk-agent
//! (server): generated protobuf messages and ttrpc services, plus the
//! version handshake both sides use.

/// Generated messages (`husk.agent.v1`).
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated ttrpc clients and service traits.
#[allow(warnings, clippy::all, clippy::pedantic)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The API version this build speaks.
pub const API_VERSION: u32 = 1;

/// ttrpc metadata key carrying the client's API version on every request.
pub const VERSION_KEY: &str = "husk-api-version";

/// DestroySandbox metadata key: the caller kills the VM itself once it has
/// the answer (`Sandbox::end`). The guest then powers off on its own only
/// as a fallback for a caller gone meanwhile, late enough that it cannot
/// overtake the answer: a power-off that did would lose the answer, and
/// with it the caller's proof that the guest synced. Without the key the
/// guest powers off right after answering (a caller that waits for the
/// VM's exit).
pub const HOST_KILLS_KEY: &str = "husk-host-kills";

/// The most bytes a LaunchContainer's args and environment may take as
/// the JSON object `{"args": [...], "env": [...]}` (serde_json's encoding):
/// one message to the parked init, within a socket's default buffer.
pub const MAX_LAUNCH_BYTES: usize = 128 * 1024;

/// Type URLs of the details the agent attaches to a refusal whose cause a
/// caller acts on (a ttrpc status's code alone is shared by other causes:
/// NOT_FOUND is also "no such container").
pub mod detail {
    /// The process's program is not there (Docker's exit 127).
    pub const PROGRAM_NOT_FOUND: &str = "husk.agent.v1.ProgramNotFound";
    /// The process's program cannot be executed (Docker's exit 126).
    pub const PROGRAM_NOT_EXECUTABLE: &str = "husk.agent.v1.ProgramNotExecutable";
}

/// The vsock port the agent serves on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The vsock port processes' stdio streams connect to (see `Stdio`).
pub const STREAM_VSOCK_PORT: u32 = 1025;

/// Longest stream name a stream's first line may carry.
pub const MAX_STREAM_NAME: usize = 64;

/// Whether `name` may name a stdio stream.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_STREAM_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks the version a request carries; the error names both versions.
pub fn check_version(metadata_values: Option<&[String]>) -> Result<(), String> {
    let Some(values) = metadata_values else {
        return Err(format!(
            "request carries no {VERSION_KEY} metadata; this agent serves API version {API_VERSION}"
        ));
    };
    match values.first().map(|v| v.parse::<u32>()) {
        Some(Ok(v)) if v == API_VERSION => Ok(()),
        Some(Ok(v)) => Err(format!(
            "client speaks agent API version {v}; this agent serves version {API_VERSION}"
        )),
        _ => Err(format!("bad {VERSION_KEY} metadata {values:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn messages_round_trip() {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = "c1".into();
        req.oci_spec = br#"{"ociVersion":"1.0.2"}"#.to_vec();
        let bytes = req.write_to_bytes().unwrap();
        let back = agent::CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn garbage_does_not_parse_as_a_request() {
        // A truncated length-delimited field.
        assert!(agent::CreateContainerRequest::parse_from_bytes(&[0x0a, 0x05, b'a']).is_err());
    }

    #[test]
    fn version_check_names_both_versions() {
        assert!(check_version(Some(&["1".to_string()])).is_ok());
        let e = check_version(Some(&["7".to_string()])).unwrap_err();
        assert!(e.contains('7') && e.contains('1'), "{e}");
        assert!(check_version(None).unwrap_err().contains(VERSION_KEY));
        assert!(check_version(Some(&["x".to_string()])).is_err());
    }
}
