//! The `pcache` command line.
fn main() {}
