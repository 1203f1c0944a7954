//! How Redis reads an integer, from an argument or from a stored value (its `string2ll`):
//! only the canonical decimal spelling of a signed 64-bit integer is one. No sign but a
//! leading `-`, no leading zeros (except `0` itself), no `-0`, no spaces, nothing after the
//! digits, no overflow. Everything in this crate that reads a number goes through here, so
//! INCR on `"041"` is an error exactly as on redis-server.

/// The integer `b` spells, if `b` is its canonical decimal form (what `i64::to_string`
/// writes); `None` otherwise.
pub(crate) fn parse_i64(b: &[u8]) -> Option<i64> {
    let (negative, digits) = match b.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, b),
    };
    match digits {
        [b'0'] if !negative => return Some(0),
        // "-0", "00", "01", "-", "": a zero may only stand alone, and a sign needs digits.
        [b'1'..=b'9', ..] => {}
        _ => return None,
    }
    // Accumulate downwards: the negative range is one larger, so i64::MIN parses too.
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    if negative {
        Some(n)
    } else {
        n.checked_neg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Each row: the text, and what Redis 7.0 reads it as (checked with INCRBY k <text> on
    /// redis-server 7.0.15).
    #[test]
    fn redis_reading_table() {
        let table: &[(&str, Option<i64>)] = &[
            ("0", Some(0)),
            ("1", Some(1)),
            ("-1", Some(-1)),
            ("42", Some(42)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-9223372036854775809", None),
            ("99999999999999999999", None),
            ("00000000000000000001", None),
            ("041", None),
            ("01", None),
            ("00", None),
            ("-0", None),
            ("-01", None),
            ("+1", None),
            ("-", None),
            ("", None),
            (" 1", None),
            ("1 ", None),
            ("1.5", None),
            ("1e3", None),
            ("0x10", None),
            ("1\0", None),
            ("١", None),
        ];
        for (text, want) in table {
            assert_eq!(parse_i64(text.as_bytes()), *want, "{text:?}");
        }
    }

    proptest! {
        #[test]
        fn every_integer_reads_back(n in any::<i64>()) {
            prop_assert_eq!(parse_i64(n.to_string().as_bytes()), Some(n));
        }

        #[test]
        fn only_canonical_text_is_a_number(b in proptest::collection::vec(
            prop_oneof![Just(b'0'), Just(b'1'), Just(b'9'), Just(b'-'), Just(b'+'), Just(b' '), any::<u8>()],
            0..24,
        )) {
            if let Some(n) = parse_i64(&b) {
                prop_assert_eq!(n.to_string().into_bytes(), b);
            }
        }
    }
}
