//! Observability of a running `pcache serve` against a backing device with KNOWN
//! behaviour: nbdkit's memory plugin behind its delay filter (every read takes a fixed
//! time) or its error filter (writes or reads fail while a trigger file exists), mounted
//! as a regular file with nbdfuse (FUSE honours O_DIRECT, which pcache's io_uring
//! backing uses). The latency histograms must put read misses at or above the injected
//! delay and hits far below it, in the control socket, `pcache status --json`,
//! `status --watch` and the Prometheus endpoint; errors must be counted with their text
//! and time, and a cache that never fills must report no cache-full events. Without
//! nbdfuse, nbdkit or /dev/fuse the tests print SKIP.

use super::*;

/// An nbdkit export mounted as `<dir>/fuse/disk`; unmounted (nbdfuse ends) on drop.
struct FuseDisk {
    child: Child,
    path: PathBuf,
}

impl FuseDisk {
    /// `nbdkit <filters> memory <size> <params>` as a file, or None (SKIP printed).
    fn mount(dir: &TempDir, size: &str, filters: &[&str], params: &[&str]) -> Option<FuseDisk> {
        if !have("nbdfuse") || !have("nbdkit") || !Path::new("/dev/fuse").exists() {
            return None;
        }
        let mnt = dir.join("fuse");
        std::fs::create_dir_all(&mnt).unwrap();
        let path = mnt.join("disk");
        let mut args: Vec<String> = vec![path.display().to_string(), "[".into(), "nbdkit".into()];
        args.extend(filters.iter().map(|f| format!("--filter={f}")));
        args.push("memory".into());
        args.push(size.into());
        args.extend(params.iter().map(|p| p.to_string()));
        args.push("]".into());
        let child = Command::new("nbdfuse")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("nbdfuse.out")).unwrap())
            .stderr(File::create(dir.join("nbdfuse.err")).unwrap())
            .spawn()
            .unwrap();
        let d = FuseDisk { child, path };
        let end = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0) == 0 {
            if Instant::now() > end {
                skip(&format!(
                    "nbdfuse did not mount: {}",
                    std::fs::read_to_string(dir.join("nbdfuse.err")).unwrap_or_default()
                ));
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(d)
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        // SIGTERM: nbdfuse unmounts and stops nbdkit.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A cache in `dir` whose backing device is `disk`.
fn cache_on(
    tag: &str,
    disk: impl FnOnce(&TempDir) -> Option<FuseDisk>,
) -> Option<(Cache, FuseDisk)> {
    let mut c = Cache::new(tag, MIB);
    let d = disk(&c.dir)?;
    c.backing = d.path.clone();
    Some((c, d))
}

fn lat(v: &Value, class: &str, k: &str) -> f64 {
    v["latency"][class][k]
        .as_f64()
        .unwrap_or_else(|| panic!("no latency.{class}.{k} in status"))
}

/// The value of the first metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in:\n{text}"))
}

/// GET through curl (a client nobody here wrote); the body, and the HTTP status.
fn curl(url: &str, method: &str) -> (String, String) {
    let o = Command::new("curl")
        .args([
            "-s",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            "--max-time",
            "10",
            url,
        ])
        .output()
        .expect("run curl");
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", ""));
    (body.to_string(), code.to_string())
}

/// Injected read delay of the backing device, in milliseconds.
const DELAY_MS: f64 = 10.0;
const BLOCKS: u64 = 24;

#[test]
fn latency_matches_a_backing_with_known_delay() {
    let Some((c, _disk)) = cache_on("lat", |d| {
        FuseDisk::mount(d, "64M", &["delay"], &[&format!("rdelay={DELAY_MS}ms")])
    }) else {
        return;
    };
    if !have("curl") {
        return;
    }
    let srv = c.start(None, &["--metrics-listen", "127.0.0.1:0"]);
    let mut n = Nbd::unix(&c.sock, true).unwrap();
    let mut buf = vec![0u8; BS];
    // Known workload: BLOCKS reads of distinct blocks (misses, each at least one
    // delayed backing read), the same again (hits), then BLOCKS writes and a flush.
    for pass in 0..2 {
        for b in 0..BLOCKS {
            let t = Instant::now();
            n.read(b * 8 * BS as u64, &mut buf).unwrap();
            if pass == 0 {
                assert!(t.elapsed() >= Duration::from_millis(DELAY_MS as u64 - 1));
            }
        }
    }
    for b in 0..BLOCKS {
        n.write(b * 8 * BS as u64 + 4096 * 2, &buf, false).unwrap();
    }
    n.flush().unwrap();

    let v = c.status();
    assert_eq!(num(&v, "misses"), BLOCKS, "{v}");
    assert_eq!(num(&v, "hits"), BLOCKS, "{v}");
    let (miss, hit) = (&v["latency"]["read_miss"], &v["latency"]["read_hit"]);
    assert_eq!(miss["count"], json!(BLOCKS), "{miss}");
    assert_eq!(hit["count"], json!(BLOCKS), "{hit}");
    assert_eq!(v["latency"]["write"]["count"], json!(BLOCKS));
    assert_eq!(v["latency"]["flush"]["count"], json!(1));
    let us = DELAY_MS * 1000.0;
    // Misses take at least the delay (the histogram reads back within 1/128).
    for k in ["p50_us", "p99_us", "max_us"] {
        assert!(
            lat(&v, "read_miss", k) >= us * 0.99,
            "read_miss {k}: {miss}"
        );
    }
    // ...and not absurdly more (a loaded 2-core machine: generous).
    assert!(lat(&v, "read_miss", "p50_us") < us * 20.0, "{miss}");
    // Hits never touch the backing device: far below the delay.
    assert!(lat(&v, "read_hit", "p99_us") < us / 2.0, "{hit}");
    assert!(lat(&v, "read_hit", "p50_us") > 0.0, "{hit}");

    // `pcache status --json` (same fields) and the human table.
    let ctl = Cache::s(&c.ctl);
    let pm = Cache::s(&c.pmem);
    let o = c.run(&["status", "--json", "--pmem", pm, "--control", ctl]);
    assert!(o.ok(), "{}", o.show());
    let j: Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(lat(&j, "read_miss", "p50_us") >= us * 0.99);
    let o = c.run(&["status", "--pmem", pm, "--control", ctl]);
    assert!(o.ok(), "{}", o.show());
    assert!(o.stdout.contains("read_miss"), "{}", o.show());

    // `--watch`: per-interval figures. An interval with 4 more misses shows exactly those.
    let watcher = std::thread::spawn({
        let (dir, pm, ctl) = (c.dir.0.clone(), pm.to_string(), ctl.to_string());
        move || {
            pcache(
                &dir,
                &[
                    "status",
                    "--pmem",
                    &pm,
                    "--control",
                    &ctl,
                    "--watch",
                    "1",
                    "--count",
                    "3",
                    "--json",
                ],
            )
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    for b in 0..4 {
        n.read((BLOCKS + b) * 8 * BS as u64, &mut buf).unwrap();
    }
    let o = watcher.join().unwrap();
    assert!(o.ok(), "{}", o.show());
    let lines: Vec<Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{}", o.show());
    let misses: u64 = lines
        .iter()
        .map(|x| x["latency"]["read_miss"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(misses, 4, "{}", o.show());
    for x in &lines {
        if x["latency"]["read_miss"]["count"].as_u64() > Some(0) {
            assert!(x["latency"]["read_miss"]["p50_us"].as_f64().unwrap() >= us * 0.99);
        }
    }
    // --watch without a server says so.
    let o = c.run(&[
        "status",
        "--pmem",
        pm,
        "--control",
        "/nonexistent.ctl",
        "--watch",
    ]);
    assert!(
        !o.ok() && o.stderr.contains("needs a running pcache serve"),
        "{}",
        o.show()
    );

    // Prometheus: every line parses, the histogram agrees with the workload.
    let logs = std::fs::read_to_string(&srv.out).unwrap();
    let addr = logs
        .split("curl http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in:\n{logs}"))
        .to_string();
    let (text, code) = curl(&format!("http://{addr}/metrics"), "GET");
    assert_eq!(code, "200");
    let samples = pcache::env::posix::metrics::check_exposition(&text).unwrap();
    assert!(samples > 100, "{samples} samples");
    let h = "pcache_request_duration_seconds_bucket{class=";
    assert_eq!(
        metric(&text, &format!("{h}\"read_miss\",le=\"0.005\"}}")),
        0.0
    );
    assert_eq!(
        metric(&text, &format!("{h}\"read_miss\",le=\"+Inf\"}}")),
        (BLOCKS + 4) as f64
    );
    assert_eq!(
        metric(&text, &format!("{h}\"read_hit\",le=\"0.005\"}}")),
        BLOCKS as f64
    );
    assert_eq!(
        metric(&text, "pcache_reads_total "),
        (2 * BLOCKS + 4) as f64
    );
    assert_eq!(metric(&text, "pcache_cache_full_events_total "), 0.0);
    assert!(
        metric(
            &text,
            "pcache_request_duration_seconds_sum{class=\"read_miss\"}"
        ) >= 0.0099 * (BLOCKS + 4) as f64
    );
    // Anything else is refused, and the server stays up.
    assert_eq!(curl(&format!("http://{addr}/"), "GET").1, "404");
    assert_eq!(curl(&format!("http://{addr}/metrics"), "POST").1, "405");
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(curl(&format!("http://{addr}/metrics"), "GET").1, "200");
    n.disconnect();
    srv.term();
}

#[test]
fn errors_are_counted_with_text_and_time() {
    let Some((c, _disk)) = cache_on("err", |d| {
        let (w, r) = (d.join("fail-writes"), d.join("fail-reads"));
        FuseDisk::mount(
            d,
            "64M",
            &["error"],
            &[
                "error=EIO",
                "error-pwrite-rate=100%",
                &format!("error-pwrite-file={}", w.display()),
                "error-pread-rate=100%",
                &format!("error-pread-file={}", r.display()),
            ],
        )
    }) else {
        return;
    };
    let (fail_w, fail_r) = (c.dir.join("fail-writes"), c.dir.join("fail-reads"));
    let srv = c.start(None, &[]);
    let mut n = Nbd::unix(&c.sock, true).unwrap();
    let buf = vec![7u8; BS];
    let before = now_ms();
    File::create(&fail_w).unwrap();
    for b in 0..64u64 {
        n.write(b * BS as u64, &buf, false).unwrap();
    }
    n.flush().unwrap();
    // Writeback starts once writes pause for a tick, fails, and backs off.
    let end = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = c.status();
        if num(&v, "writeback_errors") >= 2 || Instant::now() > end {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(num(&v, "writeback_errors") >= 2, "{v}");
    let e = &v["last_writeback_error"];
    let t = e["unix_ms"].as_u64().unwrap_or(0);
    assert!(t >= before && t <= now_ms(), "{e}");
    assert!(e["message"].as_str().unwrap().contains("failed"), "{e}");
    assert!(num(&v, "dirty_bytes") > 0, "{v}");
    assert_eq!(
        num(&v, "cache_full_events"),
        0,
        "the cache never filled: {v}"
    );
    assert_eq!(num(&v, "waiting_requests"), 0, "{v}");

    // The errors stop: everything is written back, the last error stays for the record.
    std::fs::remove_file(&fail_w).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = c.status();
        if num(&v, "dirty_bytes") == 0 || Instant::now() > end {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(num(&v, "dirty_bytes"), 0, "{v}");
    // Kept after the recovery. (A retry already due when the file went away may have
    // failed once more, so it is this error or a later one, never none.)
    let kept = v["last_writeback_error"]["unix_ms"].as_u64().unwrap_or(0);
    assert!(kept >= t && kept <= now_ms(), "{v}");
    assert!(
        v["latency"]["writeback"]["count"].as_u64().unwrap() > 0,
        "{v}"
    );

    // A failing backing read: the request fails, counted with its text and time.
    assert_eq!(num(&v, "io_errors"), 0);
    File::create(&fail_r).unwrap();
    let mut rb = vec![0u8; BS];
    let r = n.read(100 * BS as u64, &mut rb);
    assert!(r.is_err(), "a read of a failing backing device succeeded");
    let v = c.status();
    assert_eq!(num(&v, "io_errors"), 1, "{v}");
    let e = &v["last_io_error"];
    assert!(
        e["message"].as_str().unwrap().contains("backing device"),
        "{e}"
    );
    assert!(e["unix_ms"].as_u64().unwrap() >= before, "{e}");
    let o = c.run(&[
        "status",
        "--pmem",
        Cache::s(&c.pmem),
        "--control",
        Cache::s(&c.ctl),
    ]);
    assert!(o.stdout.contains("last io err:  read of"), "{}", o.show());
    std::fs::remove_file(&fail_r).unwrap();
    n.disconnect();
    srv.term();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
