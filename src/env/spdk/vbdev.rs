//! The bdev function table of a pcache bdev, and the base bdev's event callback.
//!
//! `ctx` (the bdev's `ctxt`) is the cache's `Shared`, valid until the io_device
//! unregister callback. `destruct`, `dump_info_json`, `write_config_json` and the base
//! event callback run on the app thread and may reach the `Node`; `submit_request`,
//! `io_type_supported` and `get_io_channel` may run on any thread and only use `Shared`
//! and the channel.
//!
//! Hot removal of the base: the cache is marked removed (queued and new I/O fail, the
//! writeback stops) and the pcache bdev is unregistered, so its users see it go away;
//! the dirty data stays in the medium, which `bdev_pcache_create` attaches again later.

use super::cache::{self, Shared};
use super::ffi::{errlog, warnlog};
use super::{io, json, module, rpc};
use spdk_sys as sys;
use std::ffi::c_void;
use std::sync::atomic::Ordering::*;

pub(super) static FN_TABLE: sys::spdk_bdev_fn_table = sys::spdk_bdev_fn_table {
    destruct: Some(destruct),
    submit_request: Some(io::submit_request),
    io_type_supported: Some(io_type_supported),
    get_io_channel: Some(get_io_channel),
    dump_info_json: Some(dump_info_json),
    write_config_json: Some(write_config_json),
    get_spin_time: None,
    get_module_ctx: None,
    get_memory_domains: None,
    reset_device_stat: None,
    dump_device_stat_json: None,
    accel_sequence_supported: None,
    get_memory_domain_types: None,
};

fn shared<'a>(ctx: *mut c_void) -> &'a Shared {
    // SAFETY: `ctx` is the bdev's ctxt, the Shared of a cache whose node (holding an Arc)
    // lives until the io_device unregister callback, after the bdev layer's last call.
    unsafe { &*(ctx as *const Shared) }
}

extern "C" fn destruct(ctx: *mut c_void) -> i32 {
    let s = shared(ctx);
    let node = s.node.load(Acquire);
    if let Some(e) = module::forget(node) {
        if s.removed.load(Relaxed) {
            warnlog!(
                "{}: base bdev {} was removed; dirty data stays in {} until the cache is \
                 created again",
                e.params.name,
                e.params.base_bdev_name,
                e.params.pmem_path.display()
            );
        }
    }
    super::writeback::stop(node, Box::new(move || cache::teardown(node, true)));
    // Completed by spdk_bdev_destruct_done from the io_device unregister callback.
    1
}

/// Every type the engine implements; fixed at registration (SPDK samples it once).
extern "C" fn io_type_supported(_ctx: *mut c_void, ty: sys::spdk_bdev_io_type) -> bool {
    matches!(
        ty,
        sys::SPDK_BDEV_IO_TYPE_READ
            | sys::SPDK_BDEV_IO_TYPE_WRITE
            | sys::SPDK_BDEV_IO_TYPE_FLUSH
            | sys::SPDK_BDEV_IO_TYPE_UNMAP
            | sys::SPDK_BDEV_IO_TYPE_WRITE_ZEROES
            | sys::SPDK_BDEV_IO_TYPE_RESET
    )
}

extern "C" fn get_io_channel(ctx: *mut c_void) -> *mut sys::spdk_io_channel {
    // SAFETY: `ctx` is our registered io_device (see `shared`).
    unsafe { sys::spdk_get_io_channel(ctx) }
}

extern "C" fn dump_info_json(ctx: *mut c_void, w: *mut sys::spdk_json_write_ctx) -> i32 {
    let name = shared(ctx).name.clone();
    if let Some(v) = rpc::stats_of(&name) {
        // SAFETY: SPDK passes a live writer positioned inside driver_specific.
        unsafe { json::write_named(w, "pcache", &v) };
    }
    0
}

extern "C" fn write_config_json(bdev: *mut sys::spdk_bdev, w: *mut sys::spdk_json_write_ctx) {
    // SAFETY: `bdev` is our registered bdev; its ctxt is our Shared.
    let name = shared(unsafe { (*bdev).ctxt }).name.clone();
    let cfg = module::with(|r| {
        r.iter()
            .find(|e| e.params.name == name)
            .map(|e| e.params.to_config())
    });
    if let Some(mut v) = cfg {
        if let Some(n) = module::active(&name) {
            // SAFETY: app thread (save_config); the node is alive while it is registered.
            let g = unsafe { &*n }.shared.engine.gc_percent();
            v["params"]["gc_percent"] = g.into();
        }
        // SAFETY: SPDK passes a live writer positioned in the bdev config array.
        unsafe { json::write(w, &v) };
    }
}

/// Events of a base bdev we opened (app thread).
pub(super) extern "C" fn base_event_cb(
    ty: sys::spdk_bdev_event_type,
    bdev: *mut sys::spdk_bdev,
    _ctx: *mut c_void,
) {
    let node = module::with(|r| {
        r.iter().find_map(|e| match e.state {
            // SAFETY: app thread; active nodes are alive while in the registry.
            module::State::Active(n) if unsafe { (*n.0).base_bdev } == bdev => Some(n.0),
            _ => None,
        })
    });
    let Some(node) = node else { return };
    // SAFETY: app thread; the node is alive (found in the registry above).
    let n = unsafe { &mut *node };
    match ty {
        sys::SPDK_BDEV_EVENT_REMOVE => {
            errlog!(
                "{}: base bdev {} is being removed: unregistering the cache",
                n.shared.name,
                n.base_name
            );
            n.shared.removed.store(true, Release);
            // SAFETY: our registered bdev; app thread. Completion is not awaited.
            unsafe { sys::spdk_bdev_unregister(&mut n.bdev, None, std::ptr::null_mut()) };
        }
        sys::SPDK_BDEV_EVENT_RESIZE => {
            warnlog!(
                "{}: base bdev {} was resized; the cache keeps the size it was created with",
                n.shared.name,
                n.base_name
            );
        }
        _ => {}
    }
}
