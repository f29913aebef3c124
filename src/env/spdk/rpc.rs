//! The JSON-RPC methods: `bdev_pcache_create`, `bdev_pcache_delete`,
//! `bdev_pcache_get_stats`, `bdev_pcache_set_options`, `bdev_pcache_flush`, and the
//! statistics object shared with `dump_info_json`.
//!
//! Invariants: handlers run on the app thread; parameters are fully validated
//! (`params.rs`) before anything changes, and every check that can fail runs before the
//! first change, so an error leaves the target as it was (a medium file we created for
//! the request is removed again). Errors carry a negative errno as the JSON-RPC code
//! (SPDK's convention) or -32602 for malformed parameters.

use super::cache;
use super::ctx::AttachError;
use super::ffi::{cstring, noticelog};
use super::json::{self, Request, INVALID_PARAMS};
use super::params::{self, CreateParams};
use super::registry::{self, Entry, NodePtr, State};
use super::writeback;
use crate::engine::{probe, CacheMode, Probe};
use crate::env::medium::{Persistence, PosixPmem};
use serde_json::Value;
use spdk_sys as sys;
use std::ffi::c_void;

type Handler = extern "C" fn(*mut sys::spdk_jsonrpc_request, *const sys::spdk_json_val);

/// Registers the methods; called from the load-time constructor.
pub(super) fn register() {
    let methods: [(&std::ffi::CStr, Handler); 5] = [
        (c"bdev_pcache_create", rpc_create),
        (c"bdev_pcache_delete", rpc_delete),
        (c"bdev_pcache_get_stats", rpc_get_stats),
        (c"bdev_pcache_set_options", rpc_set_options),
        (c"bdev_pcache_flush", rpc_flush),
    ];
    for (name, h) in methods {
        // SAFETY: static names and handlers; spdk_rpc_register_method only records them.
        unsafe { sys::spdk_rpc_register_method(name.as_ptr(), Some(h), sys::SPDK_RPC_RUNTIME) };
    }
}

/// Decodes the request's parameters with `parse`, answering malformed ones itself.
///
/// # Safety
/// `req` and `p` must be the arguments of the running RPC handler.
unsafe fn decode<T>(
    req: *mut sys::spdk_jsonrpc_request,
    p: *const sys::spdk_json_val,
    parse: impl FnOnce(Option<&Value>) -> Result<T, String>,
) -> Option<(Request, T)> {
    // SAFETY: forwarded contract: the request is answered exactly once through `r`.
    let r = unsafe { Request::new(req) };
    // SAFETY: forwarded contract.
    let v = match unsafe { json::params(p) } {
        Ok(v) => v,
        Err(m) => {
            r.error(INVALID_PARAMS, &m);
            return None;
        }
    };
    match parse(v.as_ref()) {
        Ok(t) => Some((r, t)),
        Err(m) => {
            r.error(INVALID_PARAMS, &m);
            None
        }
    }
}

fn bdev_exists(name: &str) -> bool {
    let c = cstring(name);
    // SAFETY: app thread; lookup by name only.
    !unsafe { sys::spdk_bdev_get_by_name(c.as_ptr()) }.is_null()
}

extern "C" fn rpc_create(req: *mut sys::spdk_jsonrpc_request, p: *const sys::spdk_json_val) {
    // SAFETY: handler arguments.
    let Some((r, params)) = (unsafe { decode(req, p, params::create) }) else {
        return;
    };
    match create(params) {
        Ok(name) => r.reply(&Value::String(name)),
        Err((code, msg)) => r.error(code, &msg),
    }
}

