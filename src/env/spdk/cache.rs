//! One pcache bdev: attaching it to its base bdev and medium, its bdev function table and
//! base event callback, and tearing it down. (`Shared` and `Node` are in `ctx`.)
//!
//! `Shared` is what every SPDK thread may see: the engine and a few immutable facts,
//! reference counted (each io_channel holds a reference), and registered as the
//! io_device and as `bdev->ctxt`. `Node` is the app-thread side: the `spdk_bdev` struct
//! SPDK holds a pointer to (so the node is boxed and never moves), the base descriptor
//! and claim, and the background (writeback/GC) state.
//!
//! Invariants: a `Node` is created, used and freed only on the app thread; it outlives
//! the registration of its bdev and io_device and is freed in the io_device unregister
//! callback, after `spdk_bdev_destruct_done`. The base descriptor is opened and closed on
//! the app thread, the claim is taken before the medium is touched, and every failure of
//! `attach` undoes the earlier steps in reverse order, removing a medium file it created.

use super::ctx::{identity, AttachError, Background, Desc, Node, Shared, CTX_SIZE, MAX_IO};
use super::ffi::{self, cstring, errlog, noticelog, warnlog};
use super::params::CreateParams;
use super::writeback;
use super::{channel, io, json, registry};
use crate::engine::{BackingIdentity, Config, Engine};
use crate::env::medium::{Persistence, PosixPmem};
use crate::runtime::attach::{self, Dialect, Intent};
use crate::runtime::options::Settings;
use spdk_sys as sys;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::*};
use std::sync::Arc;

/// Largest UNMAP / WRITE_ZEROES: one engine region, so one key each.
const MAX_ZERO: u32 = 4 << 20;

/// A per-format id: the clock and the TSC, mixed (`runtime::attach::format_id`).
fn random_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    attach::format_id(t.as_nanos() as u64 ^ ffi::ticks().rotate_left(32))
}

/// Formats or attaches the engine on `pmem` for the base described by `id`, following
/// the attach/format rules (`runtime::attach`) with `bdev_pcache_create`'s `format`:
/// true formats whatever is there, false attaches (formatting a blank medium).
fn open_engine(
    p: &CreateParams,
    pmem: PosixPmem,
    id: BackingIdentity,
) -> Result<Engine<PosixPmem>, AttachError> {
    let req = attach::Request {
        intent: if p.format {
            Intent::Format { force: true }
        } else {
            Intent::Attach {
                format_blank: true,
                force_backing: false,
            }
        },
        data_crc: p.data_crc,
        seg_size: 0,
        settings: Settings {
            gc_percent: p.gc_percent,
            policy: p.policy,
        },
        format_id: random_id(),
        config: Config {
            wall_clock_ms: crate::env::unix_ms,
            ..Config::default()
        },
    };
    attach::open(pmem, &id, &req).map_err(|r| {
        let code = if r.is_wrong_backing() {
            -libc::EXDEV
        } else {
            -libc::EINVAL
        };
        let path = p.pmem_path.display().to_string();
        let msg = r.message(Dialect::Rpc {
            pmem: &path,
            volatile: p.persistence == Persistence::Volatile,
        });
        (code, msg)
    })
}

