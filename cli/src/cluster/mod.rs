//! `husk cluster|node|service`: Docker's swarm commands, sent to the local
//! huskd over its control socket (`HUSK_HOST`, default
//! /run/husk/huskd.sock).

mod compose;
mod conn;
mod events;
mod flags;
mod node;
mod output;
mod service;
mod stack;
mod swarm;

pub(crate) use events::events;
pub(crate) use node::{node, NodeCmd};
pub(crate) use service::{service, ServiceCmd};
pub(crate) use stack::{stack, StackCmd};
pub(crate) use swarm::{cluster, ClusterCmd};
