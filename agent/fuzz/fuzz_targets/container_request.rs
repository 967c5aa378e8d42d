//! Container request decoding and validation as the agent (PID 1) does it:
//! any bytes as a CreateContainerRequest / ExecProcessRequest (with the OCI
//! spec or process JSON inside), then the checks that run before anything
//! is mounted or spawned.
#![no_main]

use husk_agent::containers::{
    check_bare, check_create, check_exec, check_launch, check_storage, relative_path,
};
use husk_protocol::agent::{
    BareExecRequest, CreateContainerRequest, ExecProcessRequest, LaunchContainerRequest,
};
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = CreateContainerRequest::parse_from_bytes(data) {
        if check_create(&req).is_ok() {
            // What passes names only paths that stay inside their directory.
            for s in &req.storages {
                assert!(check_storage(s).is_ok());
                assert!(std::path::Path::new(&s.mount_point)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))));
            }
        }
    }
    if let Ok(req) = ExecProcessRequest::parse_from_bytes(data) {
        let _ = check_exec(&req);
    }
    if let Ok(req) = BareExecRequest::parse_from_bytes(data) {
        if check_bare(&req).is_ok() {
            assert!(relative_path("root", &req.root).is_ok());
            assert!(!req.args.is_empty() && req.args.iter().all(|a| !a.contains('\0')));
        }
    }
    if let Ok(req) = LaunchContainerRequest::parse_from_bytes(data) {
        if check_launch(&req).is_ok() {
            // What passes can be set as the init's environment and argv
            // without a panic there.
            assert!(req.args.iter().all(|a| !a.contains('\0')));
            assert!(req.env.iter().all(|e| matches!(
                e.split_once('='),
                Some((k, _)) if !k.is_empty() && !e.contains('\0')
            )));
        }
    }
    // The spec JSON straight, as most inputs fail protobuf decoding.
    let req = CreateContainerRequest {
        container_id: "c".into(),
        oci_spec: data.to_vec(),
        ..Default::default()
    };
    if let Ok(spec) = check_create(&req) {
        let root = spec.root().as_ref().expect("checked");
        assert!(relative_path("root", &root.path().to_string_lossy()).is_ok());
    }
});
