//! The WAL record format, pure and unit-tested.
//!
//! ```text
//! +-----------+-----------+--------+-----------+------------------+
//! | len: u32  | crc: u32  | type:u8| lsn: u64  | payload: len B   |
//! +-----------+-----------+--------+-----------+------------------+
//!   little-endian; crc = CRC32C(type || lsn || payload)
//! ```
//!
//! `len` counts payload bytes only, so a record takes `HEADER_BYTES + len` bytes. The length
//! is not itself covered by the CRC, but a wrong length makes the CRC run over the wrong bytes,
//! which the check catches (with probability 1 - 2^-32), and a length above the format's hard
//! cap or beyond the end of the file is refused before anything is allocated.

use super::crc32c::Crc32c;

/// Bytes before the payload: length, CRC, type, LSN.
pub const RECORD_HEADER_BYTES: usize = 4 + 4 + 1 + 8;

/// The format's hard cap on one payload (1 GiB). Recovery treats a larger length as
/// corruption whatever `max_record_bytes` the log was opened with, so lowering that setting
/// never makes older, valid records look corrupt.
pub const MAX_RECORD_BYTES_LIMIT: u32 = 1 << 30;

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Log sequence number: dense, starting at 1.
    pub lsn: u64,
    /// Caller-defined record type.
    pub kind: u8,
    /// Caller's bytes.
    pub payload: Vec<u8>,
}

/// Bytes `payload_len` takes on disk.
pub(crate) fn encoded_len(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + payload_len
}

fn checksum(kind: u8, lsn: u64, payload: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(&[kind]);
    c.update(&lsn.to_le_bytes());
    c.update(payload);
    c.finish()
}

/// Append the encoding of one record to `buf`. The caller has checked the payload length
/// against the configured limit (which is at most [`MAX_RECORD_BYTES_LIMIT`]).
pub(crate) fn encode_into(buf: &mut Vec<u8>, kind: u8, lsn: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.reserve(encoded_len(payload.len()));
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(kind, lsn, payload).to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// A decoded fixed-size header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) len: u32,
    pub(crate) crc: u32,
    pub(crate) kind: u8,
    pub(crate) lsn: u64,
}

/// Parse a header from exactly [`RECORD_HEADER_BYTES`] bytes.
pub(crate) fn parse_header(h: &[u8; RECORD_HEADER_BYTES]) -> Header {
    Header {
        len: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        crc: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
        kind: h[8],
        lsn: u64::from_le_bytes([h[9], h[10], h[11], h[12], h[13], h[14], h[15], h[16]]),
    }
}

/// Whether `payload` matches the header's CRC.
pub(crate) fn crc_ok(h: &Header, payload: &[u8]) -> bool {
    checksum(h.kind, h.lsn, payload) == h.crc
}

/// Why the bytes at some offset are not the next valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// Fewer bytes than a header remain (a torn header).
    ShortHeader {
        /// Bytes left.
        have: usize,
    },
    /// The length is above the format's hard cap.
    BadLength(u32),
    /// The length runs past the end of the data (a torn payload).
    ShortPayload {
        /// Payload length claimed.
        len: u32,
        /// Bytes left after the header.
        have: usize,
    },
    /// The CRC does not match.
    BadCrc,
    /// An all-zero header (the pre-filled space after the last record), but other bytes
    /// after it: data was lost in the middle of what was written.
    DataAfterZeros,
    /// A valid record, but not the LSN expected next.
    WrongLsn {
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::ShortHeader { have } => write!(f, "torn header ({have} bytes)"),
            Invalid::BadLength(l) => write!(f, "bad length {l}"),
            Invalid::ShortPayload { len, have } => {
                write!(f, "length {len} beyond end of file ({have} bytes left)")
            }
            Invalid::BadCrc => write!(f, "CRC mismatch"),
            Invalid::DataAfterZeros => write!(f, "zeroed record followed by data"),
            Invalid::WrongLsn { expected, found } => {
                write!(f, "LSN {found} where {expected} was expected")
            }
        }
    }
}

