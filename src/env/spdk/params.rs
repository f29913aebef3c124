//! The parameters of the JSON-RPC methods, validated from a `serde_json::Value`: every
//! missing, mistyped, unknown or out-of-range parameter gives a message naming it. The
//! settings shared with the CLI and the control socket (gc_percent, cache mode, cutoff)
//! are checked by `runtime::options`. Pure Rust, no SPDK calls, so the checks are
//! unit-tested without a running target.
//!
//! Invariant: a value returned by these parsers is fully valid; the RPC handlers act on
//! it without further checks and change nothing when parsing failed.

use crate::env::medium::Persistence;
pub(super) use crate::runtime::options::PolicyParams;
use crate::runtime::options::{boolean, gc_percent, object, string, uint};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Largest `pmem_size_mb` accepted (16 TiB): beyond it is certainly a typo.
const PMEM_SIZE_MB_MAX: u64 = 16 << 20;

/// `bdev_pcache_create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CreateParams {
    pub name: String,
    pub base_bdev_name: String,
    pub pmem_path: PathBuf,
    pub pmem_size_mb: Option<u64>,
    pub persistence: Persistence,
    /// None: as formatted (false for a new format).
    pub data_crc: Option<bool>,
    /// None: as stored on the medium (70 for a new format).
    pub gc_percent: Option<u32>,
    pub format: bool,
    /// Rebuild a medium in RAM into 2 MiB pages (`PosixPmem::start_huge_pages`);
    /// None: yes.
    pub huge_pages: Option<bool>,
    /// None each: as stored on the medium (a new format: write-back, cutoff 1 MiB
    /// when full).
    pub policy: PolicyParams,
}

impl CreateParams {
    /// The `params` object `save_config` writes: reattach (format=false) with the
    /// current settings.
    pub(super) fn to_config(&self) -> Value {
        let mut p = json!({
            "name": self.name,
            "base_bdev_name": self.base_bdev_name,
            "pmem_path": self.pmem_path.to_string_lossy(),
            "persistence": self.persistence.to_string(),
            "format": false,
        });
        if let Some(mb) = self.pmem_size_mb {
            p["pmem_size_mb"] = mb.into();
        }
        if let Some(c) = self.data_crc {
            p["data_crc"] = c.into();
        }
        if let Some(g) = self.gc_percent {
            p["gc_percent"] = g.into();
        }
        if let Some(h) = self.huge_pages {
            p["huge_pages"] = h.into();
        }
        self.policy.to_json(&mut p);
        json!({ "method": "bdev_pcache_create", "params": p })
    }
}

/// `bdev_pcache_delete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DeleteParams {
    pub name: String,
    pub flush: bool,
}

/// `bdev_pcache_set_options`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SetOptionsParams {
    pub name: String,
    pub gc_percent: Option<u32>,
    pub policy: PolicyParams,
}

/// A bdev name SPDK can carry: non-empty, printable, no whitespace.
fn bdev_name(key: &str, s: String) -> Result<String, String> {
    if s.len() > 255 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "'{key}' must be at most 255 characters without spaces or control characters"
        ));
    }
    Ok(s)
}

pub(super) fn create(v: Option<&Value>) -> Result<CreateParams, String> {
    const KNOWN: &[&str] = &[
        "name",
        "base_bdev_name",
        "pmem_path",
        "pmem_size_mb",
        "persistence",
        "data_crc",
        "gc_percent",
        "format",
        "huge_pages",
        "cache_mode",
        "seq_cutoff_kib",
        "seq_cutoff_policy",
        "write_bypass_kib",
        "promotion",
    ];
    let m = object(v, KNOWN, false)?.expect("required");
    let name = bdev_name("name", string(m, "name", true)?.expect("required"))?;
    let base_bdev_name = bdev_name(
        "base_bdev_name",
        string(m, "base_bdev_name", true)?.expect("required"),
    )?;
    if name == base_bdev_name {
        return Err("'name' and 'base_bdev_name' must differ".into());
    }
    let pmem_path = PathBuf::from(string(m, "pmem_path", true)?.expect("required"));
    if !pmem_path.is_absolute() {
        return Err(format!(
            "'pmem_path' must be an absolute path, not {}",
            pmem_path.display()
        ));
    }
    let pmem_size_mb = uint(m, "pmem_size_mb", 1, PMEM_SIZE_MB_MAX, false)?;
    let persistence = match string(m, "persistence", false)?.as_deref() {
        None | Some("pmem") => Persistence::Pmem,
        Some("volatile") => Persistence::Volatile,
        Some("file") => {
            return Err(
                "'persistence' \"file\" is not available in SPDK (msync would be a \
                        syscall on a reactor): use \"pmem\" (DAX) or \"volatile\""
                    .into(),
            )
        }
        Some(other) => {
            return Err(format!(
                "'persistence' is \"{other}\": expected \"pmem\" or \"volatile\""
            ))
        }
    };
    Ok(CreateParams {
        name,
        base_bdev_name,
        pmem_path,
        pmem_size_mb,
        persistence,
        data_crc: boolean(m, "data_crc")?,
        gc_percent: gc_percent(m)?,
        format: boolean(m, "format")?.unwrap_or(false),
        huge_pages: boolean(m, "huge_pages")?,
        policy: PolicyParams::from_json(m)?,
    })
}

