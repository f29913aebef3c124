//! Prometheus metrics of `pcache serve --metrics-listen ADDR`: a small HTTP/1.x responder
//! on its own thread (never on a reactor) that answers `GET /metrics` with the text
//! exposition format 0.0.4, built from one statistics snapshot per scrape.
//!
//! Names follow Prometheus conventions: counters end in `_total`, sizes are `_bytes`,
//! durations are seconds, one family per quantity with labels for kinds. Latency
//! histograms are re-bucketed from the engine's fine log-linear buckets onto fixed `le`
//! bounds: a fine bucket counts under the first bound at or above its upper end, so a
//! value is at most one fine bucket (1/64 of it) late. Invariants: one request per
//! connection, at most 8 KiB of request head read, 2 s timeouts; anything that is not
//! `GET /metrics` gets 404, 405 or 400, never a panic; a client never blocks the others
//! for longer than its timeout.

use super::volume::Volume;
use crate::engine::latency::{bucket_range, Class, HistSnapshot, CLASS_NAMES};
use crate::engine::Stats;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds of the exported histogram buckets, in seconds (then `+Inf`).
pub const LE_SECONDS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, v: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {v}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// One histogram's `_bucket`, `_sum` and `_count` lines.
fn histogram(out: &mut String, name: &str, labels: &str, h: &HistSnapshot) {
    let mut cum = 0u64;
    let mut i = 0;
    let sep = if labels.is_empty() { "" } else { "," };
    for le in LE_SECONDS {
        let le_ns = (le * 1e9).round() as u64;
        while i < h.buckets.len() && bucket_range(i).1 <= le_ns {
            cum += h.buckets[i];
            i += 1;
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
    }
    let total = h.count();
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
    sample(out, &format!("{name}_sum"), labels, h.sum_ns as f64 / 1e9);
    sample(out, &format!("{name}_count"), labels, total);
}

/// The exposition text for one snapshot.
pub fn render(s: &Stats) -> String {
    let mut o = String::with_capacity(16 << 10);
    let counters: [(&str, u64, &str); 18] = [
        ("reads", s.reads, "Read requests"),
        ("writes", s.writes, "Write requests"),
        ("read_hits", s.hits, "Reads served entirely from the cache"),
        (
            "read_misses",
            s.misses,
            "Reads that needed the backing device",
        ),
        (
            "read_partial_hits",
            s.partial_hits,
            "Reads served partly from the cache",
        ),
        ("bytes_read", s.bytes_read, "Bytes read by clients"),
        ("bytes_written", s.bytes_written, "Bytes written by clients"),
        ("bytes_hit", s.bytes_hit, "Bytes read served from the cache"),
        ("fills", s.fills, "Extents cached after a read miss"),
        ("flushes", s.flushes, "Flush requests"),
        ("write_zeroes", s.write_zeroes, "Write-zeroes requests"),
        ("discards", s.discards, "Discard requests"),
        (
            "cache_full_events",
            s.cache_full_events,
            "Times the cache became full",
        ),
        ("writeback_ksets", s.writeback_ksets, "Ksets written back"),
        ("writeback_bytes", s.writeback_bytes, "Bytes written back"),
        (
            "writeback_skipped_bytes",
            s.writeback_skipped_bytes,
            "Dirty bytes writeback skipped because newer data of the same epoch replaced them",
        ),
        (
            "writeback_errors",
            s.writeback_errors,
            "Failed writeback batches",
        ),
        ("io_errors", s.io_errors, "Failed requests"),
    ];
    for (n, v, help) in counters {
        let name = format!("pcache_{n}_total");
        family(&mut o, &name, "counter", help);
        sample(&mut o, &name, "", v);
    }
    family(
        &mut o,
        "pcache_gc_ksets_total",
        "counter",
        "Ksets collected by GC",
    );
    sample(&mut o, "pcache_gc_ksets_total", "", s.gc_ksets);
    family(
        &mut o,
        "pcache_segments_reclaimed_total",
        "counter",
        "Segments reclaimed",
    );
    sample(
        &mut o,
        "pcache_segments_reclaimed_total",
        "",
        s.segments_reclaimed,
    );
    family(
        &mut o,
        "pcache_segments_compacted_total",
        "counter",
        "Segments reclaimed out of log order because they were mostly superseded",
    );
    sample(
        &mut o,
        "pcache_segments_compacted_total",
        "",
        s.segments_compacted,
    );
    family(
        &mut o,
        "pcache_crc_errors_total",
        "counter",
        "Cached data that failed its CRC",
    );
    sample(
        &mut o,
        "pcache_crc_errors_total",
        "state=\"clean\"",
        s.crc_errors_clean,
    );
    sample(
        &mut o,
        "pcache_crc_errors_total",
        "state=\"dirty\"",
        s.crc_errors_dirty,
    );

    let gauges: [(&str, u64, &str); 10] = [
        (
            "dirty_bytes",
            s.dirty_bytes,
            "Dirty bytes not yet written back",
        ),
        (
            "cached_extents",
            s.cached_extents,
            "Extents in the cache index",
        ),
        (
            "cached_bytes",
            s.cached_bytes,
            "Bytes of cached data the index maps",
        ),
        (
            "capacity_bytes",
            s.capacity_bytes,
            "Bytes of the medium's data area",
        ),
        ("segments_used", s.segments_used as u64, "Segments in use"),
        (
            "segments",
            s.segments_total as u64,
            "Segments of the medium",
        ),
        ("segment_size_bytes", s.segment_size, "Size of a segment"),
        (
            "backing_size_bytes",
            s.backing_size,
            "Size of the cached device",
        ),
        (
            "waiting_requests",
            s.waiting_requests,
            "Requests waiting for cache space",
        ),
        (
            "gc_percent",
            s.gc_percent as u64,
            "GC watermark, percent of segments",
        ),
    ];
    for (n, v, help) in gauges {
        let name = format!("pcache_{n}");
        family(&mut o, &name, "gauge", help);
        sample(&mut o, &name, "", v);
    }
    family(
        &mut o,
        "pcache_writeback_stopped",
        "gauge",
        "1 when writeback stopped on an error it cannot retry",
    );
    sample(
        &mut o,
        "pcache_writeback_stopped",
        "",
        u8::from(s.writeback_stopped.is_some()),
    );
    for (n, e) in [
        ("io", &s.last_io_error),
        ("writeback", &s.last_writeback_error),
    ] {
        let name = format!("pcache_last_{n}_error_timestamp_seconds");
        family(
            &mut o,
            &name,
            "gauge",
            "Unix time of the last counted error of this kind (0: none)",
        );
        let t = e.as_ref().map_or(0.0, |e| e.unix_ms as f64 / 1000.0);
        sample(&mut o, &name, "", t);
    }

    let req = "pcache_request_duration_seconds";
    family(
        &mut o,
        req,
        "histogram",
        "Latency of client requests, by class, measured by the serving thread",
    );
    for c in [Class::ReadHit, Class::ReadMiss, Class::Write, Class::Flush] {
        let labels = format!("class=\"{}\"", CLASS_NAMES[c as usize]);
        histogram(&mut o, req, &labels, s.latency.class(c));
    }
    let wb = "pcache_writeback_io_duration_seconds";
    family(
        &mut o,
        wb,
        "histogram",
        "Latency of the backing-device writes and flushes of writeback",
    );
    histogram(&mut o, wb, "", s.latency.class(Class::Writeback));
    o
}

/// Binds `addr` (e.g. 127.0.0.1:9100); errors name the address.
pub fn bind(addr: &str) -> io::Result<TcpListener> {
    let a = addr
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("metrics address {addr}: {e}")))?
        .next()
        .ok_or_else(|| io::Error::other(format!("metrics address {addr} resolves to nothing")))?;
    TcpListener::bind(a)
        .map_err(|e| io::Error::new(e.kind(), format!("metrics address {addr}: {e}")))
}

