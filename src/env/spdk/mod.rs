//! The SPDK bdev module (feature `spdk`): pcache as a virtual bdev inside a stock
//! `spdk_tgt` or `bdevperf`, loaded with `LD_PRELOAD` from the cdylib this crate builds.
//!
//! Layout, in layers (each file imports only files of lower layers; tidy checks that no
//! import cycle forms): `ffi` (small wrappers), `json` (SPDK JSON <-> serde_json),
//! `params` (JSON-RPC parameters), `wbmap` (direct pmem access for writeback); `ctx` (the
//! state they share: a cache's `Shared` and `Node`, a channel's and a request's context,
//! completion); the I/O paths `direct` and `io`, the per-thread `channel`, the background
//! `writeback` (tick, writeback and GC pollers); `registry` (configured caches, the
//! module struct, statistics); on top `cache` (attach, the bdev function table,
//! teardown), `module` (registration, examine, config) and `rpc` (JSON-RPC methods). All
//! of the crate's SPDK-facing `unsafe` code lives here.
//!
//! Invariants: registration happens in a load-time constructor, before `main` (the C
//! object spdk-sys/c/load.c, linked into the cdylib only), so the
//! bdev layer finds the module when it initialises; the constructor only links static
//! structs into SPDK's lists (no allocation-heavy work, no thread APIs). Control-path
//! state lives on the app thread; the I/O path touches only its channel's context and the
//! engine, and never makes a syscall or takes a sleeping lock of ours. A panic aborts the
//! process (Rust aborts on unwinding out of an `extern "C"` function), like a C assert.

mod cache;
mod channel;
mod ctx;
mod direct;
mod ffi;
mod io;
mod json;
mod module;
mod params;
mod registry;
mod rpc;
mod wbmap;
mod writeback;

/// The SPDK version the module was built against.
pub const SPDK_VERSION: &str = spdk_sys::SPDK_SYS_VERSION;

/// Runs when the shared object is loaded (LD_PRELOAD: before the host's `main`), called
/// by the constructor in spdk-sys/c/load.c, which only the cdylib links: a `.init_array`
/// entry here would be kept in every executable linking this crate and drag SPDK in.
#[no_mangle]
pub extern "C" fn spdk_sys_module_load() {
    module::register();
    rpc::register();
}
