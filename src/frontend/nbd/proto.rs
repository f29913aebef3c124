//! NBD wire format: constants, message encoding and decoding, and request validation.
//!
//! Everything here is pure (no sockets, no threads) so the server loop stays small and the
//! checks a hostile client can reach are easy to read in one place. Invariants: decoding never
//! panics and never allocates more than the caller-supplied bound; every multi-byte field is
//! big-endian ("network byte order") as the protocol requires; a request either validates into
//! a [`Command`] whose range lies inside the export and is aligned to the block size, or yields
//! the NBD error code to reply with.
//!
//! The fixed-newstyle handshake, simple replies and structured replies (for READ only:
//! a read of all-zero data is answered with a hole chunk, no data on the wire; other
//! commands keep simple replies, as the protocol allows) are implemented; extended
//! headers, metadata contexts and TLS are refused during option haggling, so clients fall
//! back to the subset below.

use std::io;

/// `NBDMAGIC`: first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows [`NBDMAGIC`] in newstyle negotiation and prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission-phase request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Chunk flag: the last chunk of its request's reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Chunk types used here.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types of `NBD_REP_INFO` (`NBD_OPT_INFO` / `NBD_OPT_GO`).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// NBD error values (the protocol fixes them to the Linux errno numbers).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload accepted, and the maximum block size advertised: the
/// interoperability limit of the spec (2^25), which also bounds the per-connection buffer.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload read into memory. Names are at most 4096 bytes, so any legitimate
/// option fits; larger ones are skipped without being buffered and refused with TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Transmission request header length.
pub const REQUEST_LEN: usize = 28;
/// Option request header length (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// A transmission-phase request header, as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Decodes a header; `None` when the magic is wrong, after which nothing else the client
    /// sends can be framed, so the caller must drop the connection.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        })
    }

    /// Encodes a header (used by tests and tools that act as a client).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire. Only WRITE carries one (without
    /// extended headers); it must be consumed even when the request is refused, or the next
    /// header would be read from the middle of the payload.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// A validated command: ranges are inside the export and block-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        off: u64,
        len: u32,
    },
    Write {
        off: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        off: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        off: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
    Disc,
}

/// What a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Minimum block size: offsets and lengths must be multiples of it (never 0).
    pub block: u32,
    /// Largest READ/WRITE length.
    pub max_payload: u32,
    pub read_only: bool,
}

/// Validates a request. `Err` carries the NBD error to reply with; the connection stays up.
///
/// Check order is: command known, length bound (before anything is buffered), alignment,
/// range, then write permission, so an out-of-range write on a read-only export reports the
/// range problem like it would on a writable one.
pub fn validate(req: &Request, lim: &Limits) -> Result<Command, u32> {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let writes = match req.kind {
        CMD_READ => false,
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => true,
        CMD_FLUSH => return Ok(Command::Flush),
        CMD_DISC => return Ok(Command::Disc),
        // CACHE, BLOCK_STATUS, RESIZE and anything newer are not advertised.
        _ => return Err(EINVAL),
    };
    let payload = matches!(req.kind, CMD_READ | CMD_WRITE);
    if payload && req.len > lim.max_payload {
        return Err(EINVAL);
    }
    let block = u64::from(lim.block.max(1));
    let len = u64::from(req.len);
    if req.offset % block != 0 || len % block != 0 {
        return Err(EINVAL);
    }
    let in_range = req
        .offset
        .checked_add(len)
        .is_some_and(|end| end <= lim.size);
    if !in_range {
        // The spec asks for ENOSPC on writes past the end, EINVAL on reads and trims.
        return Err(if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        });
    }
    if writes && lim.read_only {
        return Err(EPERM);
    }
    let off = req.offset;
    Ok(match req.kind {
        CMD_READ => Command::Read { off, len: req.len },
        CMD_WRITE => Command::Write {
            off,
            len: req.len,
            fua,
        },
        CMD_TRIM => Command::Trim { off, len, fua },
        _ => Command::WriteZeroes {
            off,
            len,
            may_trim: req.flags & CMD_FLAG_NO_HOLE == 0,
            fua,
        },
    })
}

