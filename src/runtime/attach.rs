//! The attach and format rules of a cache, with their refusals and the advice that goes
//! with them, for both runtimes (`pcache format/serve/flush` and `bdev_pcache_create`).
//!
//! Rules: a medium is formatted only when asked, or when it is blank (all-zero metadata)
//! and the caller allows that; a medium that holds a cache or anything else is
//! formatted only with force; a cache is attached only to the backing device it was
//! formatted for (unless forced); a given `data_crc` must match the medium's; settings
//! given at attach (gc_percent, policy) are validated before any is applied. Refusals
//! name what the cache expects and the ways out that keep its dirty data first,
//! formatting last, in the words of the interface that asked ([`Dialect`]).
//!
//! Invariant: a refusal changes nothing on the medium.

use super::options::{Settings, GC_PERCENT_DEFAULT};
use crate::engine::{
    probe, BackingIdentity, Config, Engine, FormatOptions, OpenError, Pmem, Probe,
};

/// What the caller wants done with the medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Format it. A medium holding a cache or other data only with `force`.
    Format { force: bool },
    /// Attach the cache on it (replaying its log). A blank medium is formatted when
    /// `format_blank`; `force_backing` attaches to a backing device whose identity
    /// differs from the recorded one (the same device under another name).
    Attach {
        format_blank: bool,
        force_backing: bool,
    },
}

/// A request to open a cache.
#[derive(Debug, Clone)]
pub struct Request {
    pub intent: Intent,
    /// None: as formatted (off for a new format).
    pub data_crc: Option<bool>,
    /// Segment size of a new format; 0 picks one for the medium.
    pub seg_size: u32,
    /// Settings to apply (and persist); None each: as stored (defaults when formatting).
    pub settings: Settings,
    /// Distinguishes formats of the same medium ([`format_id`]).
    pub format_id: u64,
    pub config: Config,
}

/// Why a cache was not opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Format without force on a medium that holds a cache (which may hold dirty data).
    HoldsCache { backing: BackingIdentity },
    /// The medium holds something that is not pcache metadata.
    Foreign(Option<String>),
    /// The cache belongs to another backing device.
    WrongBacking {
        why: String,
        expected: BackingIdentity,
        found: BackingIdentity,
    },
    /// `data_crc` was given and differs from the medium's.
    DataCrc { formatted: bool },
    /// A setting given was refused.
    Invalid(String),
    /// Formatting failed.
    Format(OpenError),
    /// Attaching failed (corrupt metadata, a blank medium not to be formatted, ...).
    Open(OpenError),
}

/// Whose words a refusal uses: the CLI's flags or the JSON-RPC's parameters.
#[derive(Debug, Clone, Copy)]
pub enum Dialect<'a> {
    Cli {
        pmem: &'a str,
        backing: &'a str,
        volatile: bool,
    },
    Rpc {
        pmem: &'a str,
        volatile: bool,
    },
}

