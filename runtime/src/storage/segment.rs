//! Segment files and crash recovery.
//!
//! The log is a folder of segment files `wal-<first lsn, 20 digits>.log`, each a plain
//! sequence of records (see `record`). Recovery scans them in LSN order and keeps the longest
//! valid prefix: the first torn or corrupt record (short header, length over the format's
//! cap, length past the end of the file, CRC mismatch, LSN other than the next one) is where
//! the log ends. That segment is truncated there (and fsynced) and every later segment is
//! deleted, so the log never has a hole. Nothing in here panics on any file content.
//!
//! The writer pre-fills the active segment with zeros ahead of its records (see `wal`), so a
//! segment may end in zeros. An all-zero header (LSN 0, which no record has) followed by
//! nothing but zeros to the end of the file is a clean end and stays in place; an all-zero
//! header followed by any other byte is damage like any other, and is cut.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::WalError;
use super::record::{self, Header, Invalid, MAX_RECORD_BYTES_LIMIT, RECORD_HEADER_BYTES};

/// File name of the segment whose first record is `first_lsn`.
pub(crate) fn segment_name(first_lsn: u64) -> String {
    format!("wal-{first_lsn:020}.log")
}

/// The first LSN encoded in a segment file name, if it is one (LSN 0 is never valid).
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&l| l > 0)
}

/// One segment as the log tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentMeta {
    pub(crate) first_lsn: u64,
    pub(crate) path: PathBuf,
    pub(crate) len: u64,
}

/// Segment files in `dir`, ordered by first LSN. Other files are ignored.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let rd = std::fs::read_dir(dir).map_err(|e| WalError::io("list", dir, e))?;
    let mut v = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| WalError::io("list", dir, e))?;
        if let Some(lsn) = ent.file_name().to_str().and_then(parse_segment_name) {
            v.push((lsn, ent.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// fsync a folder, so that file creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io("fsync folder", dir, e))
}

/// The result of reading the next record from a segment.
#[derive(Debug)]
pub(crate) enum Next {
    /// A valid record; its payload is in the caller's buffer.
    Record(Header),
    /// Clean end of the data.
    End,
    /// An all-zero header: the pre-filled space after the last record (if only zeros follow).
    Zeros,
    /// Not a valid record.
    Invalid(Invalid),
}

/// Read until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Read the record at the reader's position, which has `remaining` bytes of file after it and
/// must carry LSN `expected`. The payload lands in `payload`. Allocates at most `remaining`.
pub(crate) fn read_next<R: Read>(
    r: &mut R,
    remaining: u64,
    expected: u64,
    payload: &mut Vec<u8>,
) -> std::io::Result<Next> {
    if remaining == 0 {
        return Ok(Next::End);
    }
    let mut hb = [0u8; RECORD_HEADER_BYTES];
    let got = read_full(r, &mut hb)?;
    // Zeros, even fewer than a header's worth at the very end, are the writer's pre-filled
    // space (or a torn header that wrote only zeros, which is the same: no record).
    if hb[..got].iter().all(|&b| b == 0) {
        return Ok(Next::Zeros);
    }
    if got < RECORD_HEADER_BYTES {
        return Ok(Next::Invalid(Invalid::ShortHeader { have: got }));
    }
    let h = record::parse_header(&hb);
    if h.len > MAX_RECORD_BYTES_LIMIT {
        return Ok(Next::Invalid(Invalid::BadLength(h.len)));
    }
    let left = remaining - RECORD_HEADER_BYTES as u64;
    if u64::from(h.len) > left {
        return Ok(Next::Invalid(Invalid::ShortPayload {
            len: h.len,
            have: usize::try_from(left).unwrap_or(usize::MAX),
        }));
    }
    payload.clear();
    payload.resize(h.len as usize, 0);
    let got = read_full(r, payload)?;
    if got < payload.len() {
        // The file shrank under us: treat as torn.
        return Ok(Next::Invalid(Invalid::ShortPayload {
            len: h.len,
            have: got,
        }));
    }
    if !record::crc_ok(&h, payload) {
        return Ok(Next::Invalid(Invalid::BadCrc));
    }
    if h.lsn != expected {
        return Ok(Next::Invalid(Invalid::WrongLsn {
            expected,
            found: h.lsn,
        }));
    }
    Ok(Next::Record(h))
}

/// Whether everything left in `r` is zero bytes.
fn only_zeros<R: Read>(r: &mut R) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = read_full(r, &mut buf)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        if n < buf.len() {
            return Ok(true);
        }
    }
}

