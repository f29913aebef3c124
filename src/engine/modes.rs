//! The cache's settings as stored on the medium: the cache mode, the sequential cutoff
//! and its policy, the write bypass and the read-miss promotion, with their names (CLI,
//! RPC, JSON) and on-media codes.
//!
//! Plain values with no dependency on the rest of the engine, so the on-media format
//! (`format`) can encode them without depending on the request routing (`policy`).
//! Invariant: a code, once written to media, keeps its meaning (`from_code` of an
//! unknown code is None, and the decoder refuses it).

/// A setting's names (CLI, RPC, JSON) and on-media codes: `ALL` in code order (a
/// variant's code is its index), `name`, `parse` (whose error names the setting and
/// lists the accepted names, `use`), `code` and `from_code` (None for a code no variant
/// has, which the decoder refuses).
macro_rules! named_codes {
    ($t:ident, $what:literal, $use:literal, [$($v:ident => $n:literal),+ $(,)?]) => {
        impl $t {
            pub const ALL: [$t; [$($n),+].len()] = [$($t::$v),+];
            pub fn name(self) -> &'static str {
                match self {
                    $($t::$v => $n),+
                }
            }
            pub fn parse(s: &str) -> Result<Self, String> {
                Self::ALL
                    .into_iter()
                    .find(|m| m.name() == s)
                    .ok_or_else(|| format!(concat!("unknown ", $what, " {:?}: use ", $use), s))
            }
            pub fn code(self) -> u8 {
                self as u8
            }
            pub fn from_code(c: u8) -> Option<Self> {
                Self::ALL.get(c as usize).copied()
            }
        }
    };
}

/// How the cache treats writes and read misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Writes complete in pmem and are written back later (the default).
    #[default]
    WriteBack,
    /// Writes go to the backing device and pmem; they complete when both have them.
    WriteThrough,
    /// Writes go to the backing device and invalidate cached copies; misses fill.
    WriteAround,
    /// Everything goes to the backing device; nothing new is cached.
    PassThrough,
}

// On-media code: cache_info byte 24; 0 is what a medium from before modes holds.
named_codes!(CacheMode, "cache mode", "writeback, writethrough, writearound or passthrough", [
    WriteBack => "writeback",
    WriteThrough => "writethrough",
    WriteAround => "writearound",
    PassThrough => "passthrough",
]);

/// When the sequential cutoff applies (OCF's `seq_cutoff_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeqPolicy {
    /// Only when the cache is full (OCF's default): at or above where a GC round stops
    /// (`Engine::over`), so once a cache has filled, every fill evicts.
    #[default]
    Full,
    Always,
    Never,
}

// On-media code: cache_info byte 25.
named_codes!(SeqPolicy, "seq_cutoff_policy", "always, full or never", [
    Full => "full",
    Always => "always",
    Never => "never",
]);

/// Which read misses a full cache caches (OCF's promotion policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Promotion {
    /// Every miss (what a medium from before the setting holds: code 0).
    #[default]
    Always,
    /// Once the cache is full, a block only on its second recent miss (OCF's nhit with
    /// 2 hits; the default for new caches): data read once does not evict data read
    /// again. A cache with room still caches every miss.
    SecondMiss,
}

// On-media code: cache_info byte 26.
named_codes!(Promotion, "promotion", "always or second_miss", [
    Always => "always",
    SecondMiss => "second_miss",
]);

/// Largest sequential cutoff threshold (4 GiB, in KiB).
pub const SEQ_CUTOFF_MAX_KIB: u32 = 4 << 20;
/// Default threshold for new caches: 1 MiB, as OCF.
pub const SEQ_CUTOFF_DEFAULT_KIB: u32 = 1024;
/// Largest write-bypass threshold (as the cutoff's, in KiB).
pub const WRITE_BYPASS_MAX_KIB: u32 = SEQ_CUTOFF_MAX_KIB;
/// Default write-bypass threshold for new caches: writes of 1 MiB or more go around a
/// cache that is reclaiming.
pub const WRITE_BYPASS_DEFAULT_KIB: u32 = 1024;

