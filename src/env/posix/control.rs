//! The control socket of `pcache serve`: a Unix socket speaking one JSON object per
//! line, so `pcache status`, `pcache flush` and scripts can talk to a running cache.
//!
//! Requests: `{"cmd":"status"}` returns the statistics; `{"cmd":"set","gc_percent":N}`
//! changes (and persists) the GC watermark; `{"cmd":"flush"}` starts writing back every
//! dirty byte and returns at once (progress shows as `dirty_bytes` in status). Every
//! reply is `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A client that sends
//! garbage gets an error reply; a line longer than 64 KiB closes its connection.

use super::volume::Volume;
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
        Some("set") => match req.get("gc_percent").and_then(Value::as_u64) {
            Some(p) if p <= 90 => match vol.engine.set_gc_percent(p as u32) {
                Ok(()) => json!({"ok": true, "gc_percent": p}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
            _ => json!({"ok": false, "error": "set needs gc_percent, an integer in 0..90"}),
        },
        Some("flush") => {
            vol.start_drain();
            json!({"ok": true, "dirty_bytes": vol.engine.dirty_bytes()})
        }
        _ => json!({"ok": false, "error": "unknown cmd: expected status, set or flush"}),
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