/// What one segment holds.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Valid records.
    pub(crate) records: u64,
    /// Bytes of valid records (the offset where the valid prefix ends).
    pub(crate) valid_bytes: u64,
    /// File length.
    pub(crate) file_len: u64,
    /// The LSN after the last valid record.
    pub(crate) next_lsn: u64,
    /// Where and why the valid prefix ends before the end of the file.
    pub(crate) invalid: Option<(u64, Invalid)>,
}

/// Scan one segment whose first record must be `first_lsn`, checking every record.
pub(crate) fn scan_segment(path: &Path, first_lsn: u64) -> Result<Scan, WalError> {
    let f = File::open(path).map_err(|e| WalError::io("open", path, e))?;
    let file_len = f
        .metadata()
        .map_err(|e| WalError::io("stat", path, e))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut pos = 0u64;
    let mut next = first_lsn;
    let mut records = 0u64;
    let mut buf = Vec::new();
    loop {
        match read_next(&mut r, file_len - pos, next, &mut buf)
            .map_err(|e| WalError::io("read", path, e))?
        {
            Next::Record(h) => {
                pos += record::encoded_len(h.len as usize) as u64;
                next += 1;
                records += 1;
            }
            Next::Zeros => {
                let rest_zero = only_zeros(&mut r).map_err(|e| WalError::io("read", path, e))?;
                return Ok(Scan {
                    records,
                    valid_bytes: pos,
                    file_len,
                    next_lsn: next,
                    invalid: (!rest_zero).then_some((pos, Invalid::DataAfterZeros)),
                });
            }
            Next::End => {
                return Ok(Scan {
                    records,
                    valid_bytes: pos,
                    file_len,
                    next_lsn: next,
                    invalid: None,
                })
            }
            Next::Invalid(why) => {
                return Ok(Scan {
                    records,
                    valid_bytes: pos,
                    file_len,
                    next_lsn: next,
                    invalid: Some((pos, why)),
                })
            }
        }
    }
}

/// What recovery found and what it cut. Returned by `Wal::open`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalRecovery {
    /// First LSN in the log (equal to `last_lsn + 1` when the log is empty).
    pub first_lsn: u64,
    /// Last valid LSN (0 when the log has never held a record).
    pub last_lsn: u64,
    /// Valid records found.
    pub records: u64,
    /// Segment files kept.
    pub segments: usize,
    /// Bytes cut: the torn or corrupt tail plus every dropped segment.
    pub truncated_bytes: u64,
    /// Segment files deleted because they came after the end of the valid prefix.
    pub dropped_segments: Vec<String>,
    /// Where the valid prefix ended early and why, e.g.
    /// `wal-00000000000000000001.log @ 4096: CRC mismatch`.
    pub cut: Option<String>,
    /// The durable checkpoint LSN found (0 if none).
    pub checkpoint_lsn: u64,
    /// Segments removed because a checkpoint had already released them (an interrupted
    /// checkpoint completed).
    pub checkpointed_segments_removed: usize,
}

