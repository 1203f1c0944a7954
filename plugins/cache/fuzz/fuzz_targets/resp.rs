//! Fuzz the RESP parser: arbitrary bytes must never panic, never allocate beyond the limits,
//! and any frame that parses must re-encode to the bytes it consumed (for non-inline input).
#![no_main]

use dsys_plugin_cache::{encode, frame_len, parse_command, parse_frame, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let small = Limits {
        max_bulk: 1024,
        max_array: 64,
        max_line: 256,
        max_depth: 8,
    };
    for limits in [Limits::default(), small] {
        // Delimiting a frame without building it (how relayed replies are split) agrees
        // with parsing it.
        let parsed = parse_frame(data, &limits);
        let delimited = frame_len(data, &limits);
        match (&parsed, &delimited) {
            (Ok(Some((_, a))), Ok(Some(b))) => assert_eq!(a, b),
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
            _ => panic!("parse_frame {parsed:?} but frame_len {delimited:?}"),
        }
        if let Ok(Some((frame, used))) = parsed {
            assert!(used <= data.len());
            let mut out = Vec::new();
            encode(&frame, &mut out);
            // Re-encoding is canonical, so it parses back to the same frame.
            let again = parse_frame(&out, &limits).expect("re-encoded frame parses");
            assert_eq!(again, Some((frame, out.len())));
        }
        // Feed the input as a connection would: command after command.
        let mut rest = data;
        while let Ok(Some((_, used))) = parse_command(rest, &limits) {
            assert!(used > 0 && used <= rest.len());
            rest = &rest[used..];
        }
    }
});
