//! `pcache status` output: the human table, and `--watch`, a refreshing per-interval view
//! (like `iostat 1`) computed from two control-socket snapshots.
//!
//! Everything here works on the status JSON (the control socket's reply, or the offline
//! engine statistics), so the online and offline views print the same fields. Latency
//! comes only from a running server: offline there is none, and the table says so.

use anyhow::{anyhow, bail, Result};
use pcache::engine::latency::{HistSnapshot, CLASS_NAMES};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A field as text ("" when absent).
fn g(v: &Value, k: &str) -> String {
    v.get(k)
        .map(|x| x.to_string().trim_matches('"').to_string())
        .unwrap_or_default()
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// UTC date and time of a Unix time in milliseconds (RFC 3339).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn error_line(e: Option<&Value>) -> String {
    match e {
        Some(e) if !e.is_null() => {
            let t = e.get("unix_ms").and_then(Value::as_u64).unwrap_or(0);
            let when = if t == 0 {
                "time unknown".to_string()
            } else {
                rfc3339(t)
            };
            format!("{} ({when})", g(e, "message"))
        }
        _ => "none".into(),
    }
}

/// The histogram of `class` in a status JSON.
pub fn hist(v: &Value, class: &str) -> Result<HistSnapshot> {
    let h = v
        .get("latency")
        .and_then(|l| l.get(class))
        .ok_or_else(|| anyhow!("status has no latency for {class}"))?;
    let pairs: Vec<(u32, u64)> =
        serde_json::from_value(h.get("buckets").cloned().unwrap_or(json!([])))
            .map_err(|e| anyhow!("bad latency buckets for {class}: {e}"))?;
    HistSnapshot::from_sparse(&pairs, n(h, "sum_ns"), n(h, "max_ns")).map_err(|e| anyhow!(e))
}

fn us(ns: u64) -> String {
    let u = ns as f64 / 1000.0;
    if u >= 100.0 {
        format!("{u:.0}")
    } else {
        format!("{u:.1}")
    }
}

/// Prints the human status table.
pub fn print(v: &Value) -> Result<()> {
    println!("pmem:         {}", g(v, "pmem"));
    println!(
        "persistence:  {}   mode: {}   data_crc: {}   gc_percent: {}",
        g(v, "persistence"),
        g(v, "mode"),
        g(v, "data_crc"),
        g(v, "gc_percent")
    );
    println!(
        "seq cutoff:   {} KiB ({})   write bypass: {} KiB   bypassed: {} requests, {} bytes   invalidations: {}",
        g(v, "seq_cutoff_kib"),
        g(v, "seq_cutoff_policy"),
        g(v, "write_bypass_kib"),
        g(v, "bypassed_requests"),
        g(v, "bypassed_bytes"),
        g(v, "invalidations")
    );
    println!(
        "promotion:    {}   fills declined: {} bytes",
        g(v, "promotion"),
        g(v, "fill_declined_bytes")
    );
    println!(
        "segments:     {} used of {} ({} bytes each)",
        g(v, "segments_used"),
        g(v, "segments_total"),
        g(v, "segment_size")
    );
    println!(
        "dirty bytes:  {}   cached extents: {}",
        g(v, "dirty_bytes"),
        g(v, "cached_extents")
    );
    println!(
        "cached bytes: {} of {} in the data area",
        g(v, "cached_bytes"),
        g(v, "capacity_bytes")
    );
    println!(
        "key_head:     {}   dirty_tail: {}   key_tail: {}",
        g(v, "key_head"),
        g(v, "dirty_tail"),
        g(v, "key_tail")
    );
    println!(
        "reads:        {} (hits {}, misses {}, partial {})   writes: {}   flushes: {}",
        g(v, "reads"),
        g(v, "hits"),
        g(v, "misses"),
        g(v, "partial_hits"),
        g(v, "writes"),
        g(v, "flushes")
    );
    println!(
        "writeback:    {} ksets, {} bytes ({} superseded bytes skipped, {} recycled), {} errors   gc: {} ksets",
        g(v, "writeback_ksets"),
        g(v, "writeback_bytes"),
        g(v, "writeback_skipped_bytes"),
        g(v, "recycled_bytes"),
        g(v, "writeback_errors"),
        g(v, "gc_ksets")
    );
    println!(
        "cache full:   {} times   waiting requests: {}   paced writes: {} ({} overdrawn)",
        g(v, "cache_full_events"),
        g(v, "waiting_requests"),
        g(v, "paced_writes"),
        g(v, "overdrawn_writes")
    );
    println!(
        "errors:       io {}   crc clean {}   crc dirty {}",
        g(v, "io_errors"),
        g(v, "crc_errors_clean"),
        g(v, "crc_errors_dirty")
    );
    println!("last io err:  {}", error_line(v.get("last_io_error")));
    println!(
        "last wb err:  {}",
        error_line(v.get("last_writeback_error"))
    );
    if v.get("online") == Some(&json!(false)) {
        println!("latency:      not available offline (no pcache serve is running)");
        return Ok(());
    }
    println!("latency (us, since start)   count      p50      p99    p99.9      max");
    for c in CLASS_NAMES {
        let h = hist(v, c)?;
        let s = h.summary();
        println!(
            "  {c:<24}{:>8} {:>8} {:>8} {:>8} {:>8}",
            s.count,
            us(h.quantile(0.5)),
            us(h.quantile(0.99)),
            us(h.quantile(0.999)),
            us(h.max_ns)
        );
    }
    Ok(())
}

