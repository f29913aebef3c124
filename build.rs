//! Build script of the root crate. Does nothing unless feature `spdk` is on; then it
//! links SPDK into the crate's own test executables only, so `cargo test --features spdk
//! --lib` runs the SPDK side's unit tests (parameter parsing, JSON) against the SPDK the
//! module is built for. The module itself (`libspdk_bdev_pcache.so`, with its load-time
//! constructor) is the spdk-module crate's product; the `pcache` binary and the rlib
//! never link SPDK.
//!
//! From spdk-sys (`DEP_SPDK_LIB_DIR`, `DEP_SPDK_LIBS`, `DEP_SPDK_SEARCH`,
//! `DEP_SPDK_SYSLIBS`): `-L` and an rpath for SPDK's library directories, `-l` for the
//! libraries the module calls, and SPDK's system libraries with `--no-as-needed` (SPDK's
//! .so files use them without declaring them). No build dependencies: the default build
//! stays as cheap as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_SPDK").is_none() {
        return;
    }
    for v in ["LIB_DIR", "LIBS", "SEARCH", "SYSLIBS"] {
        println!("cargo:rerun-if-env-changed=DEP_SPDK_{v}");
    }
    let var = |v: &str| std::env::var(format!("DEP_SPDK_{v}")).unwrap_or_default();
    let lib_dir = var("LIB_DIR");
    let mut args = Vec::new();
    for dir in std::iter::once(lib_dir.as_str()).chain(var("SEARCH").split_whitespace()) {
        if !dir.is_empty() {
            args.push(format!("-L{dir}"));
            args.push(format!("-Wl,-rpath,{dir}"));
        }
    }
    args.extend(var("LIBS").split_whitespace().map(|l| format!("-l{l}")));
    let sys: Vec<String> = var("SYSLIBS")
        .split_whitespace()
        .map(|l| format!("-l{l}"))
        .collect();
    if !sys.is_empty() {
        args.push(format!(
            "-Wl,--push-state,--no-as-needed,{},--pop-state",
            sys.join(",")
        ));
    }
    for a in &args {
        println!("cargo:rustc-link-arg-tests={a}");
    }
}
