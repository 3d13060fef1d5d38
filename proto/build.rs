//! Generates the rune.v1 code with the vendored protoc, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY-free: build scripts are single-threaded; the variable is read by prost-build below.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=proto/rune/v1/rune.proto");
    tonic_prost_build::configure().compile_protos(&["proto/rune/v1/rune.proto"], &["proto"])?;
    Ok(())
}
