//! Build script of the root crate. Does nothing unless feature `spdk` is on; then, from
//! what spdk-sys found (`DEP_SPDK_LIB_DIR`, `DEP_SPDK_SYSLIBS`), it adds an rpath to
//! SPDK's library directory, so the module, tests and benches load SPDK's shared
//! libraries without `LD_LIBRARY_PATH`, and links SPDK's system libraries with
//! `--no-as-needed`: SPDK's .so files use them without declaring them, and rustc's
//! default `--as-needed` would drop them from executables that never call them directly.
//! No build dependencies: the default build stays as cheap as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_SPDK").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=DEP_SPDK_LIB_DIR");
    println!("cargo:rerun-if-env-changed=DEP_SPDK_SYSLIBS");
    if let Some(dir) = std::env::var_os("DEP_SPDK_LIB_DIR") {
        let dir = dir.to_string_lossy();
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    let syslibs = std::env::var("DEP_SPDK_SYSLIBS").unwrap_or_default();
    let libs: Vec<String> = syslibs
        .split_whitespace()
        .map(|l| format!("-l{l}"))
        .collect();
    if !libs.is_empty() {
        println!(
            "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,{},--pop-state",
            libs.join(",")
        );
    }
}
