//! Build script of the root crate. Does nothing unless feature `spdk` is on; then it
//! links SPDK into the cdylib (the module preloaded into SPDK apps), with the module's
//! load-time constructor, and into nothing else: the `pcache` binary never depends on
//! SPDK.
//!
//! From what spdk-sys found (`DEP_SPDK_LIB_DIR`, `DEP_SPDK_LIBS`, `DEP_SPDK_SEARCH`,
//! `DEP_SPDK_SYSLIBS`, `DEP_SPDK_LOAD_OBJ`) it passes the constructor's object, `-l` for exactly the SPDK libraries the module calls, an
//! rpath to SPDK's library directories, so the module loads SPDK's shared libraries
//! without `LD_LIBRARY_PATH`, and SPDK's system libraries with `--no-as-needed`: SPDK's
//! .so files use them without declaring them, and rustc's default `--as-needed` would
//! drop them, since the module never calls them directly.
//! No build dependencies: the default build stays as cheap as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_SPDK").is_none() {
        return;
    }
    for v in ["LIB_DIR", "LIBS", "SEARCH", "SYSLIBS", "LOAD_OBJ"] {
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
    // The module's load-time constructor (spdk-sys/c/load.c): an object named on the link
    // line is always linked, unlike one in an archive.
    let obj = var("LOAD_OBJ");
    if !obj.is_empty() {
        args.insert(0, obj);
    }
    // `-cdylib`: the lib target's cdylib only, not the rlib, the binaries, tests or
    // benches (none of which call SPDK).
    for a in &args {
        println!("cargo:rustc-link-arg-cdylib={a}");
    }
}