/// A per-format id from `seed` (the caller's clock and process or TSC bits): mixed so
/// that close seeds give unrelated ids. Not security relevant.
pub fn format_id(seed: u64) -> u64 {
    let mut x = seed;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

/// Opens (attaches or formats) the cache on `pmem` for the backing device `found`,
/// following the rules above.
pub fn open<P: Pmem>(pmem: P, found: &BackingIdentity, r: &Request) -> Result<Engine<P>, Refusal> {
    let probed = probe(&pmem);
    match (r.intent, &probed) {
        (Intent::Format { force: false }, Probe::Pcache(sb)) => {
            return Err(Refusal::HoldsCache {
                backing: sb.backing.clone(),
            })
        }
        (Intent::Format { force: false }, Probe::Foreign(why)) => {
            return Err(Refusal::Foreign(why.clone()))
        }
        (Intent::Format { .. }, _)
        | (
            Intent::Attach {
                format_blank: true, ..
            },
            Probe::Blank,
        ) => return format(pmem, found, r),
        _ => {}
    }
    let force = matches!(
        r.intent,
        Intent::Attach {
            force_backing: true,
            ..
        }
    );
    let e = Engine::open(pmem, found, force, &r.config).map_err(|e| match e {
        OpenError::WrongBacking(why) => Refusal::WrongBacking {
            why,
            expected: match &probed {
                Probe::Pcache(sb) => sb.backing.clone(),
                _ => BackingIdentity::default(),
            },
            found: found.clone(),
        },
        OpenError::Foreign => Refusal::Foreign(match probed {
            Probe::Foreign(w) => w,
            _ => None,
        }),
        e => Refusal::Open(e),
    })?;
    if let Some(c) = r.data_crc {
        if c != e.data_crc() {
            return Err(Refusal::DataCrc {
                formatted: e.data_crc(),
            });
        }
    }
    r.settings.apply(&e).map_err(Refusal::Invalid)?;
    Ok(e)
}

fn format<P: Pmem>(pmem: P, found: &BackingIdentity, r: &Request) -> Result<Engine<P>, Refusal> {
    let mut fo = FormatOptions::new(found.clone(), r.format_id);
    fo.seg_size = r.seg_size;
    fo.data_crc = r.data_crc.unwrap_or(false);
    fo.gc_percent = r.settings.gc_percent.unwrap_or(GC_PERCENT_DEFAULT);
    fo.policy = r.settings.policy.apply(fo.policy);
    fo.policy.validate().map_err(Refusal::Invalid)?;
    Engine::format(pmem, &fo, &r.config).map_err(Refusal::Format)
}

impl Refusal {
    /// The backing device is the wrong one (EXDEV for an RPC client).
    pub fn is_wrong_backing(&self) -> bool {
        matches!(self, Refusal::WrongBacking { .. })
    }

    /// The full message, with its advice, in the words of `d`.
    pub fn message(&self, d: Dialect<'_>) -> String {
        let (pmem, volatile) = match d {
            Dialect::Cli { pmem, volatile, .. } | Dialect::Rpc { pmem, volatile } => {
                (pmem, volatile)
            }
        };
        let vol = if volatile {
            " --persistence volatile"
        } else {
            ""
        };
        let rpc = matches!(d, Dialect::Rpc { .. });
        match self {
            Refusal::HoldsCache { backing } => format!(
                "{pmem}: already holds a pcache cache of '{}' ({} bytes), which may hold dirty \
                 data: to keep it, attach it with `pcache serve`, or write it back first \
                 with `pcache flush --pmem {pmem}{vol} --backing <that device>`; --force formats \
                 anyway and discards every cached and dirty byte",
                backing.id, backing.size
            ),
            Refusal::Foreign(why) if rpc => format!(
                "{pmem} holds data that is not a pcache cache{}; refusing to touch it \
                 (pass \"format\": true to overwrite it)",
                why.as_ref().map(|w| format!(" ({w})")).unwrap_or_default()
            ),
            Refusal::Foreign(why) => format!(
                "{pmem}: {}{}",
                OpenError::Foreign,
                why.as_ref().map(|w| format!(" ({w})")).unwrap_or_default()
            ),
            Refusal::WrongBacking {
                why,
                expected,
                found,
            } => match d {
                Dialect::Cli { backing, .. } => {
                    wrong_backing_cli(pmem, backing, vol, why, expected, found)
                }
                Dialect::Rpc { .. } => wrong_backing_rpc(pmem, vol, why, expected),
            },
            Refusal::DataCrc { formatted } if rpc => format!(
                "{pmem} was formatted with data_crc={formatted}, not {} (format anew to change it)",
                !formatted
            ),
            Refusal::DataCrc { formatted } => format!(
                "{pmem}: --data-crc={} given but the cache was formatted with{} data CRCs \
                 (format anew to change it)",
                !formatted,
                if *formatted { "" } else { "out" }
            ),
            Refusal::Invalid(m) if rpc => m.clone(),
            Refusal::Invalid(m) => format!("{pmem}: {m}"),
            Refusal::Format(e) if rpc => format!("cannot format {pmem}: {e}"),
            Refusal::Open(e) if rpc => format!("cannot attach {pmem}: {e}"),
            Refusal::Format(e) | Refusal::Open(e) => format!("{pmem}: {e}"),
        }
    }
}

/// The CLI's refusal to attach a cache to another backing device: what the cache
/// expects, then the ways out that keep its dirty data, and formatting only as the
/// data-losing last one.
fn wrong_backing_cli(
    pmem: &str,
    backing: &str,
    vol: &str,
    why: &str,
    expected: &BackingIdentity,
    found: &BackingIdentity,
) -> String {
    let same_shape = expected.size == found.size && expected.block_size == found.block_size;
    let force = if same_shape {
        format!(
            " If {backing} is that very device under another name, --force attaches it anyway \
             (on any other device, writeback would overwrite its data)."
        )
    } else {
        String::new()
    };
    format!(
        "{pmem}: this cache belongs to another backing device: {why}. Its dirty data stays \
         in the cache. To keep it, give --backing the device the cache was formatted for \
         ('{}'), or write the dirty data back to that device offline: \
         `pcache flush --pmem {pmem}{vol} --backing <that device>`.{force} Only as the \
         last resort, `pcache format --force` discards every cached and dirty byte.",
        expected.id
    )
}

/// The JSON-RPC's refusal to attach a cache to another base bdev: the identity the
/// cache expects, then recreating the base with that UUID or writing the data back
/// offline, and `"format": true` only as the data-losing last one.
fn wrong_backing_rpc(pmem: &str, vol: &str, why: &str, expected: &BackingIdentity) -> String {
    format!(
        "{pmem} is the cache of another base bdev ({why}); its dirty data is kept. To attach \
         it, give base_bdev_name the bdev it was formatted for, {} bytes in {}-byte blocks with \
         UUID (or name) '{}': a base bdev created anew gets a new UUID unless given that one \
         (e.g. bdev_uring_create / bdev_aio_create -u {}). Or write the dirty data back \
         offline, with the target stopped: `pcache flush --pmem {pmem}{vol} --backing \
         <the file or device under that bdev> --force` (--force: an SPDK UUID never matches \
         a path). Only as the last resort, \"format\": true discards every cached and dirty \
         byte.",
        expected.size, expected.block_size, expected.id, expected.id
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::sim::pmem::SimPmem;
    use std::sync::Arc;

    fn id(name: &str) -> BackingIdentity {
        BackingIdentity {
            size: 1 << 30,
            block_size: 512,
            id: name.into(),
        }
    }

    fn req(intent: Intent) -> Request {
        Request {
            intent,
            data_crc: None,
            seg_size: 1 << 20,
            settings: Settings::default(),
            format_id: format_id(7),
            config: Config::default(),
        }
    }

    const CLI: Dialect<'static> = Dialect::Cli {
        pmem: "/m",
        backing: "/b",
        volatile: false,
    };
    const RPC: Dialect<'static> = Dialect::Rpc {
        pmem: "/m",
        volatile: true,
    };

    #[test]
    fn rules_and_refusals() {
        let p = Arc::new(SimPmem::new(64 << 20));
        let attach = Intent::Attach {
            format_blank: false,
            force_backing: false,
        };
        // Blank: attach refuses, attach-or-format and format format.
        let r = open(Arc::clone(&p), &id("a"), &req(attach))
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(r, Refusal::Open(OpenError::Blank)), "{r:?}");
        let e = open(
            Arc::clone(&p),
            &id("a"),
            &req(Intent::Format { force: false }),
        )
        .unwrap();
        drop(e);
        // A cache: format refuses without force, attach works, wrong backing refuses.
        let r = open(
            Arc::clone(&p),
            &id("a"),
            &req(Intent::Format { force: false }),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(r
            .message(CLI)
            .contains("already holds a pcache cache of 'a'"));
        assert!(open(Arc::clone(&p), &id("a"), &req(attach)).is_ok());
        let r = open(Arc::clone(&p), &id("b"), &req(attach))
            .map(|_| ())
            .unwrap_err();
        assert!(r.is_wrong_backing());
        let m = r.message(CLI);
        assert!(
            m.contains("('a')") && m.contains("--force attaches it anyway"),
            "{m}"
        );
        let m = r.message(RPC);
        assert!(
            m.contains("UUID (or name) 'a'") && m.contains("--persistence volatile"),
            "{m}"
        );
        let forced = Intent::Attach {
            format_blank: false,
            force_backing: true,
        };
        assert!(open(Arc::clone(&p), &id("b"), &req(forced)).is_ok());
        // data_crc must match when given, either way.
        let mut q = req(attach);
        q.data_crc = Some(true);
        let r = open(Arc::clone(&p), &id("a"), &q).map(|_| ()).unwrap_err();
        assert_eq!(r, Refusal::DataCrc { formatted: false });
        assert!(r.message(CLI).contains("--data-crc=true"));
        // A bad setting refuses and changes nothing.
        let mut q = req(attach);
        q.settings.gc_percent = Some(96);
        assert!(matches!(
            open(Arc::clone(&p), &id("a"), &q).map(|_| ()),
            Err(Refusal::Invalid(_))
        ));
        let e = open(Arc::clone(&p), &id("a"), &req(attach)).unwrap();
        assert_eq!(e.gc_percent(), GC_PERCENT_DEFAULT);
    }

    #[test]
    fn foreign_data_is_never_touched_without_force() {
        let p = Arc::new(SimPmem::new(64 << 20));
        crate::engine::Pmem::write(&*p, 0, b"not a superblock, somebody's file system");
        for intent in [
            Intent::Format { force: false },
            Intent::Attach {
                format_blank: true,
                force_backing: false,
            },
        ] {
            let r = open(Arc::clone(&p), &id("a"), &req(intent))
                .map(|_| ())
                .unwrap_err();
            assert!(matches!(r, Refusal::Foreign(_)), "{r:?}");
            assert!(r.message(CLI).contains("not pcache"));
            assert!(r.message(RPC).contains("\"format\": true"));
        }
        assert!(open(p, &id("a"), &req(Intent::Format { force: true })).is_ok());
    }

    #[test]
    fn format_ids_differ_for_close_seeds() {
        assert_ne!(format_id(1), format_id(2));
    }
}
