//! Link testguest as a static, non-PIE ELF at 1 MiB with our linker script.
//! (Link arguments live here rather than in .cargo/config.toml so the
//! linker script path is absolute whatever the caller's cwd.)

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");
    for arg in [
        "-nostartfiles".to_string(),
        "-nostdlib".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        format!("-Wl,-T,{dir}/link.ld"),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,norelro".to_string(),
        "-Wl,-z,noexecstack".to_string(),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
