//! Build script of the root crate. Does nothing unless feature `spdk` is on; then it
//! links SPDK into the crate's own test executables only, so `cargo test --features spdk
//! --lib` runs the SPDK side's unit tests (parameter parsing, JSON) against the SPDK the
//! module is built for. The module itself (`libspdk_bdev_pcache.so`, with its load-time
//! constructor) is the spdk-module crate's product; the `pcache` binary and the rlib
//! never link SPDK.
//!
//! The arguments are spdk-sys's (`DEP_SPDK_LINK_ARGS`, the same ones the module's cdylib
//! gets). No build dependencies: the default build stays as cheap as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_SPDK").is_none() {
        return;
    }
    // DEP_SPDK_LINK_ARGS: spdk-sys's list of what links SPDK (see emit_link there).
    println!("cargo:rerun-if-env-changed=DEP_SPDK_LINK_ARGS");
    let args = std::env::var("DEP_SPDK_LINK_ARGS").unwrap_or_default();
    for a in args.split_whitespace() {
        println!("cargo:rustc-link-arg-tests={a}");
    }
}
