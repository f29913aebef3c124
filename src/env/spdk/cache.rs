//! One pcache bdev: attaching it to its base bdev and medium, and tearing it down.
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

use super::ffi::{self, cstring, errlog, noticelog};
use super::params::CreateParams;
use super::{channel, module, vbdev, writeback::Background};
use crate::engine::{BackingIdentity, Config, Engine};
use crate::env::medium::{Persistence, PosixPmem};
use crate::runtime::attach::{self, Dialect, Intent};
use crate::runtime::options::Settings;
use spdk_sys as sys;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::*};
use std::sync::Arc;

/// Largest READ/WRITE handed to the module (the bdev layer splits bigger ones), which
/// bounds every bounce buffer.
pub(super) const MAX_IO: u32 = 1 << 20;
/// Largest UNMAP / WRITE_ZEROES: one engine region, so one key each.
const MAX_ZERO: u32 = 4 << 20;
/// Kset buffers (as in the embedded runtime).
const N_KSETS: u32 = 8;

/// A base descriptor, usable from any thread for getting channels.
#[derive(Clone, Copy)]
pub(super) struct Desc(pub *mut sys::spdk_bdev_desc);
// SAFETY: SPDK descriptors may be used from any thread to get I/O channels and submit
// I/O on them; only open/close are tied to the opening (app) thread, which we respect.
unsafe impl Send for Desc {}
// SAFETY: as for Send: the shared uses (get channel, submit) are thread-safe in SPDK.
unsafe impl Sync for Desc {}

/// The part of a cache every thread may use.
pub(super) struct Shared {
    pub engine: Engine<PosixPmem>,
    pub name: String,
    pub base_desc: Desc,
    pub base_bdev: *mut sys::spdk_bdev,
    pub block_size: u32,
    /// The base bdev is gone: queued and new I/O fail.
    pub removed: AtomicBool,
    /// The app-thread node; only dereferenced on the app thread.
    pub node: AtomicPtr<Node>,
    /// Counters of the requests the cache policy sent to the base bdev.
    pub direct: super::direct::DirectStats,
}

// SAFETY: `base_bdev` is only passed back to SPDK calls that are thread-safe
// (spdk_bdev_queue_io_wait from the submitting thread); everything else is Sync.
unsafe impl Send for Shared {}
// SAFETY: see Send; the engine is Sync and the rest are atomics or immutable.
unsafe impl Sync for Shared {}

impl Shared {
    pub(super) fn as_io_device(self: &Arc<Self>) -> *mut c_void {
        Arc::as_ptr(self) as *mut c_void
    }
}

/// The app-thread side of a cache.
pub(super) struct Node {
    pub bdev: sys::spdk_bdev,
    pub name_c: CString,
    pub shared: Arc<Shared>,
    pub base_desc: *mut sys::spdk_bdev_desc,
    pub base_bdev: *mut sys::spdk_bdev,
    pub base_name: String,
    pub bg: Background,
}

/// An error for the RPC client: an errno-style code and a message.
pub(super) type AttachError = (i32, String);

fn identity(base: *mut sys::spdk_bdev) -> BackingIdentity {
    // SAFETY: `base` is an open bdev (we hold a descriptor); these getters only read it.
    unsafe {
        let bs = sys::spdk_bdev_get_block_size(base);
        let n = sys::spdk_bdev_get_num_blocks(base);
        let uuid = sys::spdk_bdev_get_uuid(base);
        let id = if !uuid.is_null() && !sys::spdk_uuid_is_null(uuid) {
            let mut buf = [0 as std::ffi::c_char; 40];
            sys::spdk_uuid_fmt_lower(buf.as_mut_ptr(), buf.len(), uuid);
            ffi::from_c(buf.as_ptr())
        } else {
            ffi::from_c(sys::spdk_bdev_get_name(base))
        };
        BackingIdentity {
            size: n * bs as u64,
            block_size: bs,
            id,
        }
    }
}

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
            n_ksets: N_KSETS,
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
            Some(vbdev::base_event_cb),
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
    let rc = unsafe { sys::spdk_bdev_module_claim_bdev(base, desc, module::ptr()) };
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
    b.fn_table = &vbdev::FN_TABLE;
    b.module = module::ptr();
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
            channel::CTX_SIZE,
            n.name_c.as_ptr(),
        );
    }
    if let Err(e) = super::writeback::start(node) {
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
