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

/// Serde adapter for byte-buffer fields (`#[serde(with = "dsys_runtime::codec::bytes")]`):
/// a `Vec<u8>` is written as one byte string instead of a sequence of `u8`s. With bincode
/// the bytes on the wire are the same (a length, then the bytes), but encoding and decoding
/// are one copy instead of one serde call per byte, which matters for the bodies every RPC
/// carries and for plugins that ship batches as flat buffers.
pub mod bytes {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Serializer;

    /// Write `v` as one byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Read a byte string (or, from self-describing formats such as JSON, a list of bytes).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Never trust a declared size: grow with what actually arrives.
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// A byte buffer that serializes as one byte string (see [`bytes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ByteBuf(#[serde(with = "bytes")] pub Vec<u8>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_garbage() {
        let v = (String::from("abc"), 42u64, vec![1u8, 2, 3]);
        let b = encode(&v).expect("encode");
        let back: (String, u64, Vec<u8>) = decode(&b).unwrap();
        assert_eq!(back, v);
        // A claimed string length far larger than the buffer must error, not allocate.
        let evil = [0xfcu8, 0xff, 0xff, 0xff, 0x7f, b'a'];
        assert!(decode::<String>(&evil).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode::<(String, u64, Vec<u8>)>(&extra).is_err());
    }

    #[test]
    fn byte_strings_match_byte_vectors_on_the_wire() {
        let v = vec![0u8, 1, 200, 255, 7];
        let plain = encode(&v).expect("encode");
        let flat = encode(&ByteBuf(v.clone())).expect("encode");
        assert_eq!(plain, flat);
        assert_eq!(decode::<ByteBuf>(&plain).expect("decode").0, v);
        // A length beyond what the frame holds is refused, not allocated.
        assert!(decode::<ByteBuf>(&[0xfc, 0xff, 0xff, 0xff, 0x7f, 1]).is_err());
        let json = serde_json::to_string(&ByteBuf(v.clone())).expect("json");
        assert_eq!(serde_json::from_str::<ByteBuf>(&json).expect("json").0, v);
    }
}
