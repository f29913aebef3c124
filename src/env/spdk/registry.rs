//! The registry of configured caches and the module struct's address: what the bdev
//! layer (`cache`), the module callbacks (`module`) and the RPC methods (`rpc`) share,
//! below all three. Also each entry's statistics object (get_stats, bdev_get_bdevs).
//!
//! Invariants: the registry is touched only on the app thread; its lock is never held
//! across a call into SPDK (which may call back into the module, e.g. examine of the
//! bdev just registered), so entries are taken out, worked on and put back. `MODULE` is
//! set once, at load, before anything reads it.

use super::ctx::Node;
use super::ffi::errlog;
use super::params::CreateParams;
use crate::engine::Pmem;
use crate::env::medium::PosixPmem;
use serde_json::{json, Value};
use spdk_sys as sys;
use std::sync::atomic::{AtomicPtr, Ordering::*};
use std::sync::Mutex;

pub(super) static MODULE: AtomicPtr<sys::spdk_bdev_module> = AtomicPtr::new(std::ptr::null_mut());

/// Our module struct (registered at load time).
pub(super) fn ptr() -> *mut sys::spdk_bdev_module {
    MODULE.load(Acquire)
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

/// Statistics of one configured cache.
pub(super) fn entry_stats(e: &Entry) -> Value {
    let p = &e.params;
    let mut v = json!({
        "name": p.name,
        "base_bdev_name": p.base_bdev_name,
        "pmem_path": p.pmem_path.to_string_lossy(),
        "persistence": p.persistence.to_string(),
    });
    match &e.state {
        State::Waiting { pmem, .. } => {
            v["state"] = "waiting".into();
            v["pmem_size"] = pmem.size().into();
        }
        State::Failed(m) => {
            v["state"] = "failed".into();
            v["error"] = m.clone().into();
        }
        State::Active(n) => {
            // SAFETY: app thread; active nodes are alive while in the registry.
            let nd: &Node = unsafe { &*n.0 };
            let s = &nd.shared;
            let e = &s.engine;
            let st = e.stats();
            let last_wb = st.last_writeback_error.clone();
            if let Ok(Value::Object(m)) = serde_json::to_value(st) {
                for (k, x) in m {
                    v[k] = x;
                }
            }
            let pm = e.pmem();
            v["state"] = "active".into();
            // The RPC's parameter names, beside the engine's own `mode`.
            v["cache_mode"] = v["mode"].clone();
            v["direct"] = s.direct.json();
            v["persistence"] = pm.mode().to_string().into();
            v["pmem_size"] = pm.size().into();
            v["flush_method"] = pm.flush_method().into();
            v["block_size"] = s.block_size.into();
            // Kept under its old name: the same gauge as waiting_requests.
            v["queued_requests"] = v["waiting_requests"].clone();
            v["base_removed"] = s.removed.load(Relaxed).into();
            let bg = &nd.bg;
            v["writeback"] = json!({
                "state": bg.state(),
                "direct_from_pmem": bg.direct(),
                "backoff_ms": bg.backoff_ms(),
                "batches": bg.batches,
                // What a base FLUSH takes (moving average) and, from it, the period of
                // the FLUSH for direct writes and unsynced keys (`sched::FlushPacer`).
                "base_flush_us": bg.direct_flush.cost_us(),
                "direct_flush_period_us": bg.direct_flush.period_us(),
                "last_error": last_wb,
            });
            v["flush"] = json!({
                "active": bg.drain.active,
                "total_bytes": bg.drain.total_bytes,
                "remaining_bytes": e.dirty_bytes(),
                "completed": bg.drain.completed,
            });
        }
    }
    v
}

/// The statistics object of `name` (also `driver_specific.pcache` in bdev_get_bdevs).
pub(super) fn stats_of(name: &str) -> Option<Value> {
    with(|r| r.iter().find(|e| e.params.name == name).map(entry_stats))
}
