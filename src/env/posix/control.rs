//! The control socket of `pcache serve`: a Unix socket speaking one JSON object per
//! line, so `pcache status`, `pcache flush` and scripts can talk to a running cache.
//!
//! Requests: `{"cmd":"status"}` returns the statistics; `{"cmd":"set","gc_percent":N,
//! "cache_mode":M,"seq_cutoff_kib":K,"seq_cutoff_policy":P}` (any of them) changes and
//! persists the GC watermark, the cache mode and the sequential cutoff; `{"cmd":"flush"}` starts writing back every
//! dirty byte and returns at once (progress shows as `dirty_bytes` in status). Every
//! reply is `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A client that sends
//! garbage gets an error reply; a line longer than 64 KiB closes its connection. At
//! most [`MAX_CLIENTS`] clients are served at once (a thread each); more get an error
//! reply and are closed.

use super::volume::Volume;
use crate::runtime::options::{self, Settings, SETTING_KEYS};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// `set`: any of gc_percent, cache_mode, seq_cutoff_kib, seq_cutoff_policy,
/// write_bypass_kib, promotion, validated
/// and applied by `runtime::options` (every value is checked before anything changes).
fn set(vol: &Volume, req: &Value) -> Value {
    let mut known = vec!["cmd"];
    known.extend(SETTING_KEYS);
    let parsed = options::object(Some(req), &known, false)
        .map(|m| m.expect("required"))
        .and_then(Settings::from_json);
    let r = match parsed {
        Ok(s) if s.is_empty() => {
            Err("set needs gc_percent, cache_mode, seq_cutoff_kib, seq_cutoff_policy, write_bypass_kib or promotion".into())
        }
        Ok(s) => s.apply(&vol.engine),
        Err(m) => Err(m),
    };
    match r {
        Ok(p) => {
            // A switch away from write-back drains: let the background see it now.
            vol.start_drain_if_needed();
            let e = &vol.engine;
            json!({"ok": true, "gc_percent": e.gc_percent(), "cache_mode": p.mode.name(),
                   "seq_cutoff_kib": p.seq_cutoff_kib, "seq_cutoff_policy": p.seq_policy.name(),
                   "write_bypass_kib": p.write_bypass_kib, "promotion": p.promotion.name(),
                   "dirty_bytes": e.dirty_bytes()})
        }
        Err(m) => json!({"ok": false, "error": format!("set: {m}")}),
    }
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

/// Most control clients served at once: each has a thread (a client may keep its
/// connection for its 30 s read timeout), so more are refused with an error reply.
pub const MAX_CLIENTS: usize = 16;

/// Serves the control socket until `stop`; removes the socket file on return.
pub fn serve(path: &Path, vol: Arc<Volume>, stop: Arc<AtomicBool>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((mut s, _)) => {
                if active.load(Ordering::Acquire) >= MAX_CLIENTS {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                    let busy = json!({"ok": false, "error": format!(
                        "too many control clients at once ({MAX_CLIENTS}); try again")});
                    let _ = writeln!(s, "{busy}");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (vol, done) = (Arc::clone(&vol), Arc::clone(&active));
                let spawned =
                    std::thread::Builder::new()
                        .name("pcache-ctl".into())
                        .spawn(move || {
                            let _ = client(s, &vol);
                            done.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    // The thread never ran: its count is ours to take back.
                    active.fetch_sub(1, Ordering::AcqRel);
                    eprintln!("pcache: control client refused: {e}");
                }
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
