//! The `pcache` command line: format, serve (NBD export), status, check, flush.
//!
//! Every error is one line on stderr and a non-zero exit status, never a panic or a
//! backtrace. `pcache serve` with no options works on a fresh machine: it creates a
//! small medium and backing file in a data directory and says how to connect.

#[path = "pcache/status.rs"]
mod status;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use pcache::engine::{CacheMode, Config, Engine, Promotion, SeqPolicy};
use pcache::env::medium::{Persistence, PosixPmem};
use pcache::env::posix::signals;
use pcache::env::posix::volume::{panic_text, Target, Volume, VolumeOptions};
use pcache::env::posix::{control, metrics};
use pcache::frontend::nbd::{Listener, NbdServer};
use pcache::runtime::options;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "pcache",
    version,
    about = "Persistent-memory write-back cache for block devices"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format a medium as a new cache for a backing device.
    Format(CacheArgs),
    /// Attach (replaying after a crash) or format a blank medium, and export over NBD.
    Serve(ServeArgs),
    /// Show a cache's layout and state (online through the control socket, or offline).
    Status(StatusArgs),
    /// Validate all metadata and report what is dirty; non-zero exit on corruption.
    Check(MediumArgs),
    /// Write every dirty byte back to the backing device, with progress (through a
    /// running serve's control socket, or offline).
    Flush(FlushArgs),
    /// Change the GC watermark of a cache (online or offline); it is persisted.
    Set(SetArgs),
}

#[derive(Args, Clone)]
struct MediumArgs {
    /// The cache medium: a DAX file, /dev/daxX.Y, a regular file or a file in /dev/shm.
    #[arg(long)]
    pmem: PathBuf,
    /// How durable the medium is: pmem (MAP_SYNC), file (msync), volatile (RAM). Commands
    /// that write need `volatile` for a medium in RAM; status and check need none.
    #[arg(long, value_parser = parse_persistence)]
    persistence: Option<Persistence>,
}

/// Options that shape a cache (used when formatting, checked when attaching).
#[derive(Args, Clone)]
struct CacheOpts {
    /// Size of the medium file to create if it does not exist (e.g. 512M, 4G).
    #[arg(long, value_parser = parse_size)]
    pmem_size: Option<u64>,
    /// Keep a CRC32C of every cached extent and verify it on reads and writeback
    /// (`--data-crc` or `--data-crc=true`; `=false` to insist on none). When attaching,
    /// a given value must match how the cache was formatted.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    data_crc: Option<bool>,
    /// GC starts when this percentage of segments is in use (0..95, default 95).
    #[arg(long, value_parser = parse_gc_percent)]
    gc_percent: Option<u32>,
    /// Segment size when formatting (default: 1M-16M, the largest making at least 128
    /// segments: 2M for a 256M medium, 16M from 2G up).
    #[arg(long, value_parser = parse_size)]
    segment_size: Option<u64>,
    /// Rebuild a medium in RAM (tmpfs, /dev/shm) into 2 MiB pages, which makes random
    /// hits faster: the first 2 GiB at startup (about 2.5 ms per 2 MiB), the rest in the
    /// background (default true; `--huge-pages=false` keeps the 4 KiB pages).
    /// Device-dax and a tmpfs mounted huge=always have 2 MiB pages anyway.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    huge_pages: Option<bool>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Overwrite a medium holding other data, or attach to a different backing device.
    #[arg(long)]
    force: bool,
}

impl CacheOpts {
    fn apply(&self, o: &mut VolumeOptions) -> Result<()> {
        o.pmem_size = self.pmem_size;
        o.data_crc = self.data_crc;
        o.gc_percent = self.gc_percent;
        o.seg_size = self.segment_size.map(seg_size).transpose()?.unwrap_or(0);
        o.force = self.force;
        o.cache_mode = self.policy.cache_mode;
        o.seq_cutoff_kib = self.policy.seq_cutoff;
        o.seq_policy = self.policy.seq_cutoff_policy;
        o.write_bypass_kib = self.policy.write_bypass;
        o.promotion = self.policy.promotion;
        o.huge_pages = self.huge_pages.unwrap_or(true);
        Ok(())
    }
}

