//! Build script of the SPDK module crate (`spdk_bdev_pcache`): links SPDK into the
//! shared object, with the module's load-time constructor, and into nothing else.
//!
//! From what spdk-sys found (`DEP_SPDK_LIB_DIR`, `DEP_SPDK_LIBS`, `DEP_SPDK_SEARCH`,
//! `DEP_SPDK_SYSLIBS`) it passes the constructor's object (c/load.c, compiled here), `-l`
//! for exactly the SPDK libraries the module calls, an rpath to SPDK's library
//! directories, so the module loads SPDK's shared libraries without `LD_LIBRARY_PATH`,
//! and SPDK's system libraries with `--no-as-needed`: SPDK's .so files use them without
//! declaring them, and rustc's default `--as-needed` would drop them, since the module
//! never calls them directly.
//!
//! Invariants: the flags go to the cdylib only (`rustc-link-arg-cdylib`); the constructor
//! is a loose object named on the link line, so it is always linked (a member of an
//! archive would be dropped, nothing references it), and it lives here, not in the
//! pcache rlib, where it would be kept in every executable linking pcache and drag SPDK
//! in.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=c/load.c");
    for v in ["LIB_DIR", "LIBS", "SEARCH", "SYSLIBS"] {
        println!("cargo:rerun-if-env-changed=DEP_SPDK_{v}");
    }
    let var = |v: &str| std::env::var(format!("DEP_SPDK_{v}")).unwrap_or_default();
    let lib_dir = var("LIB_DIR");
    if lib_dir.is_empty() {
        panic!("spdk_bdev_pcache: spdk-sys exported no SPDK library directory (DEP_SPDK_LIB_DIR)");
    }

    // The constructor: one object, named first on the link line.
    let objs = cc::Build::new()
        .file("c/load.c")
        .warnings(true)
        .pic(true)
        .compile_intermediates();
    let obj: &PathBuf = objs.first().expect("cc compiled c/load.c to no object");
    let mut args = vec![obj.display().to_string()];

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
        println!("cargo:rustc-link-arg-cdylib={a}");
    }
}