pub(super) fn delete(v: Option<&Value>) -> Result<DeleteParams, String> {
    let m = object(v, &["name", "flush"], false)?.expect("required");
    Ok(DeleteParams {
        name: string(m, "name", true)?.expect("required"),
        flush: boolean(m, "flush")?.unwrap_or(false),
    })
}

/// `bdev_pcache_get_stats`: the optional name.
pub(super) fn get_stats(v: Option<&Value>) -> Result<Option<String>, String> {
    match object(v, &["name"], true)? {
        None => Ok(None),
        Some(m) => string(m, "name", false),
    }
}

/// `bdev_pcache_set_options`: the name and at least one option, all checked before
/// anything changes.
pub(super) fn set_options(v: Option<&Value>) -> Result<SetOptionsParams, String> {
    const KNOWN: &[&str] = &[
        "name",
        "gc_percent",
        "cache_mode",
        "seq_cutoff_kib",
        "seq_cutoff_policy",
        "write_bypass_kib",
        "promotion",
    ];
    let m = object(v, KNOWN, false)?.expect("required");
    let o = SetOptionsParams {
        name: string(m, "name", true)?.expect("required"),
        gc_percent: gc_percent(m)?,
        policy: PolicyParams::from_json(m)?,
    };
    if o.gc_percent.is_none() && o.policy.is_empty() {
        return Err(format!(
            "nothing to change: give at least one of {}",
            KNOWN[1..].join(", ")
        ));
    }
    Ok(o)
}

/// `bdev_pcache_flush`: the name.
pub(super) fn flush(v: Option<&Value>) -> Result<String, String> {
    let m = object(v, &["name"], false)?.expect("required");
    Ok(string(m, "name", true)?.expect("required"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::modes::SEQ_CUTOFF_MAX_KIB;
    use crate::engine::{CacheMode, SeqPolicy};

    fn c(v: Value) -> Result<CreateParams, String> {
        create(Some(&v))
    }

    #[test]
    fn create_defaults_and_errors() {
        let p =
            c(json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/dev/shm/x"})).unwrap();
        assert_eq!(p.gc_percent, None);
        assert_eq!(p.persistence, Persistence::Pmem);
        assert!(!p.format && p.data_crc.is_none() && p.pmem_size_mb.is_none());
        let bad = [
            json!({"base_bdev_name": "M0", "pmem_path": "/x"}),
            json!({"name": 5, "base_bdev_name": "M0", "pmem_path": "/x"}),
            json!({"name": "", "base_bdev_name": "M0", "pmem_path": "/x"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "rel"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "gc_percent": 96}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "gc_percent": -1}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "gc_percent": 1.5}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "persistence": "file"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "persistence": "x"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "format": "yes"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "huge_pages": 1}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "pmem_size_mb": 0}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "bogus": 1}),
            json!({"name": "M0", "base_bdev_name": "M0", "pmem_path": "/x"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "cache_mode": "wb"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "cache_mode": 1}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "seq_cutoff_kib": -1}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x",
                   "seq_cutoff_kib": (SEQ_CUTOFF_MAX_KIB as u64) + 1}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "seq_cutoff_kib": "1M"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x",
                   "seq_cutoff_policy": "sometimes"}),
            json!([1, 2]),
        ];
        for b in bad {
            assert!(c(b.clone()).is_err(), "accepted {b}");
        }
        assert!(create(None).is_err());
    }

    #[test]
    fn config_round_trips() {
        let p = c(
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/dev/shm/x",
                         "pmem_size_mb": 64, "persistence": "volatile", "gc_percent": 50,
                         "format": true, "cache_mode": "writearound", "seq_cutoff_kib": 0,
                         "seq_cutoff_policy": "never", "huge_pages": false}),
        )
        .unwrap();
        assert_eq!(p.huge_pages, Some(false));
        let cfg = p.to_config();
        let q = create(Some(&cfg["params"])).unwrap();
        assert_eq!(q, CreateParams { format: false, ..p });
    }

    #[test]
    fn other_methods() {
        assert!(
            delete(Some(&json!({"name": "P0", "flush": true})))
                .unwrap()
                .flush
        );
        assert!(delete(Some(&json!({"flush": true}))).is_err());
        assert_eq!(get_stats(None).unwrap(), None);
        assert!(get_stats(Some(&json!({"name": 1}))).is_err());
        assert!(set_options(Some(&json!({"name": "P0"})))
            .unwrap_err()
            .contains("nothing to change"));
        assert_eq!(
            set_options(Some(&json!({"name": "P0", "gc_percent": 0})))
                .unwrap()
                .gc_percent,
            Some(0)
        );
        let o = set_options(Some(&json!({"name": "P0", "cache_mode": "passthrough",
                                          "seq_cutoff_policy": "always"})))
        .unwrap();
        assert_eq!(o.gc_percent, None);
        assert_eq!(o.policy.cache_mode, Some(CacheMode::PassThrough));
        assert_eq!(o.policy.seq_policy, Some(SeqPolicy::Always));
        assert_eq!(o.policy.seq_cutoff_kib, None);
        // One bad value refuses the whole request.
        for bad in [
            json!({"name": "P0", "gc_percent": 50, "cache_mode": "fast"}),
            json!({"name": "P0", "cache_mode": "writeback", "seq_cutoff_kib": -5}),
            json!({"name": "P0", "cache_mode": "writeback", "mode": "x"}),
        ] {
            assert!(set_options(Some(&bad)).is_err(), "accepted {bad}");
        }
        assert!(flush(Some(&json!({}))).is_err());
    }
}