/// Cache mode and sequential cutoff (persisted; `pcache set` changes them later).
#[derive(Args, Clone, Default)]
struct PolicyArgs {
    /// writeback (default), writethrough, writearound or passthrough.
    #[arg(long, value_parser = parse_mode)]
    cache_mode: Option<CacheMode>,
    /// Sequential streams longer than this bypass the cache (e.g. 1M; 0 = off; default
    /// 1M for a new cache).
    #[arg(long, value_parser = parse_cutoff)]
    seq_cutoff: Option<u32>,
    /// When the cutoff applies: always, full (only when the cache is full; default) or never.
    #[arg(long, value_parser = parse_seq_policy)]
    seq_cutoff_policy: Option<SeqPolicy>,
    /// In write-back, writes at least this large go to the backing device while the
    /// cache is reclaiming (e.g. 1M; 0 = off; default 1M for a new cache).
    #[arg(long, value_parser = parse_cutoff)]
    write_bypass: Option<u32>,
    /// Which read misses a full cache caches: always, or second_miss (a block only when
    /// it missed recently before; default for a new cache).
    #[arg(long, value_parser = parse_promotion)]
    promotion: Option<Promotion>,
}

impl PolicyArgs {
    fn any(&self) -> bool {
        self.cache_mode.is_some()
            || self.seq_cutoff.is_some()
            || self.seq_cutoff_policy.is_some()
            || self.write_bypass.is_some()
            || self.promotion.is_some()
    }
}

fn parse_promotion(s: &str) -> Result<Promotion, String> {
    Promotion::parse(s)
}

fn parse_mode(s: &str) -> Result<CacheMode, String> {
    CacheMode::parse(s)
}

fn parse_seq_policy(s: &str) -> Result<SeqPolicy, String> {
    SeqPolicy::parse(s)
}

/// A sequential cutoff (runtime::options: one rule for every interface).
fn parse_cutoff(s: &str) -> Result<u32, String> {
    options::parse_cutoff(s)
}

fn parse_gc_percent(s: &str) -> Result<u32, String> {
    let g: u64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    options::check_gc_percent(g)
}

#[derive(Args, Clone)]
struct CacheArgs {
    #[command(flatten)]
    medium: MediumArgs,
    /// The backing file or block device.
    #[arg(long)]
    backing: PathBuf,
    #[command(flatten)]
    opts: CacheOpts,
}

#[derive(Args)]
struct ServeArgs {
    /// Cache medium (default: a file in the data directory).
    #[arg(long, requires = "backing")]
    pmem: Option<PathBuf>,
    /// Backing device (default: a file in the data directory).
    #[arg(long, requires = "pmem")]
    backing: Option<PathBuf>,
    /// How durable the medium is: pmem (MAP_SYNC), file (msync), volatile (RAM).
    #[arg(long, value_parser = parse_persistence)]
    persistence: Option<Persistence>,
    #[command(flatten)]
    opts: CacheOpts,
    /// NBD Unix socket path.
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// NBD TCP address (host:port).
    #[arg(long)]
    nbd_listen: Option<String>,
    /// Control socket path (default: next to the medium, `<pmem>.ctl`).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Reactor threads serving NBD clients, and kset buffers (default: number of cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    cores: Option<u32>,
    /// Data directory for the default files.
    #[arg(long, env = "PCACHE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at this address (GET /metrics), e.g. 127.0.0.1:9100.
    #[arg(long)]
    metrics_listen: Option<String>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    medium: MediumArgs,
    /// Print JSON (stable field names; with --watch, one object per interval and line).
    #[arg(long)]
    json: bool,
    /// Control socket of a running `pcache serve` (default: `<pmem>.ctl` if it answers).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Refresh every SECS seconds (default 1) with per-interval rates and latency, like
    /// `iostat 1`; needs a running `pcache serve`.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
    /// With --watch: stop after this many intervals.
    #[arg(long, requires = "watch")]
    count: Option<u64>,
}