/// Decode the record at the start of `buf`, which must be LSN `expected`. Returns the record
/// and the bytes it took. Total: never panics, whatever `buf` holds. (The log itself reads
/// with the streaming twin `segment::read_next`; this slice form states the format for tests.)
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn decode(buf: &[u8], expected: u64) -> Result<(Record, usize), Invalid> {
    let Some(hbytes) = buf.first_chunk::<RECORD_HEADER_BYTES>() else {
        return Err(Invalid::ShortHeader { have: buf.len() });
    };
    let h = parse_header(hbytes);
    if h.len > MAX_RECORD_BYTES_LIMIT {
        return Err(Invalid::BadLength(h.len));
    }
    let rest = &buf[RECORD_HEADER_BYTES..];
    let Some(payload) = rest.get(..h.len as usize) else {
        return Err(Invalid::ShortPayload {
            len: h.len,
            have: rest.len(),
        });
    };
    if !crc_ok(&h, payload) {
        return Err(Invalid::BadCrc);
    }
    if h.lsn != expected {
        return Err(Invalid::WrongLsn {
            expected,
            found: h.lsn,
        });
    }
    Ok((
        Record {
            lsn: h.lsn,
            kind: h.kind,
            payload: payload.to_vec(),
        },
        encoded_len(payload.len()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(kind: u8, lsn: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        encode_into(&mut b, kind, lsn, payload);
        b
    }

    #[test]
    fn layout_is_as_documented() {
        let b = enc(7, 0x0102_0304_0506_0708, b"hi");
        assert_eq!(b.len(), RECORD_HEADER_BYTES + 2);
        assert_eq!(&b[0..4], &2u32.to_le_bytes());
        let mut crc_input = vec![7u8];
        crc_input.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        crc_input.extend_from_slice(b"hi");
        assert_eq!(
            &b[4..8],
            &crate::storage::crc32c::crc32c(&crc_input).to_le_bytes()
        );
        assert_eq!(b[8], 7);
        assert_eq!(&b[9..17], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[17..], b"hi");
    }

    #[test]
    fn round_trip_and_empty_payload() {
        for p in [&b""[..], b"x", &[0u8; 4096][..]] {
            let b = enc(1, 42, p);
            let (r, n) = decode(&b, 42).expect("valid");
            assert_eq!(n, b.len());
            assert_eq!(r.payload, p);
            assert_eq!(r.kind, 1);
            assert_eq!(r.lsn, 42);
        }
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let b = enc(1, 5, b"payload");
        assert_eq!(decode(&b[..3], 5), Err(Invalid::ShortHeader { have: 3 }));
        assert_eq!(
            decode(&b[..RECORD_HEADER_BYTES + 2], 5),
            Err(Invalid::ShortPayload { len: 7, have: 2 })
        );
        let mut c = b.clone();
        c[RECORD_HEADER_BYTES] ^= 1;
        assert_eq!(decode(&c, 5), Err(Invalid::BadCrc));
        let mut c = b.clone();
        c[8] ^= 1; // type is covered by the CRC
        assert_eq!(decode(&c, 5), Err(Invalid::BadCrc));
        let mut c = b.clone();
        c[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&c, 5), Err(Invalid::BadLength(u32::MAX)));
        assert_eq!(
            decode(&b, 6),
            Err(Invalid::WrongLsn {
                expected: 6,
                found: 5
            })
        );
        // A zero-filled tail (preallocated or half-written block) is not a record.
        assert!(decode(&[0u8; 64], 1).is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200), exp in any::<u64>()) {
            let _ = decode(&bytes, exp);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 0..100), bit in any::<usize>()) {
            let b = enc(3, 9, &payload);
            let mut c = b.clone();
            let bit = bit % (c.len() * 8);
            c[bit / 8] ^= 1 << (bit % 8);
            // Either refused, or (a flip in the length that still decodes) a different record:
            // never the original one silently altered.
            match decode(&c, 9) {
                Err(_) => {}
                Ok((r, _)) => prop_assert!(false, "flip at bit {bit} accepted: {r:?}"),
            }
        }
    }
}
