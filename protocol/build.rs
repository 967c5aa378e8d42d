//! Generates the protobuf messages and ttrpc services from protos/ with the
//! pure-Rust protobuf parser: no protoc needed.

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=protos/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        // Async server (the agent serves every connection from one tokio
        // thread: a new connection must not cost guest threads), sync
        // clients (host tools and tests block on their calls).
        .customize(Customize {
            async_server: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent API from protos/agent.proto");
    // The generated files start with inner attributes (`#![...]`), which
    // `include!` cannot take; lib.rs sets the allowances on the modules.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path).expect("generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("rewriting generated file");
    }
}