/// Recover the segments of `dir`: keep the valid prefix, cut the rest. Returns the report,
/// the kept segments (the last one is the one to append to), and the next LSN.
pub(crate) fn recover(
    dir: &Path,
    checkpoint_lsn: u64,
) -> Result<(WalRecovery, Vec<SegmentMeta>, u64), WalError> {
    let found = list_segments(dir)?;
    let mut rep = WalRecovery {
        checkpoint_lsn,
        ..WalRecovery::default()
    };
    let mut kept: Vec<SegmentMeta> = Vec::new();
    let mut expected: Option<u64> = None;
    let mut changed = false;
    let mut stop = false;
    for (first, path) in found {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if stop {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
            rep.truncated_bytes += len;
            rep.dropped_segments.push(name);
            changed = true;
            continue;
        }
        if let Some(exp) = expected {
            if first != exp {
                // A hole or an overlap: the log ends at the previous segment.
                rep.cut = Some(format!("{name}: starts at LSN {first}, expected {exp}"));
                stop = true;
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
                rep.truncated_bytes += len;
                rep.dropped_segments.push(name);
                changed = true;
                continue;
            }
        }
        let scan = scan_segment(&path, first)?;
        rep.records += scan.records;
        expected = Some(scan.next_lsn);
        if let Some((off, why)) = scan.invalid {
            rep.cut = Some(format!("{name} @ {off}: {why}"));
            rep.truncated_bytes += scan.file_len - off;
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| WalError::io("open", &path, e))?;
            f.set_len(off)
                .map_err(|e| WalError::io("truncate", &path, e))?;
            f.sync_all().map_err(|e| WalError::io("fsync", &path, e))?;
            stop = true;
            changed = true;
        }
        kept.push(SegmentMeta {
            first_lsn: first,
            path,
            len: scan.valid_bytes,
        });
    }
    // Complete an interrupted checkpoint: segments wholly below it are no longer needed.
    // The last segment always stays: it carries the next LSN in its name.
    while kept.len() > 1 && kept[1].first_lsn <= checkpoint_lsn {
        let s = kept.remove(0);
        std::fs::remove_file(&s.path).map_err(|e| WalError::io("remove", &s.path, e))?;
        rep.records -= kept[0].first_lsn - s.first_lsn;
        rep.checkpointed_segments_removed += 1;
        changed = true;
    }
    if changed {
        sync_dir(dir)?;
    }
    let next = expected.unwrap_or_else(|| checkpoint_lsn.max(1));
    rep.first_lsn = kept.first().map(|s| s.first_lsn).unwrap_or(next);
    rep.last_lsn = next - 1;
    rep.segments = kept.len();
    Ok((rep, kept, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_lookalikes() {
        assert_eq!(segment_name(1), "wal-00000000000000000001.log");
        assert_eq!(parse_segment_name(&segment_name(1)), Some(1));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        for bad in [
            "wal-00000000000000000000.log",
            "wal-1.log",
            "wal-0000000000000000000x.log",
            "wal-00000000000000000001.log.tmp",
            "xwal-00000000000000000001.log",
            "wal-+0000000000000000001.log",
            "checkpoint",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    fn write_records(path: &Path, first: u64, n: u64) -> Vec<u64> {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for i in 0..n {
            record::encode_into(&mut buf, 1, first + i, format!("r{}", first + i).as_bytes());
            ends.push(buf.len() as u64);
        }
        std::fs::write(path, &buf).expect("write");
        ends
    }

    #[test]
    fn torn_tail_is_cut_and_later_segments_dropped() {
        let d = tempfile::tempdir().expect("tmp");
        let a = d.path().join(segment_name(1));
        let ends = write_records(&a, 1, 10);
        let b = d.path().join(segment_name(11));
        write_records(&b, 11, 5);
        // Cut the first segment in the middle of record 8's payload.
        let cut_at = ends[7] - 2;
        let f = OpenOptions::new().write(true).open(&a).expect("open");
        f.set_len(cut_at).expect("truncate");
        let (rep, kept, next) = recover(d.path(), 0).expect("recover");
        assert_eq!(rep.records, 7);
        assert_eq!(rep.last_lsn, 7);
        assert_eq!(next, 8);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].len, ends[6]);
        assert_eq!(rep.dropped_segments, vec![segment_name(11)]);
        assert!(rep.cut.is_some());
        assert_eq!(std::fs::metadata(&a).expect("stat").len(), ends[6]);
        assert!(!b.exists());
    }

    #[test]
    fn zeros_after_the_records_are_a_clean_end_and_data_after_them_is_cut() {
        let d = tempfile::tempdir().expect("tmp");
        let a = d.path().join(segment_name(1));
        let ends = write_records(&a, 1, 6);
        let mut bytes = std::fs::read(&a).expect("read");
        // Fewer zeros than a header: still the end, nothing cut.
        let mut short = bytes.clone();
        short.resize(bytes.len() + 5, 0);
        std::fs::write(&a, &short).expect("write");
        let (rep, _, next) = recover(d.path(), 0).expect("recover");
        assert_eq!(
            (next, rep.truncated_bytes, rep.cut.as_deref()),
            (7, 0, None)
        );
        bytes.resize(bytes.len() + 5000, 0);
        std::fs::write(&a, &bytes).expect("write");
        // Pre-filled zeros: nothing cut, the zeros stay for the writer to fill.
        let (rep, kept, next) = recover(d.path(), 0).expect("recover");
        assert_eq!((rep.records, next, rep.truncated_bytes), (6, 7, 0));
        assert_eq!((rep.cut.as_deref(), kept[0].len), (None, ends[5]));
        assert_eq!(
            std::fs::metadata(&a).expect("stat").len(),
            bytes.len() as u64
        );
        // A record whose bytes were lost (zeros) with data after it: cut where the zeros start,
        // so that no later record (written but never made durable) comes back.
        let lost = ends[2] as usize..ends[3] as usize;
        bytes[lost].fill(0);
        std::fs::write(&a, &bytes).expect("write");
        let (rep, kept, next) = recover(d.path(), 0).expect("recover");
        assert_eq!((rep.records, next, kept[0].len), (3, 4, ends[2]));
        assert!(
            rep.cut.as_deref().unwrap_or("").contains("zeroed"),
            "{rep:?}"
        );
        assert_eq!(std::fs::metadata(&a).expect("stat").len(), ends[2]);
    }

    #[test]
    fn gap_between_segments_ends_the_log() {
        let d = tempfile::tempdir().expect("tmp");
        write_records(&d.path().join(segment_name(1)), 1, 3);
        write_records(&d.path().join(segment_name(5)), 5, 3);
        let (rep, kept, next) = recover(d.path(), 0).expect("recover");
        assert_eq!((rep.records, next, kept.len()), (3, 4, 1));
        assert_eq!(rep.dropped_segments.len(), 1);
    }

    #[test]
    fn segments_below_checkpoint_are_removed() {
        let d = tempfile::tempdir().expect("tmp");
        write_records(&d.path().join(segment_name(1)), 1, 3);
        write_records(&d.path().join(segment_name(4)), 4, 3);
        write_records(&d.path().join(segment_name(7)), 7, 3);
        let (rep, kept, next) = recover(d.path(), 7).expect("recover");
        assert_eq!(rep.checkpointed_segments_removed, 2);
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (rep.first_lsn, rep.last_lsn, rep.records, next),
            (7, 9, 3, 10)
        );
    }

    #[test]
    fn empty_folder_starts_at_one_or_after_checkpoint() {
        let d = tempfile::tempdir().expect("tmp");
        let (rep, kept, next) = recover(d.path(), 0).expect("recover");
        assert_eq!((rep.first_lsn, rep.last_lsn, next), (1, 0, 1));
        assert!(kept.is_empty());
        let (_, _, next) = recover(d.path(), 50).expect("recover");
        assert_eq!(next, 50);
    }
}
