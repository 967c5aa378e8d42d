//! The cluster API's decoding: protobuf bytes from a client or a peer
//! manager to the domain types (convert.rs). Anything may arrive; what
//! decodes must convert back to the same value.
#![no_main]

use husk_cluster_api::pb;
use husk_cluster_api::types::{Node, Service, ServiceSpec, Task};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Decodes `bytes` as wire type `W`, converts it to `D`; if that works,
/// the round trip through the wire type gives `D` back.
fn check<W, D>(bytes: &[u8])
where
    W: Message + Default + From<D>,
    D: TryFrom<W> + Clone + PartialEq + std::fmt::Debug,
{
    let Ok(wire) = W::decode(bytes) else { return };
    let Ok(dom) = D::try_from(wire) else { return };
    let again = D::try_from(W::from(dom.clone()));
    assert!(
        again.as_ref().is_ok_and(|d| *d == dom),
        "round trip changed {dom:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 4 {
        0 => check::<pb::Node, Node>(bytes),
        1 => check::<pb::ServiceSpec, ServiceSpec>(bytes),
        2 => check::<pb::Service, Service>(bytes),
        _ => check::<pb::Task, Task>(bytes),
    }
});
