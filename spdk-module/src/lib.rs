//! `libspdk_bdev_pcache.so`, pcache's SPDK bdev module as SPDK apps load it
//! (`LD_PRELOAD=.../libspdk_bdev_pcache.so spdk_tgt ...`).
//!
//! Everything the module does lives in the pcache crate (`src/env/spdk`, feature
//! `spdk`); this crate only makes it a shared object: build.rs links SPDK and the
//! load-time constructor (c/load.c), which calls the entry point re-exported below.
//!
//! Invariants: no code and no `unsafe` here (test/tidy.rs checks it); the re-export keeps
//! pcache (and with it the entry point the constructor calls) linked into the cdylib.

pub use pcache::env::spdk::spdk_sys_module_load;