/// Creates the pcache bdev of `p` on its (existing) base bdev. App thread only.
pub(super) fn attach(p: &CreateParams, pmem: PosixPmem) -> Result<*mut Node, AttachError> {
    let base_c = cstring(&p.base_bdev_name);
    let mut desc: *mut sys::spdk_bdev_desc = std::ptr::null_mut();
    // SAFETY: app thread (RPC handler or examine callback); `desc` receives the result.
    let rc = unsafe {
        sys::spdk_bdev_open_ext(
            base_c.as_ptr(),
            true,
            Some(base_event_cb),
            std::ptr::null_mut(),
            &mut desc,
        )
    };
    if rc == -libc::EPERM {
        // Another module holds a write claim on it.
        return Err((
            -libc::EBUSY,
            format!(
                "base bdev '{}' is already claimed by another module",
                p.base_bdev_name
            ),
        ));
    }
    if rc != 0 {
        return Err((
            rc,
            format!(
                "cannot open base bdev '{}': {}",
                p.base_bdev_name,
                std::io::Error::from_raw_os_error(-rc)
            ),
        ));
    }
    // SAFETY: `desc` was just opened successfully.
    let base = unsafe { sys::spdk_bdev_desc_get_bdev(desc) };
    let close = |desc| {
        // SAFETY: closing the descriptor we opened above, on the same (app) thread.
        unsafe { sys::spdk_bdev_close(desc) }
    };
    // SAFETY: `base` is open through `desc`; our module struct is registered and static.
    let rc = unsafe { sys::spdk_bdev_module_claim_bdev(base, desc, registry::ptr()) };
    if rc != 0 {
        close(desc);
        return Err((
            -libc::EBUSY,
            format!(
                "base bdev '{}' is already claimed by another module",
                p.base_bdev_name
            ),
        ));
    }
    let release = |desc| {
        // SAFETY: we hold the claim taken above; released before closing, app thread.
        unsafe { sys::spdk_bdev_module_release_bdev(base) };
        close(desc);
    };
    // SAFETY: getters on an open bdev.
    let (md, blocklen, phys, align, base_uuid) = unsafe {
        (
            sys::spdk_bdev_get_md_size(base),
            sys::spdk_bdev_get_block_size(base),
            sys::spdk_bdev_get_physical_block_size(base),
            (*base).required_alignment,
            *sys::spdk_bdev_get_uuid(base),
        )
    };
    if md != 0 {
        release(desc);
        return Err((
            -libc::ENOTSUP,
            format!(
                "base bdev '{}' has {md} bytes of metadata per block: not supported",
                p.base_bdev_name
            ),
        ));
    }
    let id = identity(base);
    let num_blocks = id.size / blocklen as u64;
    let engine = match open_engine(p, pmem, id) {
        Ok(e) => e,
        Err(e) => {
            release(desc);
            return Err(e);
        }
    };
    let shared = Arc::new(Shared {
        engine,
        name: p.name.clone(),
        base_desc: Desc(desc),
        base_bdev: base,
        block_size: blocklen,
        removed: AtomicBool::new(false),
        node: AtomicPtr::new(std::ptr::null_mut()),
        direct: Default::default(),
        fg_reads: Default::default(),
    });
    let name_c = cstring(&p.name);
    let node = Box::into_raw(Box::new(Node {
        bdev: sys::spdk_bdev::default(),
        name_c,
        shared: Arc::clone(&shared),
        base_desc: desc,
        base_bdev: base,
        base_name: p.base_bdev_name.clone(),
        bg: Background::new(),
    }));
    shared.node.store(node, Release);
    // SAFETY: `node` is the live box created above, used only on this (app) thread.
    let n = unsafe { &mut *node };
    let b = &mut n.bdev;
    b.name = n.name_c.as_ptr() as *mut _;
    b.product_name = c"pcache".as_ptr() as *mut _;
    // Writes are durable in pmem, but their keys may be buffered until FLUSH/FUA.
    b.write_cache = 1;
    b.blocklen = blocklen;
    b.phys_blocklen = phys;
    b.blockcnt = num_blocks;
    b.required_alignment = align;
    b.max_rw_size = MAX_IO / blocklen;
    b.max_unmap = MAX_ZERO / blocklen;
    b.max_unmap_segments = 1;
    b.max_write_zeroes = MAX_ZERO / blocklen;
    b.ctxt = shared.as_io_device();
    b.fn_table = &FN_TABLE;
    b.module = registry::ptr();
    let mut ns = base_uuid;
    // SAFETY: writes a UUID derived from the base's UUID and our name (stable across
    // restarts, so NVMe-oF hosts see the same namespace) into the bdev struct.
    unsafe {
        sys::spdk_uuid_generate_sha1(
            &mut b.uuid,
            &mut ns,
            n.name_c.as_ptr(),
            n.name_c.as_bytes().len(),
        );
    }
    // SAFETY: the io_device pointer is the Arc'd Shared, alive until the unregister
    // callback (the node holds a reference); callbacks match the context size given.
    unsafe {
        sys::spdk_io_device_register(
            shared.as_io_device(),
            Some(channel::create_cb),
            Some(channel::destroy_cb),
            CTX_SIZE,
            n.name_c.as_ptr(),
        );
    }
    if let Err(e) = writeback::start(node) {
        teardown(node, false);
        return Err(e);
    }
    // SAFETY: the bdev struct is fully initialised and lives in the boxed node until
    // destruct_done; app thread.
    let rc = unsafe { sys::spdk_bdev_register(&mut n.bdev) };
    if rc != 0 {
        teardown(node, false);
        return Err((
            rc,
            format!(
                "spdk_bdev_register({}) failed: {}",
                p.name,
                std::io::Error::from_raw_os_error(-rc)
            ),
        ));
    }
    noticelog!(
        "{} created on base bdev {} ({} blocks of {blocklen} bytes), medium {}",
        p.name,
        p.base_bdev_name,
        num_blocks,
        shared.engine.pmem().describe()
    );
    Ok(node)
}

