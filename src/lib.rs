//! pcache: a persistent-memory write-back cache for block devices.
//!
//! `engine` is the cache itself, a deterministic sans-I/O library with no `unsafe`;
//! `env` holds every environment it runs in (the simulator, the POSIX embedded runtime,
//! and with feature `spdk` the SPDK bdev module) and is the only place for `unsafe`;
//! `frontend` exports a cached device to clients (NBD).

pub mod engine;
pub mod env;
pub mod frontend;
pub mod runtime;