/// Header of a simple reply; READ data follows it when `error` is 0.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Bytes of a structured chunk header.
const CHUNK_LEN: usize = 20;
/// Bytes a structured read reply needs at least, whatever its data: a hole chunk
/// (header, offset, size) is the largest reply without data.
pub const READ_REPLY_MIN: usize = CHUNK_LEN + 12;

/// Bytes in front of a READ's data: the simple reply's header, or an OFFSET_DATA chunk's
/// header and offset.
pub const fn read_head_len(structured: bool) -> usize {
    if structured {
        CHUNK_LEN + 8
    } else {
        16
    }
}

fn chunk_header(b: &mut [u8], ty: u16, cookie: u64, len: u32) {
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
}

/// Writes the reply to a READ of `len` bytes at `off` into `room`, whose data (when
/// `errno` is 0) already sits at `room[read_head_len(structured)..][..len]` unless `zero`
/// (the caller found or was told the data is all zero) says it was not written there,
/// and returns how many bytes of `room` to send. `room` holds at least
/// `read_head_len + len` and `READ_REPLY_MIN` bytes. Simple: the header, then the data
/// (zeros for `zero`; none on error). Structured (one chunk, flagged DONE): ERROR (the
/// errno, no message) on error, NONE for an empty read, OFFSET_HOLE for `zero` (12 bytes
/// instead of `len`), else OFFSET_DATA.
pub fn read_reply(
    room: &mut [u8],
    structured: bool,
    cookie: u64,
    off: u64,
    len: usize,
    errno: u32,
    zero: bool,
) -> usize {
    let head = read_head_len(structured);
    if zero && errno == 0 && len > 0 {
        if structured {
            return hole_reply(room, cookie, off, len);
        }
        room[head..head + len].fill(0);
    }
    if !structured {
        room[..16].copy_from_slice(&simple_reply(errno, cookie));
        return if errno == 0 { head + len } else { head };
    }
    if errno != 0 {
        chunk_header(room, REPLY_TYPE_ERROR, cookie, 6);
        room[20..24].copy_from_slice(&errno.to_be_bytes());
        room[24..26].copy_from_slice(&0u16.to_be_bytes());
        return CHUNK_LEN + 6;
    }
    if len == 0 {
        chunk_header(room, REPLY_TYPE_NONE, cookie, 0);
        return CHUNK_LEN;
    }
    chunk_header(room, REPLY_TYPE_OFFSET_DATA, cookie, (8 + len) as u32);
    room[20..28].copy_from_slice(&off.to_be_bytes());
    head + len
}

/// Writes an OFFSET_HOLE chunk (flagged DONE) for `len` zero bytes at `off` into
/// `room[..READ_REPLY_MIN]`; returns its length.
fn hole_reply(room: &mut [u8], cookie: u64, off: u64, len: usize) -> usize {
    chunk_header(room, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    room[20..28].copy_from_slice(&off.to_be_bytes());
    room[28..32].copy_from_slice(&(len as u32).to_be_bytes());
    READ_REPLY_MIN
}

/// Header of an option reply; `len` bytes of data follow it.
pub fn option_reply_header(option: u32, reply: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Option request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> OptionHeader {
        OptionHeader {
            magic: be64(&b[0..8]),
            option: be32(&b[8..12]),
            len: be32(&b[12..16]),
        }
    }
}

/// Body of `NBD_OPT_INFO` / `NBD_OPT_GO`: the export name and the information types asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a [u8],
    pub infos: Vec<u16>,
}