#[derive(Args)]
struct FlushArgs {
    #[command(flatten)]
    medium: MediumArgs,
    /// Backing device, for an offline flush (not needed when `serve` is running).
    #[arg(long)]
    backing: Option<PathBuf>,
    /// Control socket of a running `pcache serve` (default: `<pmem>.ctl` if it answers).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Attach even if the backing device's identity differs from the recorded one.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct SetArgs {
    #[command(flatten)]
    medium: MediumArgs,
    /// GC starts when this percentage of segments is in use (0..95).
    #[arg(long, value_parser = parse_gc_percent)]
    gc_percent: Option<u32>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Control socket of a running `pcache serve` (default: `<pmem>.ctl` if it answers).
    #[arg(long)]
    control: Option<PathBuf>,
}

fn parse_persistence(s: &str) -> Result<Persistence, String> {
    s.parse()
        .map_err(|e: pcache::env::medium::ParsePersistenceError| e.to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    options::parse_size(s)
}

fn seg_size(v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow!("segment size {v} is too large"))
}

fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2)
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        // Not for serve: a client closing its socket must be an EPIPE, not a kill.
        signals::default_sigpipe();
    }
    let r = match cli.cmd {
        Cmd::Format(a) => format(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Status(a) => status(a),
        Cmd::Check(a) => check(a),
        Cmd::Flush(a) => flush(a),
        Cmd::Set(a) => set(a),
    };
    if let Err(e) = r {
        eprintln!("pcache: {e:#}");
        std::process::exit(1);
    }
}

fn volume_options(a: &CacheArgs) -> Result<VolumeOptions> {
    let mut o = VolumeOptions::new(a.medium.pmem.clone(), a.backing.clone());
    a.opts.apply(&mut o)?;
    o.persistence = a.medium.persistence;
    Ok(o)
}

fn format(a: CacheArgs) -> Result<()> {
    let v = Volume::format(&volume_options(&a)?)?;
    let s = v.stats();
    println!(
        "formatted {}: {} segments of {} MiB, persistence {}, data_crc {}, gc_percent {}, caching {} ({} bytes)",
        a.medium.pmem.display(),
        s.segments_total,
        s.segment_size >> 20,
        v.persistence(),
        s.data_crc,
        s.gc_percent,
        a.backing.display(),
        s.backing_size
    );
    v.shutdown()?;
    Ok(())
}

fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("pcache");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/pcache"),
        None => PathBuf::from("pcache-data"),
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    let (pmem, backing, dir) = match (&a.pmem, &a.backing) {
        (Some(p), Some(b)) => (p.clone(), b.clone(), None),
        _ => {
            let dir = a.data_dir.clone().unwrap_or_else(default_data_dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let backing = dir.join("backing.img");
            if !backing.exists() {
                let f = std::fs::File::create(&backing)
                    .with_context(|| format!("creating {}", backing.display()))?;
                f.set_len(1 << 30)?;
            }
            (dir.join("pmem.img"), backing, Some(dir))
        }
    };
    let default_small = dir.is_some();
    let mut o = VolumeOptions::new(pmem.clone(), backing.clone());
    a.opts.apply(&mut o)?;
    o.persistence = a.persistence;
    if default_small {
        // The default files are small: a 256 MiB medium (in 2 MiB segments).
        o.pmem_size = o.pmem_size.or(Some(256 << 20));
    }
    let n_cores = a.cores.unwrap_or_else(cores).max(1);
    let vol = Volume::attach(&o, true)?;
    signals::install();
    let stop = Arc::new(AtomicBool::new(false));

    let sock = a
        .nbd_socket
        .clone()
        .or_else(|| dir.as_ref().map(|d| d.join("nbd.sock")));
    let tcp = a
        .nbd_listen
        .clone()
        .or_else(|| dir.as_ref().map(|_| "127.0.0.1:10809".to_string()));
    if sock.is_none() && tcp.is_none() {
        bail!("nothing to serve on: give --nbd-socket PATH and/or --nbd-listen HOST:PORT");
    }
    let mut listeners = vec![];
    if let Some(p) = &sock {
        listeners.push(Listener::unix(p).with_context(|| format!("NBD socket {}", p.display()))?);
    }
    if let Some(t) = &tcp {
        listeners.push(Listener::tcp(t.as_str()).with_context(|| format!("NBD address {t}"))?);
    }
    let ctl = a.control.clone().unwrap_or_else(|| ctl_path(&pmem));
    let s = vol.stats();
    println!(
        "pcache: serving {} ({} bytes) cached in {} ({} segments, persistence {}, {} dirty bytes)",
        backing.display(),
        s.backing_size,
        pmem.display(),
        s.segments_total,
        vol.persistence(),
        s.dirty_bytes
    );
    if let Some(d) = &dir {
        println!("pcache: default files in {}", d.display());
    }
    if let Some(p) = &sock {
        println!("  nbdinfo 'nbd+unix:///?socket={}'", p.display());
        println!(
            "  qemu-io -f raw 'nbd+unix:///?socket={}' -c 'write -P 7 0 64k' -c 'read -P 7 0 64k'",
            p.display()
        );
        println!(
            "  fio --name=t --ioengine=nbd --uri='nbd+unix:///?socket={}' --rw=randwrite --bs=4k --size=64m --verify=crc32c",
            p.display()
        );
    }
    if let Some(t) = &tcp {
        println!("  nbdinfo nbd://{t}");
    }
    println!(
        "  pcache status --pmem {}   (control socket {})",
        pmem.display(),
        ctl.display()
    );

    // Background work (tick, writeback, GC) on its own thread: a writeback window is
    // written with blocking waits on the backing device, and on a reactor its clients
    // would wait that long (tens of ms on a busy disk, measured with the overload tier
    // of test/bench_nbd.sh).
    let bg_thread = vol.start_background().context("background thread")?;

    let metrics_thread = match &a.metrics_listen {
        Some(addr) => {
            let l = metrics::bind(addr)?;
            println!("  curl http://{}/metrics   (Prometheus)", l.local_addr()?);
            let (v, stop) = (Arc::clone(&vol), Arc::clone(&stop));
            Some(supervised(&vol, "metrics listener", move || {
                metrics::serve(l, v, stop)
            })?)
        }
        None => None,
    };
    let ctl_thread = {
        let (v, stop, ctl) = (Arc::clone(&vol), Arc::clone(&stop), ctl.clone());
        supervised(&vol, "control socket", move || {
            control::serve(&ctl, v, stop)
        })?
    };
    // Ends the server on a signal, or when a thread the volume depends on died.
    let watcher = {
        let (v, stop) = (Arc::clone(&vol), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !signals::stop_requested() && !stop.load(Ordering::Acquire) {
                if v.failure().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Release);
        })
    };
    let server = NbdServer::new()
        .description("pcache")
        .reactors(n_cores as usize);
    let r = server.serve(
        listeners,
        Arc::new(Target(Arc::clone(&vol))),
        Arc::clone(&stop),
    );
    stop.store(true, Ordering::Release);
    let mut threads = vec![("signal watcher", watcher), ("control socket", ctl_thread)];
    threads.extend(metrics_thread.map(|t| ("metrics listener", t)));
    for (name, t) in threads {
        if let Err(p) = t.join() {
            vol.fail(format!("{name} thread panicked: {}", panic_text(&*p)));
        }
    }
    let shut = vol.shutdown();
    if let Err(p) = bg_thread.join() {
        vol.fail(format!("background thread panicked: {}", panic_text(&*p)));
    }
    if let Some(why) = vol.failure() {
        bail!(
            "stopped because {why}; {} dirty bytes stay cached and are written back \
             when the cache is served again",
            vol.engine.dirty_bytes()
        );
    }
    r.context("NBD server")?;
    shut.context("shutdown")?;
    println!(
        "pcache: stopped cleanly; {} dirty bytes stay cached",
        vol.engine.dirty_bytes()
    );
    Ok(())
}

/// Runs `f` on a named thread of `serve`; if it fails or panics, the volume fails
/// (`Volume::fail`), which stops `serve` with that message and a non-zero exit rather
/// than running on without it.
fn supervised(
    vol: &Arc<Volume>,
    name: &'static str,
    f: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<std::thread::JoinHandle<()>> {
    let v = Arc::clone(vol);
    std::thread::Builder::new()
        .name(format!(
            "pcache-{}",
            name.split(' ').next().unwrap_or("aux")
        ))
        .spawn(
            move || match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => v.fail(format!("the {name} failed: {e}")),
                Err(p) => v.fail(format!("the {name} thread panicked: {}", panic_text(&*p))),
            },
        )
        .with_context(|| format!("cannot start the {name} thread"))
}