fn create(p: CreateParams) -> Result<String, AttachError> {
    let clash = registry::with(|r| {
        r.iter().find_map(|e| {
            if e.params.name == p.name {
                Some((
                    -libc::EEXIST,
                    format!("a pcache bdev named '{}' already exists", p.name),
                ))
            } else if e.params.base_bdev_name == p.base_bdev_name {
                Some((
                    -libc::EBUSY,
                    format!(
                        "base bdev '{}' is already used by pcache bdev '{}'",
                        p.base_bdev_name, e.params.name
                    ),
                ))
            } else if e.params.pmem_path == p.pmem_path {
                Some((
                    -libc::EBUSY,
                    format!(
                        "pmem_path {} is already used by pcache bdev '{}'",
                        p.pmem_path.display(),
                        e.params.name
                    ),
                ))
            } else {
                None
            }
        })
    });
    if let Some(e) = clash {
        return Err(e);
    }
    if bdev_exists(&p.name) {
        return Err((
            -libc::EEXIST,
            format!("a bdev named '{}' already exists", p.name),
        ));
    }
    let path = p.pmem_path.display().to_string();
    let meta = std::fs::metadata(&p.pmem_path).ok();
    if let (Some(m), Some(mb)) = (&meta, p.pmem_size_mb) {
        if m.is_file() && m.len() != 0 && m.len() != mb << 20 {
            return Err((
                -libc::EINVAL,
                format!(
                    "pmem_path {path} is {} bytes, but pmem_size_mb asks for {} bytes (omit \
                     pmem_size_mb to use the file as it is)",
                    m.len(),
                    mb << 20
                ),
            ));
        }
    }
    let created = meta.is_none();
    let mut pmem = PosixPmem::open(
        &p.pmem_path,
        p.pmem_size_mb.map(|m| m << 20),
        Some(p.persistence),
    )
    .map_err(|e| {
        let hint = if p.persistence == Persistence::Pmem {
            " (\"persistence\": \"pmem\" needs a DAX mapping; use \"volatile\" for RAM or \
                 a non-DAX file)"
        } else {
            ""
        };
        (-libc::EINVAL, format!("unusable pmem_path: {e}{hint}"))
    })?;
    if p.huge_pages != Some(false) {
        // On this (the app) thread before the bdev exists, up to 2 GiB at about 2.5 ms
        // per 2 MiB, as MAP_POPULATE already touched every page here; beyond that, on a
        // thread of its own off the reactors' cores (see `env::medium::huge`).
        pmem.start_huge_pages();
    }
    if !p.format {
        if let Probe::Foreign(_) = probe(&pmem) {
            drop(pmem);
            return Err((
                -libc::EINVAL,
                format!(
                    "{path} holds data that is not a pcache cache; refusing to touch it (pass \
                     \"format\": true to overwrite it)"
                ),
            ));
        }
    }
    let name = p.name.clone();
    if bdev_exists(&p.base_bdev_name) {
        match cache::attach(&p, pmem) {
            Ok(node) => {
                registry::with(|r| {
                    r.push(Entry {
                        params: p,
                        state: State::Active(NodePtr(node)),
                    })
                });
                Ok(name)
            }
            Err(e) => {
                if created {
                    registry::remove_created(&p);
                }
                Err(e)
            }
        }
    } else {
        noticelog!(
            "{name}: base bdev {} does not exist yet; the cache is created when it appears",
            p.base_bdev_name
        );
        registry::with(|r| {
            r.push(Entry {
                params: p,
                state: State::Waiting { pmem, created },
            })
        });
        Ok(name)
    }
}

extern "C" fn rpc_delete(req: *mut sys::spdk_jsonrpc_request, p: *const sys::spdk_json_val) {
    // SAFETY: handler arguments.
    let Some((r, d)) = (unsafe { decode(req, p, params::delete) }) else {
        return;
    };
    let Some(node) = registry::active(&d.name) else {
        match registry::take(&d.name) {
            Some(e) => {
                if let State::Waiting { pmem, created } = e.state {
                    drop(pmem);
                    if created {
                        registry::remove_created(&e.params);
                    }
                }
                r.reply(&Value::Bool(true));
            }
            None => r.error(-libc::ENODEV, &format!("no pcache bdev named '{}'", d.name)),
        }
        return;
    };
    if !d.flush {
        unregister(&d.name, r);
        return;
    }
    let name = d.name.clone();
    writeback::start_drain(
        node,
        Some(Box::new(move |res: Result<(), String>| match res {
            Ok(()) => unregister(&name, r),
            Err(m) => r.error(
                -libc::EIO,
                &format!("'{name}' not deleted: {m}; dirty data is still cached"),
            ),
        })),
    );
}

fn unregister(name: &str, r: Request) {
    let c = cstring(name);
    let arg = Box::into_raw(Box::new(r));
    // SAFETY: app thread; `arg` is reclaimed exactly once, by the callback or below.
    let rc = unsafe {
        sys::spdk_bdev_unregister_by_name(
            c.as_ptr(),
            registry::ptr(),
            Some(unregister_done),
            arg.cast(),
        )
    };
    if rc != 0 {
        // SAFETY: the callback will not run when the call fails.
        let r = unsafe { Box::from_raw(arg) };
        r.error(
            rc,
            &format!(
                "cannot delete '{name}': {}",
                std::io::Error::from_raw_os_error(-rc)
            ),
        );
    }
}