/// Serves scrapes until `stop`, one connection at a time.
pub fn serve(l: TcpListener, vol: Arc<Volume>, stop: Arc<AtomicBool>) -> io::Result<()> {
    l.set_nonblocking(true)?;
    while !stop.load(Ordering::Acquire) {
        match l.accept() {
            Ok((s, _)) => {
                // One misbehaving client only costs its own timeouts.
                let _ = respond(s, &vol);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads the request head (up to 8 KiB) and answers it.
fn respond(mut s: TcpStream, vol: &Volume) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= 8 << 10 {
            return reply(&mut s, "400 Bad Request", "request head too long\n");
        }
        let n = match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return reply(&mut s, "400 Bad Request", "incomplete request\n"),
        };
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    match (method, path, version) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/1.") && parts.next().is_none() => {
            if m != "GET" && m != "HEAD" {
                return reply(&mut s, "405 Method Not Allowed", "only GET /metrics\n");
            }
            let p = p.split('?').next().unwrap_or_default();
            if p != "/metrics" {
                return reply(&mut s, "404 Not Found", "metrics are at /metrics\n");
            }
            let body = render(&vol.stats());
            let hdr = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(hdr.as_bytes())?;
            if m == "GET" {
                s.write_all(body.as_bytes())?;
            }
            Ok(())
        }
        _ => reply(
            &mut s,
            "400 Bad Request",
            "expected: GET /metrics HTTP/1.1\n",
        ),
    }
}