/// The persisted policy. An old medium (zeros in these fields) reads as write-back with
/// the cutoff and the write bypass off, promoting every miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    pub mode: CacheMode,
    /// Threshold in KiB; 0 turns the cutoff off.
    pub seq_cutoff_kib: u32,
    pub seq_policy: SeqPolicy,
    /// Write-bypass threshold in KiB (0 = off): in write-back, a write at least this
    /// large goes to the backing device instead while the cache is reclaiming (at or
    /// above its GC watermark), where caching it would only evict data for data that
    /// is written back before it is read.
    pub write_bypass_kib: u32,
    /// Which read misses are cached once the cache is full.
    pub promotion: Promotion,
}

impl Policy {
    /// What a new cache gets: write-back, cutoff 1 MiB when the cache is full.
    pub fn new_default() -> Self {
        Policy {
            mode: CacheMode::WriteBack,
            seq_cutoff_kib: SEQ_CUTOFF_DEFAULT_KIB,
            seq_policy: SeqPolicy::Full,
            write_bypass_kib: WRITE_BYPASS_DEFAULT_KIB,
            promotion: Promotion::SecondMiss,
        }
    }
    /// This policy with the given fields replaced.
    pub fn with(
        self,
        mode: Option<CacheMode>,
        seq_cutoff_kib: Option<u32>,
        seq_policy: Option<SeqPolicy>,
    ) -> Policy {
        Policy {
            mode: mode.unwrap_or(self.mode),
            seq_cutoff_kib: seq_cutoff_kib.unwrap_or(self.seq_cutoff_kib),
            seq_policy: seq_policy.unwrap_or(self.seq_policy),
            ..self
        }
    }
    /// This policy with the write-bypass threshold replaced, if given.
    pub fn with_write_bypass(self, kib: Option<u32>) -> Policy {
        Policy {
            write_bypass_kib: kib.unwrap_or(self.write_bypass_kib),
            ..self
        }
    }

    /// This policy with the promotion replaced, if given.
    pub fn with_promotion(self, p: Option<Promotion>) -> Policy {
        Policy {
            promotion: p.unwrap_or(self.promotion),
            ..self
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.seq_cutoff_kib > SEQ_CUTOFF_MAX_KIB {
            return Err(format!(
                "seq_cutoff {} KiB is above the maximum {SEQ_CUTOFF_MAX_KIB} KiB",
                self.seq_cutoff_kib
            ));
        }
        if self.write_bypass_kib > WRITE_BYPASS_MAX_KIB {
            return Err(format!(
                "write_bypass {} KiB is above the maximum {WRITE_BYPASS_MAX_KIB} KiB",
                self.write_bypass_kib
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_bad_ones_explain() {
        for m in CacheMode::ALL {
            assert_eq!(CacheMode::parse(m.name()), Ok(m));
            assert_eq!(CacheMode::from_code(m.code()), Some(m));
        }
        for p in SeqPolicy::ALL {
            assert_eq!(SeqPolicy::parse(p.name()), Ok(p));
            assert_eq!(SeqPolicy::from_code(p.code()), Some(p));
        }
        for p in Promotion::ALL {
            assert_eq!(Promotion::parse(p.name()), Ok(p));
            assert_eq!(Promotion::from_code(p.code()), Some(p));
        }
        assert!(Promotion::parse("nhit")
            .unwrap_err()
            .contains("second_miss"));
        assert_eq!(Promotion::from_code(2), None);
        assert_eq!(Policy::default().promotion, Promotion::Always);
        assert_eq!(Policy::new_default().promotion, Promotion::SecondMiss);
        assert_eq!(
            Policy::default()
                .with_promotion(Some(Promotion::SecondMiss))
                .promotion,
            Promotion::SecondMiss
        );
        assert!(CacheMode::parse("wb").unwrap_err().contains("writethrough"));
        assert!(SeqPolicy::parse("sometimes")
            .unwrap_err()
            .contains("always"));
        assert_eq!(CacheMode::from_code(4), None);
        let p = Policy::default();
        assert_eq!((p.mode, p.seq_cutoff_kib), (CacheMode::WriteBack, 0));
        let big = Policy {
            seq_cutoff_kib: SEQ_CUTOFF_MAX_KIB + 1,
            ..p
        };
        assert!(big.validate().is_err());
        let big = Policy {
            write_bypass_kib: WRITE_BYPASS_MAX_KIB + 1,
            ..p
        };
        assert!(big.validate().is_err());
        assert_eq!(p.with_write_bypass(Some(64)).write_bypass_kib, 64);
        assert_eq!(
            Policy::new_default().write_bypass_kib,
            WRITE_BYPASS_DEFAULT_KIB
        );
    }
}