extern "C" fn unregister_done(arg: *mut c_void, rc: i32) {
    // SAFETY: the box leaked in `unregister`, reclaimed once.
    let r = unsafe { Box::from_raw(arg as *mut Request) };
    if rc == 0 {
        r.reply(&Value::Bool(true));
    } else {
        r.error(
            rc,
            &format!("delete failed: {}", std::io::Error::from_raw_os_error(-rc)),
        );
    }
}

extern "C" fn rpc_get_stats(req: *mut sys::spdk_jsonrpc_request, p: *const sys::spdk_json_val) {
    // SAFETY: handler arguments.
    let Some((r, name)) = (unsafe { decode(req, p, params::get_stats) }) else {
        return;
    };
    let list: Vec<Value> = registry::with(|reg| {
        reg.iter()
            .filter(|e| name.as_deref().is_none_or(|n| n == e.params.name))
            .map(registry::entry_stats)
            .collect()
    });
    match name {
        Some(n) if list.is_empty() => {
            r.error(-libc::ENODEV, &format!("no pcache bdev named '{n}'"))
        }
        _ => r.reply(&Value::Array(list)),
    }
}

extern "C" fn rpc_set_options(req: *mut sys::spdk_jsonrpc_request, p: *const sys::spdk_json_val) {
    // SAFETY: handler arguments.
    let Some((r, o)) = (unsafe { decode(req, p, params::set_options) }) else {
        return;
    };
    let Some(stored) = registry::with(|reg| {
        reg.iter()
            .find(|e| e.params.name == o.name)
            .map(|e| e.params.policy)
    }) else {
        r.error(-libc::ENODEV, &format!("no pcache bdev named '{}'", o.name));
        return;
    };
    let node = registry::active(&o.name);
    // Every check before the first change: an error leaves everything as it was.
    // SAFETY: app thread; the node is alive while registered.
    let engine = node.map(|n| &unsafe { &*n }.shared.engine);
    let policy = engine.map(|e| o.policy.apply(e.policy()));
    let check = match policy {
        Some(p) => p.validate(),
        None => o.policy.apply(stored.apply(Default::default())).validate(),
    };
    if let Err(m) = check {
        r.error(INVALID_PARAMS, &m);
        return;
    }
    if let (Some(e), Some(n)) = (engine, node) {
        if let Some(g) = o.gc_percent {
            if let Err(x) = e.set_gc_percent(g) {
                r.error(-libc::EINVAL, &x.to_string());
                return;
            }
        }
        let p = policy.expect("active");
        if p != e.policy() {
            if let Err(x) = e.set_policy(p) {
                r.error(-libc::EIO, &format!("cannot set the cache policy: {x}"));
                return;
            }
            noticelog!(
                "{}: cache mode {}, sequential cutoff {} KiB ({}), write bypass {} KiB, promotion {}",
                o.name,
                p.mode.name(),
                p.seq_cutoff_kib,
                p.seq_policy.name(),
                p.write_bypass_kib,
                p.promotion.name()
            );
            if p.mode != CacheMode::WriteBack && e.dirty_bytes() > 0 {
                // Leaving write-back: write every dirty byte back while I/O goes on
                // (progress in get_stats' `flush` object).
                writeback::start_drain(n, None);
            }
        }
    }
    registry::with(|reg| {
        if let Some(e) = reg.iter_mut().find(|e| e.params.name == o.name) {
            if o.gc_percent.is_some() {
                e.params.gc_percent = o.gc_percent;
            }
            e.params.policy.merge(&o.policy);
        }
    });
    r.reply(&Value::Bool(true));
}

extern "C" fn rpc_flush(req: *mut sys::spdk_jsonrpc_request, p: *const sys::spdk_json_val) {
    // SAFETY: handler arguments.
    let Some((r, name)) = (unsafe { decode(req, p, params::flush) }) else {
        return;
    };
    match registry::active(&name) {
        Some(n) => {
            writeback::start_drain(n, None);
            r.reply(&Value::Bool(true));
        }
        None if registry::stats_of(&name).is_some() => r.error(
            -libc::EAGAIN,
            &format!("'{name}' is not active (waiting for its base bdev or failed)"),
        ),
        None => r.error(-libc::ENODEV, &format!("no pcache bdev named '{name}'")),
    }
}