/// Releases everything `attach` set up, after the background stopped. With `registered`
/// the bdev layer is waiting for `spdk_bdev_destruct_done`.
pub(super) fn teardown(node: *mut Node, registered: bool) {
    // SAFETY: app thread; the node is live until the io_device unregister callback below.
    let n = unsafe { &mut *node };
    n.bg.stop_now();
    if let Err(e) = n.shared.engine.shutdown() {
        errlog!("{}: closing the kset buffers failed: {e}", n.shared.name);
    }
    // SAFETY: we took the claim and opened the descriptor on this thread in `attach`.
    unsafe {
        sys::spdk_bdev_module_release_bdev(n.base_bdev);
        sys::spdk_bdev_close(n.base_desc);
    }
    let gone: sys::spdk_io_device_unregister_cb = if registered {
        Some(device_gone_registered)
    } else {
        Some(device_gone_unregistered)
    };
    // SAFETY: registered in `attach`; unregistered once. The callback runs after every
    // channel was destroyed.
    unsafe { sys::spdk_io_device_unregister(n.shared.as_io_device(), gone) };
}

fn node_of(io_device: *mut c_void) -> *mut Node {
    // SAFETY: the io_device pointer is a Shared kept alive by its node until the node is
    // freed, which happens only in the callbacks below.
    unsafe { (*(io_device as *const Shared)).node.load(Acquire) }
}

extern "C" fn device_gone_registered(io_device: *mut c_void) {
    let node = node_of(io_device);
    // SAFETY: the bdev layer waits for destruct_done of this bdev (destruct returned 1);
    // the node (holding the bdev struct) is freed only after it, exactly once.
    unsafe {
        sys::spdk_bdev_destruct_done(&mut (*node).bdev, 0);
        drop(Box::from_raw(node));
    }
}

extern "C" fn device_gone_unregistered(io_device: *mut c_void) {
    let node = node_of(io_device);
    // SAFETY: the bdev was never registered, so nothing else refers to the node.
    unsafe { drop(Box::from_raw(node)) };
}

// The bdev function table. `ctx` (the bdev's `ctxt`) is the cache's `Shared`, valid until the io_device
// unregister callback. `destruct`, `dump_info_json`, `write_config_json` and the base
// event callback run on the app thread and may reach the `Node`; `submit_request`,
// `io_type_supported` and `get_io_channel` may run on any thread and only use `Shared`
// and the channel.
//
// Hot removal of the base: the cache is marked removed (queued and new I/O fail, the
// writeback stops) and the pcache bdev is unregistered, so its users see it go away;
// the dirty data stays in the medium, which `bdev_pcache_create` attaches again later.

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
    if let Some(e) = registry::forget(node) {
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
    writeback::stop(node, Box::new(move || teardown(node, true)));
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
    if let Some(v) = registry::stats_of(&name) {
        // SAFETY: SPDK passes a live writer positioned inside driver_specific.
        unsafe { json::write_named(w, "pcache", &v) };
    }
    0
}

extern "C" fn write_config_json(bdev: *mut sys::spdk_bdev, w: *mut sys::spdk_json_write_ctx) {
    // SAFETY: `bdev` is our registered bdev; its ctxt is our Shared.
    let name = shared(unsafe { (*bdev).ctxt }).name.clone();
    let cfg = registry::with(|r| {
        r.iter()
            .find(|e| e.params.name == name)
            .map(|e| e.params.to_config())
    });
    if let Some(mut v) = cfg {
        if let Some(n) = registry::active(&name) {
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
    let node = registry::with(|r| {
        r.iter().find_map(|e| match e.state {
            // SAFETY: app thread; active nodes are alive while in the registry.
            registry::State::Active(n) if unsafe { (*n.0).base_bdev } == bdev => Some(n.0),
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
