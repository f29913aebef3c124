//! Module registration and the registry of configured caches.
//!
//! The `spdk_bdev_module` struct is allocated once, from the load-time constructor, and
//! never moves or goes away (SPDK links it into its module list). `examine_config` turns
//! caches waiting for their base bdev into bdevs when the base appears (SPDK's
//! `save_config` writes module configs before their base bdevs, so load_config relies on
//! it); `config_json` saves the caches that are still waiting, while registered ones
//! save themselves through `write_config_json`.
//!
//! Invariants: the registry is touched only on the app thread; its lock is never held
//! across a call into SPDK (which may call back into the module, e.g. examine of the
//! bdev just registered), so entries are taken out, worked on and put back.

use super::cache::{self, Node};
use super::ffi::{errlog, noticelog};
use super::io::IoCtx;
use super::params::CreateParams;
use super::{ffi, json};
use crate::env::posix::pmem::PosixPmem;
use spdk_sys as sys;
use std::sync::atomic::{AtomicPtr, Ordering::*};
use std::sync::Mutex;

static MODULE: AtomicPtr<sys::spdk_bdev_module> = AtomicPtr::new(std::ptr::null_mut());

/// Our module struct (registered at load time).
pub(super) fn ptr() -> *mut sys::spdk_bdev_module {
    MODULE.load(Acquire)
}

/// Adds the module to SPDK's list; called once from the load-time constructor, before
/// `main`, so before the bdev layer initialises its modules.
pub(super) fn register() {
    let m = Box::new(sys::spdk_bdev_module {
        name: c"pcache".as_ptr(),
        module_init: Some(module_init),
        module_fini: Some(module_fini),
        config_json: Some(config_json),
        get_ctx_size: Some(get_ctx_size),
        examine_config: Some(examine_config),
        ..Default::default()
    });
    let p = Box::into_raw(m);
    MODULE.store(p, Release);
    // SAFETY: `p` is a leaked, zero-initialised module struct that never moves or dies;
    // spdk_bdev_module_list_add only links it into a static list.
    unsafe { sys::spdk_bdev_module_list_add(p) };
}

/// Where a configured cache is.
pub(super) enum State {
    /// The base bdev does not exist yet; the medium is already open and locked.
    Waiting {
        pmem: PosixPmem,
        /// We created the medium file (removed again if the cache is deleted).
        created: bool,
    },
    /// Attaching failed when the base appeared; delete removes the entry.
    Failed(String),
    /// A registered bdev.
    Active(NodePtr),
}

/// A node pointer that may sit in the registry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct NodePtr(pub *mut Node);
// SAFETY: only dereferenced on the app thread; Send just lets the app-thread-only
// registry live in a static Mutex.
unsafe impl Send for NodePtr {}

pub(super) struct Entry {
    pub params: CreateParams,
    pub state: State,
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Runs `f` on the registry. `f` must not call into SPDK.
pub(super) fn with<R>(f: impl FnOnce(&mut Vec<Entry>) -> R) -> R {
    let mut g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

/// Removes and returns the entry named `name`.
pub(super) fn take(name: &str) -> Option<Entry> {
    with(|r| {
        let i = r.iter().position(|e| e.params.name == name)?;
        Some(r.remove(i))
    })
}

/// The node of an active cache.
pub(super) fn active(name: &str) -> Option<*mut Node> {
    with(|r| {
        r.iter().find_map(|e| match e.state {
            State::Active(n) if e.params.name == name => Some(n.0),
            _ => None,
        })
    })
}

/// Forgets the entry of `node` (its bdev is going away).
pub(super) fn forget(node: *mut Node) -> Option<Entry> {
    with(|r| {
        let i = r
            .iter()
            .position(|e| matches!(e.state, State::Active(n) if n.0 == node))?;
        Some(r.remove(i))
    })
}

/// Removes a medium file the module created (on failure or delete of a cache that never
/// came up), so a refused or abandoned create leaves nothing behind.
pub(super) fn remove_created(params: &CreateParams) {
    if let Err(e) = std::fs::remove_file(&params.pmem_path) {
        errlog!("cannot remove {}: {e}", params.pmem_path.display());
    }
}

extern "C" fn module_init() -> i32 {
    super::log_loaded();
    0
}

extern "C" fn module_fini() {
    // Registered caches are gone by now (the bdev layer unregisters every bdev first);
    // waiting ones just release their medium.
    let left = with(std::mem::take);
    for e in left {
        if let State::Waiting { .. } = e.state {
            noticelog!(
                "{}: still waiting for base bdev {} at shutdown",
                e.params.name,
                e.params.base_bdev_name
            );
        }
    }
}

extern "C" fn get_ctx_size() -> i32 {
    std::mem::size_of::<IoCtx>() as i32
}

extern "C" fn config_json(w: *mut sys::spdk_json_write_ctx) -> i32 {
    let waiting: Vec<serde_json::Value> = with(|r| {
        r.iter()
            .filter(|e| !matches!(e.state, State::Active(_)))
            .map(|e| e.params.to_config())
            .collect()
    });
    for v in &waiting {
        // SAFETY: SPDK passes a live writer positioned in the subsystem's config array.
        unsafe { json::write(w, v) };
    }
    0
}

/// A new bdev appeared: attach every cache waiting for it.
extern "C" fn examine_config(bdev: *mut sys::spdk_bdev) {
    // SAFETY: SPDK passes a registered bdev for the duration of the call.
    let name = ffi::from_c(unsafe { sys::spdk_bdev_get_name(bdev) });
    let ready: Vec<Entry> = with(|r| {
        let mut out = Vec::new();
        let mut i = 0;
        while i < r.len() {
            if matches!(r[i].state, State::Waiting { .. }) && r[i].params.base_bdev_name == name {
                out.push(r.remove(i));
            } else {
                i += 1;
            }
        }
        out
    });
    for e in ready {
        let State::Waiting { pmem, created } = e.state else {
            continue;
        };
        let state = match cache::attach(&e.params, pmem) {
            Ok(node) => State::Active(NodePtr(node)),
            Err((_, msg)) => {
                errlog!("{}: base bdev {name} appeared, but: {msg}", e.params.name);
                if created {
                    remove_created(&e.params);
                }
                State::Failed(msg)
            }
        };
        with(|r| {
            r.push(Entry {
                params: e.params,
                state,
            })
        });
    }
    // SAFETY: our static module struct; examine_config must always report completion.
    unsafe { sys::spdk_bdev_module_examine_done(ptr()) };
}
