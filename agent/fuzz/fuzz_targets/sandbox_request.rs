//! Request decoding and validation as the agent (PID 1) does it: any bytes
//! as a CreateSandboxRequest, then the validation that turns it into files.
#![no_main]

use husk_agent::sandbox::sandbox_files;
use husk_protocol::agent::CreateSandboxRequest;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = CreateSandboxRequest::parse_from_bytes(data) {
        if let Ok(files) = sandbox_files(&req) {
            // What passes validation is one hosts(5)/resolv.conf line per entry.
            for (_, content) in files {
                assert!(!content.contains('\0'));
            }
        }
    }
    let _ = husk_protocol::check_version(Some(&[String::from_utf8_lossy(data).into_owned()]));
});
