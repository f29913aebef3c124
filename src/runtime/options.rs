//! Validation of the settings a user can give, once for every interface: the CLI
//! (`pcache format/serve/set`), the control socket's `set` and the JSON-RPC methods
//! (`bdev_pcache_create`, `bdev_pcache_set_options`). Every missing, mistyped, unknown or
//! out-of-range value gives a message naming it.
//!
//! Invariant: a value these parsers return is fully valid; callers act on it without
//! further checks, and a request with one bad value changes nothing ([`Settings::apply`]
//! checks the whole result before it sets anything).

use crate::engine::modes::{SEQ_CUTOFF_MAX_KIB, WRITE_BYPASS_MAX_KIB};
use crate::engine::{CacheMode, Engine, Pmem, Policy, Promotion, SeqPolicy};
use serde_json::{Map, Value};

/// Highest accepted `gc_percent` (the engine's limit).
pub const GC_PERCENT_MAX: u32 = crate::engine::format::GC_PERCENT_MAX;
/// `gc_percent` of a new cache.
pub const GC_PERCENT_DEFAULT: u32 = 95;
/// The setting names, as JSON keys and (with dashes) CLI flags.
pub const SETTING_KEYS: [&str; 6] = [
    "gc_percent",
    "cache_mode",
    "seq_cutoff_kib",
    "seq_cutoff_policy",
    "write_bypass_kib",
    "promotion",
];

/// `cache_mode`, `seq_cutoff_kib`, `seq_cutoff_policy`, `write_bypass_kib`, `promotion`:
/// each optional (None: as stored on the medium; a new format: write-back, cutoff 1 MiB
/// when full, writes of 1 MiB or more bypass a reclaiming cache, a full cache caches a
/// read miss on its second miss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyParams {
    pub cache_mode: Option<CacheMode>,
    pub seq_cutoff_kib: Option<u32>,
    pub seq_policy: Option<SeqPolicy>,
    pub write_bypass_kib: Option<u32>,
    pub promotion: Option<Promotion>,
}

impl PolicyParams {
    pub fn is_empty(&self) -> bool {
        *self == PolicyParams::default()
    }
    /// `p` with these fields replaced.
    pub fn apply(&self, p: Policy) -> Policy {
        p.with(self.cache_mode, self.seq_cutoff_kib, self.seq_policy)
            .with_write_bypass(self.write_bypass_kib)
            .with_promotion(self.promotion)
    }
    /// Remembers the fields of `o` that are set (for `save_config`).
    pub fn merge(&mut self, o: &PolicyParams) {
        self.cache_mode = o.cache_mode.or(self.cache_mode);
        self.seq_cutoff_kib = o.seq_cutoff_kib.or(self.seq_cutoff_kib);
        self.seq_policy = o.seq_policy.or(self.seq_policy);
        self.write_bypass_kib = o.write_bypass_kib.or(self.write_bypass_kib);
        self.promotion = o.promotion.or(self.promotion);
    }
    /// Writes the fields that are set into the JSON object `p`.
    pub fn to_json(self, p: &mut Value) {
        if let Some(m) = self.cache_mode {
            p["cache_mode"] = m.name().into();
        }
        if let Some(k) = self.seq_cutoff_kib {
            p["seq_cutoff_kib"] = k.into();
        }
        if let Some(s) = self.seq_policy {
            p["seq_cutoff_policy"] = s.name().into();
        }
        if let Some(k) = self.write_bypass_kib {
            p["write_bypass_kib"] = k.into();
        }
        if let Some(x) = self.promotion {
            p["promotion"] = x.name().into();
        }
    }
    /// The policy fields present in `m`, each checked.
    pub fn from_json(m: &Map<String, Value>) -> Result<PolicyParams, String> {
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
        let write_bypass_kib =
            uint(m, "write_bypass_kib", 0, WRITE_BYPASS_MAX_KIB as u64, false)?.map(|k| k as u32);
        let promotion = match string(m, "promotion", false)? {
            None => None,
            Some(s) => Some(Promotion::parse(&s).map_err(|e| format!("'promotion': {e}"))?),
        };
        Ok(PolicyParams {
            cache_mode,
            seq_cutoff_kib,
            seq_policy,
            write_bypass_kib,
            promotion,
        })
    }
}

/// The settings that can change on a live cache: `gc_percent` and the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    pub gc_percent: Option<u32>,
    pub policy: PolicyParams,
}

impl Settings {
    pub fn is_empty(&self) -> bool {
        self.gc_percent.is_none() && self.policy.is_empty()
    }
    /// The settings present in `m` (other keys are the caller's to check).
    pub fn from_json(m: &Map<String, Value>) -> Result<Settings, String> {
        Ok(Settings {
            gc_percent: gc_percent(m)?,
            policy: PolicyParams::from_json(m)?,
        })
    }
    /// Applies them to a live engine, persisted; the resulting policy is checked before
    /// anything is set (and the engine refuses a bad gc_percent before storing it), so a
    /// refused request changes nothing. Returns the new policy.
    pub fn apply<P: Pmem>(&self, e: &Engine<P>) -> Result<Policy, String> {
        let p = self.policy.apply(e.policy());
        p.validate()?;
        if let Some(g) = self.gc_percent {
            e.set_gc_percent(g).map_err(|x| x.to_string())?;
        }
        if p != e.policy() {
            e.set_policy(p)
                .map_err(|x| format!("cannot set the cache policy: {x}"))?;
        }
        Ok(p)
    }
}

