//! The parameters of the JSON-RPC methods, validated from a `serde_json::Value`: every
//! missing, mistyped, unknown or out-of-range parameter gives a message naming it. Pure
//! Rust, no SPDK calls, so the checks are unit-tested without a running target.
//!
//! Invariant: a value returned by these parsers is fully valid; the RPC handlers act on
//! it without further checks and change nothing when parsing failed.

use crate::engine::policy::SEQ_CUTOFF_MAX_KIB;
use crate::engine::{CacheMode, Policy, SeqPolicy};
use crate::env::medium::Persistence;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// Highest accepted `gc_percent` (the engine's limit).
pub(super) const GC_PERCENT_MAX: u64 = 90;
/// Default `gc_percent`.
pub(super) const GC_PERCENT_DEFAULT: u32 = 70;
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
    /// None each: as stored on the medium (a new format: write-back, cutoff 1 MiB
    /// when full).
    pub policy: PolicyParams,
}

/// `cache_mode`, `seq_cutoff_kib`, `seq_cutoff_policy`: each optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct PolicyParams {
    pub cache_mode: Option<CacheMode>,
    pub seq_cutoff_kib: Option<u32>,
    pub seq_policy: Option<SeqPolicy>,
}

impl PolicyParams {
    pub(super) fn is_empty(&self) -> bool {
        *self == PolicyParams::default()
    }
    /// `p` with these fields replaced.
    pub(super) fn apply(&self, p: Policy) -> Policy {
        p.with(self.cache_mode, self.seq_cutoff_kib, self.seq_policy)
    }
    /// Remembers the fields of `o` that are set (for `save_config`).
    pub(super) fn merge(&mut self, o: &PolicyParams) {
        self.cache_mode = o.cache_mode.or(self.cache_mode);
        self.seq_cutoff_kib = o.seq_cutoff_kib.or(self.seq_cutoff_kib);
        self.seq_policy = o.seq_policy.or(self.seq_policy);
    }
    fn to_json(self, p: &mut Value) {
        if let Some(m) = self.cache_mode {
            p["cache_mode"] = m.name().into();
        }
        if let Some(k) = self.seq_cutoff_kib {
            p["seq_cutoff_kib"] = k.into();
        }
        if let Some(s) = self.seq_policy {
            p["seq_cutoff_policy"] = s.name().into();
        }
    }
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

/// The object of named parameters, refusing keys outside `known`.
fn object<'a>(
    v: Option<&'a Value>,
    known: &[&str],
    none_ok: bool,
) -> Result<Option<&'a Map<String, Value>>, String> {
    let m = match v {
        None | Some(Value::Null) if none_ok => return Ok(None),
        None | Some(Value::Null) => return Err("missing parameters (expected an object)".into()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("parameters must be a JSON object".into()),
    };
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!(
            "unknown parameter '{k}' (expected one of: {})",
            known.join(", ")
        ));
    }
    Ok(Some(m))
}

fn string(m: &Map<String, Value>, key: &str, required: bool) -> Result<Option<String>, String> {
    match m.get(key) {
        None if required => Err(format!("missing required parameter '{key}'")),
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(format!("'{key}' must not be empty")),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("'{key}' must be a string")),
    }
}

fn boolean(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("'{key}' must be a boolean (true or false)")),
    }
}

fn uint(
    m: &Map<String, Value>,
    key: &str,
    min: u64,
    max: u64,
    required: bool,
) -> Result<Option<u64>, String> {
    match m.get(key) {
        None if required => Err(format!("missing required parameter '{key}'")),
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(format!("'{key}' is {n}: out of range {min}..{max}")),
        },
        Some(_) => Err(format!("'{key}' must be an integer")),
    }
}

/// The policy parameters present in `m`, each checked.
fn policy(m: &Map<String, Value>) -> Result<PolicyParams, String> {
    let cache_mode = match string(m, "cache_mode", false)? {
        None => None,
        Some(s) => Some(CacheMode::parse(&s).map_err(|e| format!("'cache_mode': {e}"))?),
    };
    let seq_policy = match string(m, "seq_cutoff_policy", false)? {
        None => None,
        Some(s) => Some(SeqPolicy::parse(&s).map_err(|e| format!("'seq_cutoff_policy': {e}"))?),
    };
    let seq_cutoff_kib =
        uint(m, "seq_cutoff_kib", 0, SEQ_CUTOFF_MAX_KIB as u64, false)?.map(|k| k as u32);
    Ok(PolicyParams {
        cache_mode,
        seq_cutoff_kib,
        seq_policy,
    })
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
        "cache_mode",
        "seq_cutoff_kib",
        "seq_cutoff_policy",
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
        gc_percent: uint(m, "gc_percent", 0, GC_PERCENT_MAX, false)?.map(|x| x as u32),
        format: boolean(m, "format")?.unwrap_or(false),
        policy: policy(m)?,
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
    ];
    let m = object(v, KNOWN, false)?.expect("required");
    let o = SetOptionsParams {
        name: string(m, "name", true)?.expect("required"),
        gc_percent: uint(m, "gc_percent", 0, GC_PERCENT_MAX, false)?.map(|g| g as u32),
        policy: policy(m)?,
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
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "gc_percent": 91}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "gc_percent": -1}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "gc_percent": 1.5}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "persistence": "file"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "persistence": "x"}),
            json!({"name": "P0", "base_bdev_name": "M0", "pmem_path": "/x", "format": "yes"}),
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
                         "seq_cutoff_policy": "never"}),
        )
        .unwrap();
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
