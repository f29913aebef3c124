//! The runtime core: what both runtimes (the embedded one in `env::posix` and the SPDK
//! module in `env::spdk`) need around the engine, written once and sans-I/O.
//!
//! - `sched`: background scheduling rules: tick period, writeback backoff, the idle
//!   backing FLUSH for direct writes, when writeback runs, pacing overdraw, and how a
//!   window's items coalesce into backing requests and bounded waves.
//! - `direct`: the direct-write protocol (cache modes, cutoff): routing, when a backing
//!   FLUSH is owed before a request completes, and how it ends in the engine.
//! - `attach`: the attach and format rules and their refusals with advice.
//! - `options`: validation of the settings a user can give (gc_percent, cache mode,
//!   sequential cutoff) from the CLI, the control socket or JSON-RPC.
//!
//! Invariants: nothing here does I/O, reads a clock, spawns a thread or holds `unsafe`
//! (the tidy test enforces it, as for the engine); callers pass the time in
//! microseconds of their own monotonic clock. Imports point one way: engine <- runtime
//! <- env <- frontend <- bin.

pub mod attach;
pub mod direct;
pub mod options;
pub mod sched;
