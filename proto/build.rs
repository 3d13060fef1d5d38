//! Generates the rune.v1 code with the vendored protoc, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY-free: build scripts are single-threaded; the variable is read by prost-build below.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=proto/rune/v1/rune.proto");
    println!("cargo:rerun-if-changed=proto/rune/raft/v1/raft.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set serves gRPC server reflection (grpcurl, grpc_cli).
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("rune_descriptor.bin"))
        .compile_protos(&["proto/rune/v1/rune.proto"], &["proto"])?;
    // The raft peers' protocol: no reflection, it is not for people.
    tonic_prost_build::configure().compile_protos(&["proto/rune/raft/v1/raft.proto"], &["proto"])?;
    Ok(())
}
