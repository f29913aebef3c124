//! The cache engine: dm-pcache's write-back cache as a deterministic sans-I/O library.
#![forbid(unsafe_code)]

pub mod pmem;
pub use pmem::Pmem;