fn ctl_path(pmem: &Path) -> PathBuf {
    let mut s = pmem.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// Opens a cache offline to change it (`set`): the medium's durability mode is asked for
/// as when serving (tmpfs needs `--persistence volatile`).
fn open_offline(m: &MediumArgs) -> Result<Engine<PosixPmem>> {
    if !m.pmem.exists() {
        bail!("{}: no such file", m.pmem.display());
    }
    let p = PosixPmem::open(&m.pmem, None, m.persistence)?;
    replay(m, p)
}

/// Opens a cache offline only to look at it (`status`, `check`): mapped read-only, so
/// nothing is ever written, and no `--persistence` is needed on any medium (a given one
/// is checked against what the medium is, so a typo is not silently accepted).
fn open_read_only(m: &MediumArgs) -> Result<Engine<PosixPmem>> {
    if !m.pmem.exists() {
        bail!("{}: no such file", m.pmem.display());
    }
    let p = PosixPmem::open_read_only(&m.pmem)?;
    if let Some(want) = m.persistence {
        // `file` on a DAX medium is a valid (slower) choice for serving; other mismatches
        // would be refused by `serve`, so say so here too.
        let ok = want == p.mode() || (want == Persistence::File && p.mode() == Persistence::Pmem);
        if !ok {
            bail!(
                "{}: --persistence {want} does not fit this medium, which is {} (status and \
                 check need no --persistence)",
                m.pmem.display(),
                p.mode()
            );
        }
    }
    replay(m, p)
}

fn replay(m: &MediumArgs, p: PosixPmem) -> Result<Engine<PosixPmem>> {
    Engine::open_offline(p, &Config::default()).map_err(|e| anyhow!("{}: {e}", m.pmem.display()))
}

fn status(a: StatusArgs) -> Result<()> {
    let ctl = a
        .control
        .clone()
        .unwrap_or_else(|| ctl_path(&a.medium.pmem));
    if let Some(secs) = a.watch {
        let fetch = || {
            control::request(&ctl, &json!({"cmd": "status"})).map_err(|e| {
                anyhow!(
                    "status --watch needs a running pcache serve: control socket {}: {e}",
                    ctl.display()
                )
            })
        };
        return status::watch(fetch, secs, a.count, a.json);
    }
    let v = match control::request(&ctl, &json!({"cmd": "status"})) {
        Ok(v) => v,
        Err(e) if a.control.is_some() => bail!("control socket {}: {e}", ctl.display()),
        Err(_) => {
            let e = open_read_only(&a.medium)?;
            let mut v = serde_json::to_value(e.stats())?;
            v["online"] = json!(false);
            v["pmem"] = json!(e.pmem().describe());
            v["persistence"] = json!(e.pmem().mode().to_string());
            v["backing_id"] = json!(e.superblock().backing.id);
            v
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    status::print(&v)
}

fn check(m: MediumArgs) -> Result<()> {
    let e = open_read_only(&m)?;
    let s = e
        .check_invariants(&[])
        .map_err(|x| anyhow!("{}: inconsistent metadata: {x}", m.pmem.display()))?;
    let st = e.stats();
    println!(
        "{}: ok: {} ksets with {} keys in the log, {} dirty bytes, {} of {} segments in use, {} cached extents",
        m.pmem.display(),
        s.ksets,
        s.keys,
        st.dirty_bytes,
        st.segments_used,
        st.segments_total,
        st.cached_extents
    );
    Ok(())
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Sends `req` to the control socket if a server answers there: Ok(None) if none does.
fn online(
    m: &MediumArgs,
    control: &Option<PathBuf>,
    req: serde_json::Value,
) -> Result<Option<serde_json::Value>> {
    let ctl = control.clone().unwrap_or_else(|| ctl_path(&m.pmem));
    match control::request(&ctl, &req) {
        Ok(v) if v["ok"] == json!(true) => Ok(Some(v)),
        Ok(v) => bail!(
            "{}: {}",
            ctl.display(),
            v["error"].as_str().unwrap_or("request failed")
        ),
        Err(e) if control.is_some() => bail!("control socket {}: {e}", ctl.display()),
        Err(_) => Ok(None),
    }
}

fn flush(a: FlushArgs) -> Result<()> {
    let pmem = a.medium.pmem.display().to_string();
    if let Some(v) = online(&a.medium, &a.control, json!({"cmd": "flush"}))? {
        // A running server writes back; follow its progress until nothing is dirty.
        let total = v["dirty_bytes"].as_u64().unwrap_or(0);
        let bar = progress_bar(total);
        loop {
            let s = online(&a.medium, &a.control, json!({"cmd": "status"}))?
                .ok_or_else(|| anyhow!("{pmem}: the server went away during the flush"))?;
            if let Some(m) = s["writeback_stopped"].as_str() {
                bail!("{pmem}: writeback stopped: {m}");
            }
            let dirty = s["dirty_bytes"].as_u64().unwrap_or(0);
            bar.set_position(total.saturating_sub(dirty));
            if dirty == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bar.finish_and_clear();
        println!("{pmem}: wrote back {total} dirty bytes (online); the cache is clean");
        return Ok(());
    }
    let Some(backing) = a.backing.clone() else {
        bail!("{pmem}: no server answers on its control socket; give --backing to flush offline");
    };
    let mut o = VolumeOptions::new(a.medium.pmem.clone(), backing.clone());
    o.persistence = a.medium.persistence;
    o.force = a.force;
    let v = Volume::attach(&o, false)?;
    let total = v.engine.dirty_bytes();
    let bar = progress_bar(total);
    v.writeback_all(|done, _| bar.set_position(done))?;
    bar.finish_and_clear();
    v.shutdown()?;
    println!(
        "{pmem}: wrote back {total} dirty bytes to {}; the cache is clean",
        backing.display()
    );
    Ok(())
}

fn set(a: SetArgs) -> Result<()> {
    let pmem = a.medium.pmem.display().to_string();
    if a.gc_percent.is_none() && !a.policy.any() {
        bail!("set: give --gc-percent, --cache-mode, --seq-cutoff, --seq-cutoff-policy or --write-bypass");
    }
    let mut req = json!({"cmd": "set"});
    if let Some(g) = a.gc_percent {
        req["gc_percent"] = json!(g);
    }
    if let Some(m) = a.policy.cache_mode {
        req["cache_mode"] = json!(m.name());
    }
    if let Some(k) = a.policy.seq_cutoff {
        req["seq_cutoff_kib"] = json!(k);
    }
    if let Some(p) = a.policy.seq_cutoff_policy {
        req["seq_cutoff_policy"] = json!(p.name());
    }
    if let Some(k) = a.policy.write_bypass {
        req["write_bypass_kib"] = json!(k);
    }
    if let Some(p) = a.policy.promotion {
        req["promotion"] = json!(p.name());
    }
    if let Some(r) = online(&a.medium, &a.control, req)? {
        println!(
            "{pmem}: gc_percent {}, cache_mode {}, seq_cutoff {} KiB, seq_cutoff_policy {}, write_bypass {} KiB, promotion {} (online; dirty bytes {})",
            r["gc_percent"], r["cache_mode"], r["seq_cutoff_kib"], r["seq_cutoff_policy"], r["write_bypass_kib"], r["promotion"], r["dirty_bytes"]
        );
        return Ok(());
    }
    let e = open_offline(&a.medium)?;
    if let Some(g) = a.gc_percent {
        e.set_gc_percent(g).map_err(|x| anyhow!("{pmem}: {x}"))?;
    }
    let p = a.policy;
    let pol = e
        .policy()
        .with(p.cache_mode, p.seq_cutoff, p.seq_cutoff_policy)
        .with_write_bypass(p.write_bypass)
        .with_promotion(p.promotion);
    e.set_policy(pol).map_err(|x| anyhow!("{pmem}: {x}"))?;
    println!(
        "{pmem}: gc_percent {}, cache_mode {}, seq_cutoff {} KiB, seq_cutoff_policy {}, write_bypass {} KiB, promotion {}",
        e.gc_percent(),
        pol.mode.name(),
        pol.seq_cutoff_kib,
        pol.seq_policy.name(),
        pol.write_bypass_kib,
        pol.promotion.name()
    );
    if pol.mode != CacheMode::WriteBack && e.dirty_bytes() > 0 {
        println!(
            "{pmem}: {} dirty bytes are written back when the cache is served (or run pcache flush)",
            e.dirty_bytes()
        );
    }
    Ok(())
}
