//! The SPDK bdev module (feature `spdk`): pcache as a virtual bdev inside a stock
//! `spdk_tgt` or `bdevperf`, loaded with `LD_PRELOAD` from `libspdk_bdev_pcache.so`, the
//! cdylib the workspace member spdk-module/ (crate `spdk_bdev_pcache`) builds from it.
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
//! object spdk-module/c/load.c, linked into the module's cdylib only), so the bdev layer
//! finds the module when it initialises, and only into an app running the SPDK it was
//! built against (one copy of libspdk_bdev, the same version); the constructor only links static
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
/// by the constructor in spdk-module/c/load.c, which only the module's cdylib links: a
/// `.init_array` entry here would be kept in every executable linking this crate and drag
/// SPDK in. Prepares one line with pcache's version and both SPDKs (logged at module
/// init) and registers the module and its RPC methods, unless the app runs another SPDK
/// than the module was built against: then it registers nothing and logs why (a later
/// "Method 'bdev_pcache_create' was not found" has that line as its explanation).
#[no_mangle]
pub extern "C" fn spdk_sys_module_load() {
    let built = format!("SPDK v{SPDK_VERSION} ({})", spdk_sys::SPDK_SYS_LIB_DIR);
    match host_spdk() {
        Ok(host) => {
            let _ = LOADED.set(format!(
                "pcache {} SPDK module (bdev_pcache): built against {built}; the app runs {host}",
                env!("CARGO_PKG_VERSION")
            ));
            module::register();
            rpc::register();
        }
        Err(why) => ffi::errlog!(
            "pcache {} SPDK module (bdev_pcache) built against {built} NOT registered (no bdev \
             module, no bdev_pcache_* RPC methods): {why}. Rebuild it against the app's SPDK \
             (SPDK_DIR=<that SPDK> scripts/install-spdk-module.sh <prefix>), or run the app \
             of the SPDK it was built against.",
            env!("CARGO_PKG_VERSION")
        ),
    }
}

/// The load-time line, logged when the bdev layer initialises the module: before the app
/// sets SPDK's log levels (in `main`), only errors reach the terminal.
static LOADED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Logs the line `spdk_sys_module_load` prepared (from the module's `module_init`).
fn log_loaded() {
    if let Some(line) = LOADED.get() {
        ffi::noticelog!("{line}");
    }
}

/// The app's SPDK as "SPDK v<version> (<library>)", or why the module must not register
/// into it: its version differs from `SPDK_VERSION`, it cannot be read, or two copies of
/// libspdk_bdev are loaded (the module's own and the app's: the module would register
/// into a bdev layer the app never initialises).
fn host_spdk() -> Result<String, String> {
    let mut version = [0 as std::ffi::c_char; 256];
    let mut path = [0 as std::ffi::c_char; 4096];
    // SAFETY: both buffers are valid for writes of their full lengths, which are passed;
    // the C side writes NUL-terminated strings within them and keeps no pointer.
    let rc = unsafe {
        spdk_sys::spdk_sys_host_version(
            version.as_mut_ptr(),
            version.len(),
            path.as_mut_ptr(),
            path.len(),
        )
    };
    // SAFETY: every buffer passed is NUL-terminated by the C side (also on failure) and
    // alive here.
    let text = |b: &[std::ffi::c_char]| {
        unsafe { std::ffi::CStr::from_ptr(b.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    let (version, path) = (text(&version), text(&path));
    let mut libs = [0 as std::ffi::c_char; 8192];
    // SAFETY: as above: a buffer valid for its full length, NUL-terminated by the callee.
    let copies = unsafe { spdk_sys::spdk_sys_host_bdev_libs(libs.as_mut_ptr(), libs.len()) };
    let libs = text(&libs);
    if copies > 1 {
        return Err(format!(
            "{copies} copies of libspdk_bdev are loaded ({}): the app's SPDK is not the one \
             the module links, so the module would register into a bdev layer the app never uses",
            libs.replace('\n', ", ")
        ));
    }
    let found = match rc {
        0 => version
            .strip_prefix("SPDK v")
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_string),
        _ => None,
    };
    let Some(app) = found else {
        return Err(format!(
            "cannot read the app's SPDK version (no SPDK version string in {}, the object \
             providing spdk_rpc_register_method)",
            if path.is_empty() {
                "any loaded object"
            } else {
                &path
            }
        ));
    };
    if app != SPDK_VERSION {
        return Err(format!(
            "the app runs SPDK v{app} ({path}), the module was built against SPDK \
             v{SPDK_VERSION}; SPDK has no stable ABI across versions"
        ));
    }
    Ok(format!("{version} ({path})"))
}
