//! What a reactor keeps of requests that are not answered yet: the reads and writes
//! in flight on its shared handle (by tag, with the client and cookie to answer, and a
//! write's range, which the client's overlapping requests wait for), and the WRITEs a
//! client has parked while the handle makes them wait (`reactor.rs` says the rules).

use std::time::Instant;

/// Reads and writes left in flight on the shared handle and not yet answered
/// (`BlockConn::start_read`, `BlockConn::try_write`).
#[derive(Default)]
pub(super) struct Reads {
    pub(super) next_tag: u64,
    pub(super) started: Vec<Started>,
}

pub(super) struct Started {
    pub(super) tag: u64,
    pub(super) client: u64,
    pub(super) cookie: u64,
    /// A write's range (offset, length); None for a read.
    pub(super) write: Option<(u64, u64)>,
}

impl Reads {
    /// Whether a write of `client` in flight overlaps `[off, off + len)`.
    pub(super) fn overlaps(&self, client: u64, off: u64, len: u64) -> bool {
        self.started.iter().any(|p| {
            p.client == client && p.write.is_some_and(|(o, l)| off < o + l && o < off + len)
        })
    }

    /// Records a request left in flight under the current tag.
    pub(super) fn start(&mut self, client: u64, cookie: u64, write: Option<(u64, u64)>) {
        self.started.push(Started {
            tag: self.next_tag,
            client,
            cookie,
            write,
        });
        self.next_tag += 1;
    }
}

/// A WRITE waiting on its reactor (`Client::parked`).
pub(super) struct Parked {
    pub(super) cookie: u64,
    pub(super) off: u64,
    pub(super) data: Vec<u8>,
    pub(super) fua: bool,
    /// When it was parked; None until it was first tried (it was parked behind others).
    pub(super) since: Option<Instant>,
}