impl<'a> InfoRequest<'a> {
    /// `None` when the lengths inside do not add up to exactly the option length
    /// (the spec's NBD_REP_ERR_INVALID case).
    pub fn parse(data: &'a [u8]) -> Option<InfoRequest<'a>> {
        let name_len = usize::try_from(be32(data.get(0..4)?)).ok()?;
        let name_end = 4usize.checked_add(name_len)?;
        let name = data.get(4..name_end)?;
        let count = usize::from(be16(data.get(name_end..name_end.checked_add(2)?)?));
        let rest = data.get(name_end + 2..)?;
        if rest.len() != count * 2 {
            return None;
        }
        let infos = rest.chunks_exact(2).map(be16).collect();
        Some(InfoRequest { name, infos })
    }
}

/// `NBD_INFO_EXPORT` payload.
pub fn info_export(size: u64, tflags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&tflags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` payload: the type then the string.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// Maps a device error to the NBD error sent to the client. The protocol only defines a
/// handful of values; anything else becomes EIO, which every client treats as a failed I/O.
pub fn errno_of(e: &io::Error) -> u32 {
    if let Some(code) = e.raw_os_error() {
        return match code {
            libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
            libc::EIO => EIO,
            libc::ENOMEM => ENOMEM,
            libc::EINVAL => EINVAL,
            // The spec asks servers to fold quota and file-size limits into ENOSPC.
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        };
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied => EPERM,
        io::ErrorKind::OutOfMemory => ENOMEM,
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

fn be16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        size: 1 << 20,
        block: 512,
        max_payload: MAX_PAYLOAD,
        read_only: false,
    };

    fn req(kind: u16, offset: u64, len: u32) -> Request {
        Request {
            flags: 0,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = req(CMD_WRITE, 4096, 512);
        assert_eq!(Request::parse(&r.encode()), Some(r));
        let mut b = r.encode();
        b[0] ^= 1;
        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn validation_errors() {
        assert_eq!(validate(&req(CMD_READ, 1 << 20, 512), &LIM), Err(EINVAL));
        assert_eq!(validate(&req(CMD_WRITE, 1 << 20, 512), &LIM), Err(ENOSPC));
        assert_eq!(
            validate(&req(CMD_WRITE_ZEROES, u64::MAX - 511, 512), &LIM),
            Err(ENOSPC)
        );
        assert_eq!(validate(&req(CMD_TRIM, 0, 513), &LIM), Err(EINVAL));
        assert_eq!(validate(&req(CMD_READ, 1, 512), &LIM), Err(EINVAL));
        assert_eq!(
            validate(&req(CMD_READ, 0, MAX_PAYLOAD + 512), &LIM),
            Err(EINVAL)
        );
        assert_eq!(validate(&req(CMD_BLOCK_STATUS, 0, 512), &LIM), Err(EINVAL));
        assert_eq!(validate(&req(99, 0, 0), &LIM), Err(EINVAL));
        let ro = Limits {
            read_only: true,
            ..LIM
        };
        assert_eq!(validate(&req(CMD_TRIM, 0, 512), &ro), Err(EPERM));
        assert!(validate(&req(CMD_READ, 0, 512), &ro).is_ok());
    }

    #[test]
    fn validation_accepts() {
        assert_eq!(
            validate(&req(CMD_READ, (1 << 20) - 512, 512), &LIM),
            Ok(Command::Read {
                off: (1 << 20) - 512,
                len: 512
            })
        );
        let mut z = req(CMD_WRITE_ZEROES, 0, 1 << 20);
        z.flags = CMD_FLAG_NO_HOLE | CMD_FLAG_FUA;
        assert_eq!(
            validate(&z, &LIM),
            Ok(Command::WriteZeroes {
                off: 0,
                len: 1 << 20,
                may_trim: false,
                fua: true
            })
        );
        assert_eq!(validate(&req(CMD_FLUSH, 5, 3), &LIM), Ok(Command::Flush));
    }

    #[test]
    fn info_request_parsing() {
        let mut d = vec![0, 0, 0, 3];
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&[0, 2, 0, 3, 0, 1]);
        let r = InfoRequest::parse(&d).unwrap();
        assert_eq!(r.name, b"abc");
        assert_eq!(r.infos, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // Count disagrees with the length, name longer than the data, truncated header.
        assert!(InfoRequest::parse(&d[..d.len() - 1]).is_none());
        assert!(InfoRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_none());
        assert!(InfoRequest::parse(&[0, 0]).is_none());
    }

    #[test]
    fn errno_mapping() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(errno_of(&os(libc::EDQUOT)), ENOSPC);
        assert_eq!(errno_of(&os(libc::EROFS)), EPERM);
        assert_eq!(errno_of(&os(libc::ESHUTDOWN)), ESHUTDOWN);
        assert_eq!(errno_of(&os(libc::EBADF)), EIO);
        assert_eq!(errno_of(&io::Error::other("x")), EIO);
        assert_eq!(
            errno_of(&io::Error::from(io::ErrorKind::Unsupported)),
            ENOTSUP
        );
    }
}
