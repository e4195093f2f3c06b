//! Compiles proto/tally/v1/*.proto with protox (no system protoc) into the tonic
//! services and prost messages of `tally::query::pb`, and the encoded descriptor set
//! the reflection service serves.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tally/v1/common.proto",
        "proto/tally/v1/query.proto",
        "proto/tally/v1/ingest.proto",
        "proto/tally/v1/admin.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tally_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
