//! Generates the cluster API (tonic) from proto/cluster.proto; needs protoc
//! (Debian's protobuf-compiler, installed by scripts/setup.sh). Server stubs
//! only with the `server` feature (huskd), so clients link no server code.

fn main() {
    println!("cargo:rerun-if-changed=proto/cluster.proto");
    let server = std::env::var_os("CARGO_FEATURE_SERVER").is_some();
    tonic_prost_build::configure()
        .build_server(server)
        // Labels are ordered maps in the cluster's objects, as in etcd.
        .btree_map(".")
        .compile_protos(&["proto/cluster.proto"], &["proto"])
        .expect("generating the cluster API from proto/cluster.proto");
}