fn reply(s: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(r.as_bytes())
}

/// A format check of exposition text, for tests (promtool is not at hand): every line
/// is a comment or `name{labels} value` with a float value; every sample belongs to a
/// declared family; bucket counts never decrease. Returns the number of samples.
pub fn check_exposition(text: &str) -> Result<usize, String> {
    let mut families = std::collections::HashMap::new();
    let mut samples = 0;
    let mut last_bucket: Option<(String, f64)> = None;
    for (i, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line}", i + 1);
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut p = rest.split(' ');
            let (n, t) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                return Err(err("bad type"));
            }
            families.insert(n.to_string(), t.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').ok_or_else(|| err("no value"))?;
        let v: f64 = value.parse().map_err(|_| err("bad value"))?;
        let name = name_labels.split('{').next().unwrap_or("");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(err("bad metric name"));
        }
        let l = &name_labels[name.len()..];
        if !(l.is_empty() || l.starts_with('{') && l.ends_with('}')) {
            return Err(err("bad labels"));
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| families.get(*b).map(String::as_str) == Some("histogram"))
            .unwrap_or(name);
        if !families.contains_key(base) {
            return Err(err("sample without a TYPE"));
        }
        if name.ends_with("_bucket") {
            let series = name_labels.split("le=").next().unwrap_or("").to_string();
            if let Some((s, prev)) = &last_bucket {
                if *s == series && v < *prev {
                    return Err(err("bucket counts decrease"));
                }
            }
            last_bucket = Some((series, v));
        }
        samples += 1;
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::latency::Registry;

    fn stats_with(reg: &Registry) -> Stats {
        Stats {
            latency: reg.snapshot(),
            ..Stats::default()
        }
    }

    #[test]
    fn exposition_parses_and_buckets_add_up() {
        let reg = Registry::default();
        let set = reg.register();
        for us in [3u64, 30, 300, 3000] {
            set.record(Class::Write, us * 1000);
        }
        let text = render(&stats_with(&reg));
        let n = check_exposition(&text).unwrap();
        assert!(n > 100, "{n} samples");
        let line = |p: &str| {
            text.lines()
                .find(|l| l.starts_with(p))
                .unwrap_or_else(|| panic!("no {p}"))
                .rsplit_once(' ')
                .unwrap()
                .1
                .parse::<f64>()
                .unwrap()
        };
        let w = "pcache_request_duration_seconds_bucket{class=\"write\",";
        assert_eq!(line(&format!("{w}le=\"0.00001\"}}")), 1.0);
        assert_eq!(line(&format!("{w}le=\"0.00005\"}}")), 2.0);
        assert_eq!(line(&format!("{w}le=\"0.001\"}}")), 3.0);
        assert_eq!(line(&format!("{w}le=\"+Inf\"}}")), 4.0);
        assert_eq!(
            line("pcache_request_duration_seconds_count{class=\"write\"}"),
            4.0
        );
        assert_eq!(
            line("pcache_request_duration_seconds_count{class=\"read_hit\"}"),
            0.0
        );
        assert!(check_exposition("pcache_x 1\n").is_err());
        assert!(check_exposition("# TYPE a counter\na one\n").is_err());
    }
}
