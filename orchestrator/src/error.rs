//! What a control or node operation refuses, typed, so the API answers
//! with the right gRPC code (`NotFound`, `InvalidArgument`, ...) and
//! callers decide by kind, never by an error's text. Failures underneath
//! (etcd, encoding) stay `anyhow` errors; this one rides inside them and is
//! found again by [`find`].

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no {0} named")]
    NoName(&'static str),
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name} is ambiguous ({matches} match)")]
    Ambiguous {
        kind: &'static str,
        name: String,
        matches: usize,
    },
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request itself is wrong: a spec, a label, a rename.
    #[error("{0}")]
    Invalid(String),
    /// Right request, wrong moment: a node still up, a manager removing
    /// itself, nothing to roll back to.
    #[error("{0}")]
    Precondition(String),
    #[error("task {task} is not assigned to node {node}")]
    NotAssigned { task: String, node: String },
    #[error("node {0} is not in the cluster (removed?)")]
    NodeRemoved(String),
    #[error("invalid join token")]
    InvalidJoinToken,
    #[error("this node is not a manager")]
    NotManager,
}

impl ControlError {
    pub fn code(&self) -> Code {
        match self {
            ControlError::NotFound { .. } | ControlError::NodeRemoved(_) => Code::NotFound,
            ControlError::NoName(_) | ControlError::Ambiguous { .. } | ControlError::Invalid(_) => {
                Code::InvalidArgument
            }
            ControlError::AlreadyExists(_) => Code::AlreadyExists,
            ControlError::Precondition(_)
            | ControlError::NotAssigned { .. }
            | ControlError::NotManager => Code::FailedPrecondition,
            ControlError::InvalidJoinToken => Code::Unauthenticated,
        }
    }
}

/// The refusal inside `e`, if it is one.
pub fn find(e: &anyhow::Error) -> Option<&ControlError> {
    e.chain().find_map(|c| c.downcast_ref::<ControlError>())
}

/// The one place an operation's error becomes the API's status: a refusal
/// by its kind; anything else (etcd, a record that does not decode, a
/// join the remote manager refused) FAILED_PRECONDITION, as before there
/// were kinds: the cluster's state did not allow it. Not UNAVAILABLE, which
/// clients retry: some of these are permanent.
pub fn status(e: anyhow::Error) -> Status {
    let code = find(&e).map_or(Code::FailedPrecondition, ControlError::code);
    Status::new(code, format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_refusal_keeps_its_code_under_context() {
        let e = Err::<(), _>(ControlError::NotFound {
            kind: "service",
            name: "web".into(),
        })
        .context("updating")
        .unwrap_err();
        let s = status(e);
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "updating: service web not found");
        // Text that merely says "not found" is not a refusal.
        let s = status(anyhow::anyhow!("etcd: key not found in cache"));
        assert_eq!(s.code(), Code::FailedPrecondition);
    }
}
