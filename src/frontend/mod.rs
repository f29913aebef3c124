//! Front ends that export a cached device to clients.

pub mod nbd;
