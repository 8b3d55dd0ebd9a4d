//! Compiles `proto/monitoring.proto` with tonic 0.14's prost code generator.
//! protoc comes from `protoc-bin-vendored`, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/monitoring.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/monitoring.proto"], &["proto"])?;
    Ok(())
}
