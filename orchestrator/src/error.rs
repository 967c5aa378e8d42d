//! What a control or node operation refuses, typed, so the API answers
//! with the right gRPC code (`NotFound`, `InvalidArgument`, ...) and
//! callers decide by kind, never by an error's text. Other modules' errors
//! carry it as a variant or source; [`find`] finds it again.

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
    /// The state store failed (after retrying what is transient).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("etcd holds no husk cluster")]
    NoCluster,
    /// Leadership was lost, or the campaign for it failed.
    #[error("{what}")]
    Election {
        what: &'static str,
        #[source]
        source: Option<crate::store::StoreError>,
    },
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
            // Not UNAVAILABLE, which clients retry: some are permanent.
            ControlError::Store(_) | ControlError::NoCluster | ControlError::Election { .. } => {
                Code::FailedPrecondition
            }
        }
    }
}

/// The refusal in `e` or its causes, if it is one (itself, or inside a
/// node's error).
pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ControlError> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<ControlError>() {
            return Some(r);
        }
        if let Some(crate::node::NodeError::Control(r)) = c.downcast_ref::<crate::node::NodeError>()
        {
            return Some(r);
        }
        cur = c.source();
    }
    None
}

/// The one place an operation's error becomes the API's status: a refusal
/// by its kind; anything else (a join the remote manager refused, a
/// certificate that does not parse) FAILED_PRECONDITION: the cluster's
/// state did not allow it. Not UNAVAILABLE, which clients retry: some of
/// these are permanent. The message is the error and its causes.
pub fn status<E: std::error::Error + 'static>(e: E) -> Status {
    let code = find(&e).map_or(Code::FailedPrecondition, ControlError::code);
    Status::new(code, husk_runtime::util::chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_its_code_inside_another_error() {
        let e = crate::node::NodeError::Control(ControlError::NotFound {
            kind: "service",
            name: "web".into(),
        });
        let s = status(e);
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "service web not found");
        assert_eq!(
            status(ControlError::InvalidJoinToken).code(),
            Code::Unauthenticated
        );
        // A store's failure is not a refusal, whatever its text says.
        let s = status(crate::store::StoreError::Contended("key not found".into()));
        assert_eq!(s.code(), Code::FailedPrecondition);
    }
}
