//! The control socket of `pcache serve`: a Unix socket speaking one JSON object per
//! line, so `pcache status`, `pcache flush` and scripts can talk to a running cache.
//!
//! Requests: `{"cmd":"status"}` returns the statistics; `{"cmd":"set","gc_percent":N,
//! "cache_mode":M,"seq_cutoff_kib":K,"seq_cutoff_policy":P}` (any of them) changes and
//! persists the GC watermark, the cache mode and the sequential cutoff; `{"cmd":"flush"}` starts writing back every
//! dirty byte and returns at once (progress shows as `dirty_bytes` in status). Every
//! reply is `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A client that sends
//! garbage gets an error reply; a line longer than 64 KiB closes its connection.

use super::volume::Volume;
use crate::engine::policy::SEQ_CUTOFF_MAX_KIB;
use crate::engine::{CacheMode, Policy, SeqPolicy};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Answers one request.
pub fn handle(vol: &Volume, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => status_json(vol),
        Some("set") => set(vol, &req),
        Some("flush") => {
            vol.start_drain();
            json!({"ok": true, "dirty_bytes": vol.engine.dirty_bytes()})
        }
        _ => json!({"ok": false, "error": "unknown cmd: expected status, set or flush"}),
    }
}

/// `set`: any of gc_percent, cache_mode, seq_cutoff_kib, seq_cutoff_policy. Every
/// value is checked before anything changes.
fn set(vol: &Volume, req: &Value) -> Value {
    match parse_set(vol, req) {
        Ok((gc, p)) => {
            let e = &vol.engine;
            if let Err(x) = gc.map_or(Ok(()), |g| e.set_gc_percent(g)) {
                return json!({"ok": false, "error": x.to_string()});
            }
            if let Err(x) = e.set_policy(p) {
                return json!({"ok": false, "error": x.to_string()});
            }
            // A switch away from write-back drains: let the background see it now.
            vol.start_drain_if_needed();
            json!({"ok": true, "gc_percent": e.gc_percent(), "cache_mode": p.mode.name(),
                   "seq_cutoff_kib": p.seq_cutoff_kib, "seq_cutoff_policy": p.seq_policy.name(),
                   "dirty_bytes": e.dirty_bytes()})
        }
        Err(m) => json!({"ok": false, "error": m}),
    }
}

fn parse_set(vol: &Volume, req: &Value) -> Result<(Option<u32>, Policy), String> {
    const KEYS: [&str; 5] = [
        "cmd",
        "gc_percent",
        "cache_mode",
        "seq_cutoff_kib",
        "seq_cutoff_policy",
    ];
    if let Some(m) = req.as_object() {
        if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(format!("set: unknown parameter {k:?}"));
        }
        if m.len() == 1 {
            return Err(
                "set needs gc_percent, cache_mode, seq_cutoff_kib or seq_cutoff_policy".into(),
            );
        }
    }
    let gc = match req.get("gc_percent") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(p) if p <= 90 => Some(p as u32),
            _ => return Err("gc_percent must be an integer in 0..90".into()),
        },
    };
    let text = |k: &str| -> Result<Option<&str>, String> {
        match req.get(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or(format!("{k} must be a string")),
        }
    };
    let mode = text("cache_mode")?.map(CacheMode::parse).transpose()?;
    let sp = text("seq_cutoff_policy")?
        .map(SeqPolicy::parse)
        .transpose()?;
    let kib = match req.get("seq_cutoff_kib") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= SEQ_CUTOFF_MAX_KIB as u64 => Some(k as u32),
            _ => {
                return Err(format!(
                    "seq_cutoff_kib must be an integer in 0..{SEQ_CUTOFF_MAX_KIB} (0 = off)"
                ))
            }
        },
    };
    Ok((gc, vol.engine.policy().with(mode, kib, sp)))
}

/// The status reply: engine statistics plus the medium and backing device.
pub fn status_json(vol: &Volume) -> Value {
    let mut v = serde_json::to_value(vol.stats()).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        m.insert("ok".into(), json!(true));
        m.insert("persistence".into(), json!(vol.persistence().to_string()));
        m.insert("pmem".into(), json!(vol.engine.pmem().describe()));
        m.insert("backing".into(), json!(vol.backing.describe()));
    }
    v
}

/// Serves the control socket until `stop`; removes the socket file on return.
pub fn serve(path: &Path, vol: Arc<Volume>, stop: Arc<AtomicBool>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                let vol = Arc::clone(&vol);
                std::thread::spawn(move || {
                    let _ = client(s, &vol);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn client(s: UnixStream, vol: &Volume) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s.take(u64::MAX));
    loop {
        let mut line = String::new();
        let n = r.by_ref().take(64 << 10).read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            return Ok(());
        }
        let reply = handle(vol, line.trim());
        writeln!(w, "{reply}")?;
    }
}

/// Sends one request to a control socket and returns the reply.
pub fn request(path: &Path, req: &Value) -> io::Result<Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(s, "{req}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line)
        .map_err(|e| io::Error::other(format!("bad reply from {}: {e}", path.display())))
}
