//! The id layout, pure: a 64-bit integer whose top bit is always 0 (so it is also a positive
//! `i64`), then 41 bits of milliseconds since [`EPOCH_UNIX_MS`], 10 bits of worker id and 12
//! bits of sequence within the millisecond.
//!
//! ```text
//!  63  62                                        22 21          12 11           0
//! +---+--------------------------------------------+--------------+--------------+
//! | 0 |  milliseconds since 2024-01-01T00:00:00Z    |  worker id   |   sequence   |
//! +---+--------------------------------------------+--------------+--------------+
//! ```
//!
//! Ids sort by time first: an id made in a later millisecond is larger, whatever its worker.
//! Within one millisecond of one worker, ids are consecutive integers.

use serde::{Deserialize, Serialize};

/// The custom epoch: 2024-01-01T00:00:00Z in Unix milliseconds. 41 bits of milliseconds
/// last 2^41 ms = 69.7 years from it, i.e. until 2093-09-06T15:47:35.551Z.
pub const EPOCH_UNIX_MS: u64 = 1_704_067_200_000;
/// Bits of the timestamp.
pub const TIME_BITS: u32 = 41;
/// Bits of the worker id.
pub const WORKER_BITS: u32 = 10;
/// Bits of the sequence.
pub const SEQ_BITS: u32 = 12;
/// Largest timestamp (milliseconds since the epoch).
pub const MAX_TIME: u64 = (1 << TIME_BITS) - 1;
/// Number of worker ids (0..WORKERS).
pub const WORKERS: u16 = 1 << WORKER_BITS;
/// Ids per millisecond per worker (sequences 0..SEQ_PER_MS).
pub const SEQ_PER_MS: u32 = 1 << SEQ_BITS;
/// What the layout allows one worker to issue per second: 4096 per ms.
pub const MAX_IDS_PER_SEC: u64 = SEQ_PER_MS as u64 * 1000;

/// An id taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parts {
    /// Milliseconds since [`EPOCH_UNIX_MS`].
    pub time: u64,
    /// Worker id (0..1024).
    pub worker: u16,
    /// Sequence within the millisecond (0..4096).
    pub seq: u32,
}

impl Parts {
    /// Unix milliseconds of the id's timestamp.
    pub fn unix_ms(&self) -> u64 {
        self.time + EPOCH_UNIX_MS
    }
}

/// Why a value is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A part does not fit its bits.
    #[error("{what} {value} does not fit in {bits} bits")]
    OutOfRange {
        /// Which part.
        what: &'static str,
        /// Its value.
        value: u64,
        /// Its width.
        bits: u32,
    },
    /// The top bit is set: no generator makes such a value.
    #[error("{0} has its top bit set: not an id of this layout (ids are below 2^63)")]
    TopBit(u64),
}

/// Put the parts together.
pub fn encode(p: Parts) -> Result<u64, LayoutError> {
    if p.time > MAX_TIME {
        return Err(LayoutError::OutOfRange {
            what: "timestamp",
            value: p.time,
            bits: TIME_BITS,
        });
    }
    if p.worker >= WORKERS {
        return Err(LayoutError::OutOfRange {
            what: "worker id",
            value: p.worker.into(),
            bits: WORKER_BITS,
        });
    }
    if p.seq >= SEQ_PER_MS {
        return Err(LayoutError::OutOfRange {
            what: "sequence",
            value: p.seq.into(),
            bits: SEQ_BITS,
        });
    }
    Ok((p.time << (WORKER_BITS + SEQ_BITS)) | (u64::from(p.worker) << SEQ_BITS) | u64::from(p.seq))
}

/// Take an id apart.
pub fn decode(id: u64) -> Result<Parts, LayoutError> {
    if id >> 63 != 0 {
        return Err(LayoutError::TopBit(id));
    }
    Ok(Parts {
        time: id >> (WORKER_BITS + SEQ_BITS),
        worker: ((id >> SEQ_BITS) & u64::from(WORKERS - 1)) as u16,
        seq: (id & u64::from(SEQ_PER_MS - 1)) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode_round_trip(time in 0..=MAX_TIME, worker in 0..WORKERS, seq in 0..SEQ_PER_MS) {
            let p = Parts { time, worker, seq };
            let id = encode(p).expect("in range");
            prop_assert!(id < 1 << 63);
            prop_assert_eq!(decode(id).expect("an id"), p);
        }

        #[test]
        fn later_time_sorts_later(t in 0..MAX_TIME, w1 in 0..WORKERS, w2 in 0..WORKERS, s1 in 0..SEQ_PER_MS, s2 in 0..SEQ_PER_MS) {
            let a = encode(Parts { time: t, worker: w1, seq: s1 }).expect("a");
            let b = encode(Parts { time: t + 1, worker: w2, seq: s2 }).expect("b");
            prop_assert!(a < b);
        }
    }

    #[test]
    fn out_of_range_parts_and_top_bit_are_refused() {
        let ok = Parts {
            time: 5,
            worker: 3,
            seq: 7,
        };
        assert_eq!(encode(ok), Ok((5 << 22) | (3 << 12) | 7));
        assert!(encode(Parts {
            time: MAX_TIME + 1,
            ..ok
        })
        .is_err());
        assert!(encode(Parts {
            worker: WORKERS,
            ..ok
        })
        .is_err());
        assert!(encode(Parts {
            seq: SEQ_PER_MS,
            ..ok
        })
        .is_err());
        assert!(decode(u64::MAX).is_err());
        assert_eq!(decode((1 << 63) - 1).map(|p| p.time), Ok(MAX_TIME));
        assert_eq!(MAX_IDS_PER_SEC, 4_096_000);
    }
}
