//! The requests that act on a VM rather than configure one, the instance
//! description, and the error body every failed request carries.

use serde::{Deserialize, Serialize};

/// `PUT /actions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    InstanceStart,
    Pause,
    Resume,
    /// Refused by husk-vmm with a reason: its guest has no keyboard
    /// controller driver. Known, so the refusal can say so.
    SendCtrlAltDel,
}

/// `PATCH /vm`: Firecracker's form of pause and resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmStateChange {
    pub state: VmState,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `GET /`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
    Stopped,
}

/// The body of every error response (Firecracker's shape).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms_are_firecrackers() {
        let a: Action = serde_json::from_str(r#"{"action_type": "InstanceStart"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::InstanceStart);
        let s: VmStateChange = serde_json::from_str(r#"{"state": "Paused"}"#).unwrap();
        assert_eq!(s.state, VmState::Paused);
        assert_eq!(
            serde_json::to_string(&InstanceState::NotStarted).unwrap(),
            r#""Not started""#
        );
        let e = serde_json::from_str::<Action>(r#"{"action_type": "Explode"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `Explode`"), "{e}");
    }
}
