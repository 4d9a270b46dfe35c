//! Generates the tonic/prost code; protoc comes from protoc-bin-vendored so a fresh machine
//! needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script is single-threaded; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let protos: Vec<String> = std::fs::read_dir("shoal/v1")?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .map(|p| p.display().to_string())
        .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=shoal/v1");
    tonic_prost_build::configure().compile_protos(&protos, &[".".to_string()])?;
    Ok(())
}
