//! How husk ends: Docker's exit codes (125 for husk's own failure, 126
//! and 127 for a command that cannot run or is not there).

/// Exit code for husk's own failures, as Docker's 125.
pub(crate) const HUSK_ERROR: u8 = 125;

/// What a failed create, start or exec means for the exit code: Docker's
/// 127 for a command that is not there, 126 for one that cannot run, by
/// the agent's code for the refusal.
pub(crate) fn start_failure_code(e: &anyhow::Error) -> u8 {
    let code = e
        .chain()
        .find_map(|c| c.downcast_ref::<husk_runtime::guest::RpcError>())
        .and_then(|r| r.code);
    match code {
        Some(ttrpc::Code::NOT_FOUND) => 127,
        Some(ttrpc::Code::PERMISSION_DENIED) => 126,
        _ => HUSK_ERROR,
    }
}

/// An error with the exit code it should end husk with.
pub(crate) struct Failure(pub(crate) u8, pub(crate) anyhow::Error);

impl Failure {
    /// A create or start that failed: its exit code says why (127, 126).
    pub(crate) fn starting(e: anyhow::Error) -> Failure {
        Failure(start_failure_code(&e), e)
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(HUSK_ERROR, e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker() {
        use husk_runtime::guest::RpcError;
        let refused = |code, message: &str| {
            anyhow::Error::new(RpcError {
                op: "CreateContainer c".into(),
                code,
                message: message.into(),
            })
            .context("starting c")
        };
        let nope = "exec: \"nope\": executable file not found in $PATH";
        assert_eq!(
            start_failure_code(&refused(Some(ttrpc::Code::NOT_FOUND), nope)),
            127
        );
        assert_eq!(
            start_failure_code(&refused(Some(ttrpc::Code::PERMISSION_DENIED), "x")),
            126
        );
        // By the code, not the text: an internal error that says "not found"
        // is husk's own failure, and so is a broken connection.
        assert_eq!(
            start_failure_code(&refused(Some(ttrpc::Code::INTERNAL), nope)),
            HUSK_ERROR
        );
        assert_eq!(start_failure_code(&refused(None, nope)), HUSK_ERROR);
        assert_eq!(
            start_failure_code(&anyhow::anyhow!("cgroup: EBUSY")),
            HUSK_ERROR
        );
    }
}
