//! Compiles `protodino/v1/protodino.proto` with the vendored protoc (no system protoc needed)
//! and writes the file-descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .protoc_executable(protoc)
        .file_descriptor_set_path(out.join("protodino_descriptor.bin"))
        .compile_protos(
            &["protodino/v1/protodino.proto"],
            &[PathBuf::from("."), well_known],
        )?;
    println!("cargo:rerun-if-changed=protodino/v1/protodino.proto");
    Ok(())
}
