//! The one place that turns messages into bytes: bincode 2 (serde mode, standard config).
//! A frame on the wire carries [`WIRE_VERSION`] in front of every body (see `transport`).

use serde::{de::DeserializeOwned, Serialize};

/// Version byte written in front of every frame; a peer speaking another version is refused.
pub const WIRE_VERSION: u8 = 1;

/// Encoding or decoding failed; the message says why.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("codec: {0}")]
pub struct CodecError(pub String);

fn cfg() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Serialize `v` to bytes.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(v, cfg()).map_err(|e| CodecError(e.to_string()))
}

/// Deserialize bytes produced by [`encode`]; trailing bytes are refused.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T, CodecError> {
    // The limit keeps a hostile length prefix inside a small frame from asking for a huge
    // allocation: no decoded value may claim more bytes than the frame has.
    let cfg = cfg().with_limit::<{ 64 * 1024 * 1024 }>();
    let (v, used) =
        bincode::serde::decode_from_slice(buf, cfg).map_err(|e| CodecError(e.to_string()))?;
    if used != buf.len() {
        return Err(CodecError(format!(
            "{} trailing bytes after message",
            buf.len() - used
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_garbage() {
        let v = (String::from("abc"), 42u64, vec![1u8, 2, 3]);
        let b = encode(&v).unwrap();
        let back: (String, u64, Vec<u8>) = decode(&b).unwrap();
        assert_eq!(back, v);
        // A claimed string length far larger than the buffer must error, not allocate.
        let evil = [0xfcu8, 0xff, 0xff, 0xff, 0x7f, b'a'];
        assert!(decode::<String>(&evil).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode::<(String, u64, Vec<u8>)>(&extra).is_err());
    }
}
