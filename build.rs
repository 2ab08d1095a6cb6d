//! Compiles the wire protocols in `proto/` (the Direktiv isolate service, the
//! flow callback) into Rust with tonic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/isolate/isolate.proto",
        "proto/flow/flow.proto",
        "proto/isolated/control.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
