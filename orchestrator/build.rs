//! Generates the cluster API (tonic) from proto/cluster.proto; needs protoc
//! (Debian's protobuf-compiler, installed by scripts/setup.sh).

fn main() {
    println!("cargo:rerun-if-changed=proto/cluster.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/cluster.proto"], &["proto"])
        .expect("generating the cluster API from proto/cluster.proto");
}
