//! Module registration and the module's callbacks (the registry itself is `registry`).
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

use super::cache;
use super::ctx::IoCtx;
use super::ffi::{errlog, noticelog};
use super::registry::{ptr, remove_created, with, Entry, NodePtr, State, MODULE};
use super::{ffi, json};
use spdk_sys as sys;
use std::sync::atomic::Ordering::*;

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

extern "C" fn module_init() -> i32 {
    super::log_loaded();
    // Every engine call here runs on an SPDK thread, one pinned reactor per core: an
    // engine lock spins rather than park a reactor in the kernel.
    crate::engine::sync::never_park();
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
