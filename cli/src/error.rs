//! How husk ends: Docker's exit codes (125 for husk's own failure, 126
//! and 127 for a command that cannot run or is not there).

/// Exit code for husk's own failures, as Docker's 125.
pub(crate) const HUSK_ERROR: u8 = 125;

/// What a failed create, start or exec means for the exit code: Docker's
/// 127 for a command that is not there, 126 for one that cannot run, as
/// the agent's refusal says (its detail, not its text).
pub(crate) fn start_failure_code(e: &anyhow::Error) -> u8 {
    use husk_protocol::detail::{PROGRAM_NOT_EXECUTABLE, PROGRAM_NOT_FOUND};
    let refusal = e.chain().find_map(husk_runtime::guest::find_rpc);
    match refusal {
        Some(r) if r.is(PROGRAM_NOT_FOUND) => 127,
        Some(r) if r.is(PROGRAM_NOT_EXECUTABLE) => 126,
        _ => HUSK_ERROR,
    }
}

/// An error with the exit code it should end husk with.
pub(crate) struct Failure(pub(crate) u8, pub(crate) anyhow::Error);

impl Failure {
    /// A create or start that failed: its exit code says why (127, 126).
    pub(crate) fn starting(e: impl Into<anyhow::Error>) -> Failure {
        let e = e.into();
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
        use husk_protocol::detail::{PROGRAM_NOT_EXECUTABLE, PROGRAM_NOT_FOUND};
        use husk_runtime::guest::RpcError;
        use ttrpc::Code;
        let refused = |code, detail: Option<&str>, message: &str| {
            anyhow::Error::new(RpcError {
                op: "CreateContainer c".into(),
                code,
                detail: detail.map(String::from),
                message: message.into(),
            })
            .context("starting c")
        };
        let nope = "exec: \"nope\": executable file not found in $PATH";
        let found = Some(PROGRAM_NOT_FOUND);
        assert_eq!(
            start_failure_code(&refused(Some(Code::NOT_FOUND), found, nope)),
            127
        );
        let not_exec = Some(PROGRAM_NOT_EXECUTABLE);
        assert_eq!(
            start_failure_code(&refused(Some(Code::PERMISSION_DENIED), not_exec, "x")),
            126
        );
        // By the refusal's detail, not its code or text: "no such container"
        // is NOT_FOUND too, and an internal error may say "not found".
        assert_eq!(
            start_failure_code(&refused(Some(Code::NOT_FOUND), None, "no container \"c\"")),
            HUSK_ERROR
        );
        assert_eq!(
            start_failure_code(&refused(Some(Code::INTERNAL), None, nope)),
            HUSK_ERROR
        );
        assert_eq!(start_failure_code(&refused(None, None, nope)), HUSK_ERROR);
        assert_eq!(
            start_failure_code(&anyhow::anyhow!("cgroup: EBUSY")),
            HUSK_ERROR
        );
    }
}
