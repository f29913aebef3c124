//! The deterministic simulator: pmem that remembers which cache lines are durable, a
//! backing disk with a volatile write cache and fault injection, and a seeded RNG.
//! Everything here is reproducible from a seed.

pub mod disk;
pub mod pmem;
pub mod rng;
pub mod tiny;
pub mod world;