/// One interval of `--watch`: rates and latency between two snapshots.
fn interval(prev: &Value, cur: &Value, secs: f64) -> Result<Value> {
    let d = |k: &str| n(cur, k).saturating_sub(n(prev, k)) as f64 / secs;
    let mut lat = serde_json::Map::new();
    for c in CLASS_NAMES {
        let h = hist(cur, c)?.since(&hist(prev, c)?);
        let cnt = h.count();
        lat.insert(
            c.into(),
            json!({
                "count": cnt,
                "p50_us": h.quantile(0.5) as f64 / 1000.0,
                "p99_us": h.quantile(0.99) as f64 / 1000.0,
                "p999_us": h.quantile(0.999) as f64 / 1000.0,
                // The interval's maximum is not kept; its highest bucket bounds it.
                "max_us": if cnt == 0 { 0.0 } else { h.quantile(0.99999999) as f64 / 1000.0 },
            }),
        );
    }
    let r = n(cur, "bytes_read").saturating_sub(n(prev, "bytes_read"));
    let h = n(cur, "bytes_hit").saturating_sub(n(prev, "bytes_hit"));
    let hit_pct = if r == 0 {
        0.0
    } else {
        100.0 * h as f64 / r as f64
    };
    let errors = n(cur, "io_errors").saturating_sub(n(prev, "io_errors"))
        + n(cur, "writeback_errors").saturating_sub(n(prev, "writeback_errors"));
    let full = n(cur, "cache_full_events").saturating_sub(n(prev, "cache_full_events"));
    Ok(json!({
        "interval_s": secs,
        "read_iops": d("reads"),
        "write_iops": d("writes"),
        "read_mb_s": d("bytes_read") / 1e6,
        "write_mb_s": d("bytes_written") / 1e6,
        "hit_bytes_pct": hit_pct,
        "writeback_mb_s": d("writeback_bytes") / 1e6,
        "dirty_bytes": n(cur, "dirty_bytes"),
        "waiting_requests": n(cur, "waiting_requests"),
        "cache_full_events": full,
        "errors": errors,
        "latency": lat,
    }))
}

fn header() {
    println!(
        "{:>9} {:>9} {:>8} {:>8} {:>5} {:>8} {:>10} {:>4} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "r/s", "w/s", "rMB/s", "wMB/s", "hit%", "wbMB/s", "dirty", "wait",
        "hit p50", "hit p99", "miss p50", "miss p99", "wr p50", "wr p99", "wr p99.9", "wb p99"
    );
}

fn row(x: &Value) {
    let l = |c: &str, q: &str| {
        let v = &x["latency"][c];
        if v["count"].as_u64().unwrap_or(0) == 0 {
            "-".to_string()
        } else {
            us((v[q].as_f64().unwrap_or(0.0) * 1000.0) as u64)
        }
    };
    println!(
        "{:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>5.1} {:>8.1} {:>10} {:>4} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        x["read_iops"].as_f64().unwrap_or(0.0),
        x["write_iops"].as_f64().unwrap_or(0.0),
        x["read_mb_s"].as_f64().unwrap_or(0.0),
        x["write_mb_s"].as_f64().unwrap_or(0.0),
        x["hit_bytes_pct"].as_f64().unwrap_or(0.0),
        x["writeback_mb_s"].as_f64().unwrap_or(0.0),
        x["dirty_bytes"],
        x["waiting_requests"],
        l("read_hit", "p50_us"),
        l("read_hit", "p99_us"),
        l("read_miss", "p50_us"),
        l("read_miss", "p99_us"),
        l("write", "p50_us"),
        l("write", "p99_us"),
        l("write", "p999_us"),
        l("writeback", "p99_us"),
    );
}

/// `--watch`: every `secs`, one line of per-interval figures (latency in microseconds);
/// with `json`, one JSON object per line. Stops after `count` lines if given.
pub fn watch(
    mut fetch: impl FnMut() -> Result<Value>,
    secs: f64,
    count: Option<u64>,
    json_out: bool,
) -> Result<()> {
    if !(secs.is_finite() && secs >= 0.05) {
        bail!("--watch interval must be at least 0.05 seconds");
    }
    let mut prev = fetch()?;
    let mut t_prev = Instant::now();
    let mut lines = 0u64;
    while count.is_none_or(|c| lines < c) {
        std::thread::sleep(Duration::from_secs_f64(secs));
        let cur = fetch()?;
        let now = Instant::now();
        let x = interval(&prev, &cur, (now - t_prev).as_secs_f64())?;
        if json_out {
            println!("{x}");
        } else {
            if lines % 20 == 0 {
                header();
            }
            row(&x);
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        prev = cur;
        t_prev = now;
        lines += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_745_261_999), "2025-12-03T07:01:01Z");
    }
}
