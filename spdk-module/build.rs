//! Build script of the SPDK module crate (`spdk_bdev_pcache`): links SPDK into the
//! shared object, with the module's load-time constructor, and into nothing else.
//!
//! It passes the constructor's object (c/load.c, compiled here), then spdk-sys's link
//! arguments (`DEP_SPDK_LINK_ARGS`): `-l` for exactly the SPDK libraries the module
//! calls, an rpath to SPDK's library directories, so the module loads SPDK's shared
//! libraries without `LD_LIBRARY_PATH`, and SPDK's system libraries with
//! `--no-as-needed`: SPDK's .so files use them without declaring them, and rustc's
//! default `--as-needed` would drop them, since the module never calls them directly.
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
    println!("cargo:rerun-if-env-changed=DEP_SPDK_LINK_ARGS");
    let link = std::env::var("DEP_SPDK_LINK_ARGS").unwrap_or_default();
    if link.is_empty() {
        panic!("spdk_bdev_pcache: spdk-sys exported no SPDK link arguments (DEP_SPDK_LINK_ARGS)");
    }

    // The constructor: one object, named first on the link line.
    let objs = cc::Build::new()
        .file("c/load.c")
        .warnings(true)
        .pic(true)
        .compile_intermediates();
    let obj: &PathBuf = objs.first().expect("cc compiled c/load.c to no object");
    let mut args = vec![obj.display().to_string()];

    args.extend(link.split_whitespace().map(str::to_string));
    for a in &args {
        println!("cargo:rustc-link-arg-cdylib={a}");
    }
}
