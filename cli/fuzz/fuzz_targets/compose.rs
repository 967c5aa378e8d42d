//! The compose parser (`husk stack deploy -c FILE`) on any text: a file
//! from a user's repository is input husk does not control. It must answer
//! with a stack or an error, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/cluster/compose.rs"]
#[allow(dead_code)]
mod compose;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = compose::parse(text, "fuzz");
    }
});