/// `gc_percent` in `m`, if present: an integer in 0..=GC_PERCENT_MAX.
pub fn gc_percent(m: &Map<String, Value>) -> Result<Option<u32>, String> {
    Ok(uint(m, "gc_percent", 0, GC_PERCENT_MAX as u64, false)?.map(|g| g as u32))
}

/// Checks a `gc_percent` given as a number (CLI).
pub fn check_gc_percent(g: u64) -> Result<u32, String> {
    if g > GC_PERCENT_MAX as u64 {
        return Err(format!(
            "gc_percent {g} is out of range 0..={GC_PERCENT_MAX}"
        ));
    }
    Ok(g as u32)
}

/// The object of named parameters, refusing keys outside `known`. `none_ok`: a missing
/// or null object is `Ok(None)` rather than an error.
pub fn object<'a>(
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

/// A non-empty string parameter.
pub fn string(m: &Map<String, Value>, key: &str, required: bool) -> Result<Option<String>, String> {
    match m.get(key) {
        None if required => Err(format!("missing required parameter '{key}'")),
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(format!("'{key}' must not be empty")),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("'{key}' must be a string")),
    }
}

/// A boolean parameter.
pub fn boolean(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("'{key}' must be a boolean (true or false)")),
    }
}

/// An unsigned integer parameter in `min..=max`.
pub fn uint(
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

/// A size with an optional unit (`512`, `4K`, `1M`, `2GiB`, `1T`), greater than 0.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let m = match t[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                u => {
                    return Err(format!(
                        "unknown size unit '{u}' in '{s}' (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512M)"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size '{s}' is out of range"))
}

/// A sequential cutoff given as a size (`0` = off), as whole KiB up to the maximum.
pub fn parse_cutoff(s: &str) -> Result<u32, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    let b = parse_size(s)?;
    if b % 1024 != 0 {
        return Err(format!("{s}: the cutoff must be a multiple of 1 KiB"));
    }
    let kib = b / 1024;
    if kib > SEQ_CUTOFF_MAX_KIB as u64 {
        return Err(format!("{s}: the cutoff must be at most 4G"));
    }
    Ok(kib as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn settings_parse_and_refuse_with_the_name() {
        let s = Settings::from_json(&m(json!({"gc_percent": 50, "cache_mode": "writearound"})))
            .unwrap();
        assert_eq!(s.gc_percent, Some(50));
        assert_eq!(s.policy.cache_mode, Some(CacheMode::WriteAround));
        for (bad, name) in [
            (json!({"gc_percent": 96}), "gc_percent"),
            (json!({"gc_percent": -1}), "gc_percent"),
            (json!({"gc_percent": "50"}), "gc_percent"),
            (json!({"cache_mode": "wb"}), "cache_mode"),
            (
                json!({"seq_cutoff_kib": (SEQ_CUTOFF_MAX_KIB as u64) + 1}),
                "seq_cutoff_kib",
            ),
            (json!({"seq_cutoff_policy": "ALWAYS"}), "seq_cutoff_policy"),
            (
                json!({"write_bypass_kib": (WRITE_BYPASS_MAX_KIB as u64) + 1}),
                "write_bypass_kib",
            ),
            (json!({"write_bypass_kib": "1M"}), "write_bypass_kib"),
            (json!({"promotion": "nhit"}), "promotion"),
            (json!({"promotion": 2}), "promotion"),
        ] {
            let e = Settings::from_json(&m(bad.clone())).unwrap_err();
            assert!(e.contains(name), "{bad}: {e}");
        }
        assert!(Settings::default().is_empty());
        let s = Settings::from_json(&m(json!({"write_bypass_kib": 256}))).unwrap();
        assert_eq!(s.policy.write_bypass_kib, Some(256));
        assert_eq!(s.policy.apply(Policy::default()).write_bypass_kib, 256);
        let s = Settings::from_json(&m(json!({"promotion": "always"}))).unwrap();
        let p = s.policy.apply(Policy::new_default());
        assert_eq!(p.promotion, Promotion::Always);
        assert!(object(Some(&json!({"x": 1})), &["y"], false)
            .unwrap_err()
            .contains("unknown parameter 'x'"));
        assert_eq!(object(None, &[], true), Ok(None));
        assert!(check_gc_percent(96).is_err());
    }

    #[test]
    fn sizes_and_cutoffs() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_cutoff("0"), Ok(0));
        assert_eq!(parse_cutoff("1M"), Ok(1024));
        assert!(parse_cutoff("1000").is_err());
        assert!(parse_cutoff("5G").is_err());
    }
}
