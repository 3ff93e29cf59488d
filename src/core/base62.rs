//! Talos node IDs: jxskiss/base62 v1.1.0 `StdEncoding`.
//!
//! This is not big-integer base62. The encoder walks the input as one big-endian
//! bit string from its least-significant end, six bits per character, and packs
//! 6-bit values 30, 31, 62 and 63 into a 5-bit character (30 or 31) so every
//! character stays within the 62-letter alphabet. The first character therefore
//! encodes the lowest bits.
//!
//! Decoding a string produced by [`encode`] always yields the original bytes,
//! leading zero bytes included: the final character covers at most six bits, so
//! the decoder's trailing partial byte is exactly the input's first byte.

use std::fmt::Write as _;

const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A 6-bit value with bits 1-4 set (30, 31, 62, 63) is emitted as a 5-bit character.
const COMPACT_MASK: u8 = 0b01_1110;
const MASK_5_BITS: u8 = 0b01_1111;
const MASK_6_BITS: u8 = 0b11_1111;

/// Bytes of randomness in a Talos node ID.
pub const NODE_ID_BYTES: usize = 32;

/// Bytes of the decoded node ID that form `/etc/machine-id`.
const MACHINE_ID_BYTES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base62Error {
    #[error("invalid base62 character {character:?} at byte {index} (allowed: A-Z, a-z, 0-9)")]
    InvalidCharacter { index: usize, character: char },
    #[error(
        "node ID decodes to {len} bytes, a machine ID needs at least {MACHINE_ID_BYTES}; \
         is this a Talos node ID?"
    )]
    NodeIdTooShort { len: usize },
}

/// Encodes bytes with the jxskiss/base62 standard alphabet.
pub fn encode(src: &[u8]) -> String {
    let mut out = String::with_capacity(src.len() * 9 / 5 + 1);
    // Number of bits not yet consumed, counted from the front of `src`.
    let mut pos = src.len() * 8;
    while pos > 0 {
        let mut value = bits_below(src, pos);
        let mut width = 6;
        if value & COMPACT_MASK == COMPACT_MASK {
            // Upstream keeps the full 6-bit width when this is the last chunk and
            // the value already fits in 5 bits: nothing is left to carry the 6th bit.
            if pos > 6 || value > MASK_5_BITS {
                width = 5;
            }
            value &= MASK_5_BITS;
        }
        out.push(char::from(ALPHABET[usize::from(value)]));
        pos = pos.saturating_sub(width);
    }
    out
}

/// The (up to) six bits just before bit position `pos` (1 ..= 8 * src.len()).
fn bits_below(src: &[u8], pos: usize) -> u8 {
    let (mut index, mut used) = (pos / 8, pos % 8);
    if used == 0 {
        index -= 1;
        used = 8;
    }
    // `used` bits of src[index] lie before `pos`; they are its high bits.
    let mut value = src[index] >> (8 - used);
    if used < 6 && index > 0 {
        value |= src[index - 1] << used;
    }
    value & MASK_6_BITS
}

/// Decodes a jxskiss/base62 string. Any character outside the alphabet is an error.
pub fn decode(text: &str) -> Result<Vec<u8>, Base62Error> {
    let chars = text.as_bytes();
    let mut reversed = Vec::with_capacity(chars.len() * 6 / 8 + 1);
    // Bits waiting to form a byte, least-significant first; `pending` < 8 between
    // characters, so 14 bits at most are ever buffered.
    let mut buffer: u16 = 0;
    let mut pending: u32 = 0;
    for (index, &c) in chars.iter().enumerate() {
        let value = decode_char(c).ok_or_else(|| Base62Error::InvalidCharacter {
            index,
            // Everything before `index` was ASCII, so `index` is a char boundary.
            character: text[index..]
                .chars()
                .next()
                .unwrap_or(char::REPLACEMENT_CHARACTER),
        })?;
        let width = if index + 1 == chars.len() {
            // The last character carries only its significant bits.
            u8::BITS - value.leading_zeros()
        } else if value & COMPACT_MASK == COMPACT_MASK {
            5
        } else {
            6
        };
        buffer |= u16::from(value) << pending;
        pending += width;
        if pending >= 8 {
            reversed.push(buffer.to_le_bytes()[0]);
            buffer >>= 8;
            pending -= 8;
        }
    }
    if pending > 0 {
        reversed.push(buffer.to_le_bytes()[0]);
    }
    // Bytes were produced from the end of the output towards its start.
    reversed.reverse();
    Ok(reversed)
}

fn decode_char(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        _ => None,
    }
}

/// A fresh Talos-style node ID: 32 random bytes, base62 encoded (43-45 characters).
pub fn generate_node_id() -> Result<String, getrandom::Error> {
    let mut raw = [0u8; NODE_ID_BYTES];
    getrandom::fill(&mut raw)?;
    Ok(encode(&raw))
}

/// The `/etc/machine-id` Talos derives from a node ID: lowercase hex of the first
/// 16 decoded bytes.
pub fn machine_id(node_id: &str) -> Result<String, Base62Error> {
    let raw = decode(node_id)?;
    let head = raw
        .get(..MACHINE_ID_BYTES)
        .ok_or(Base62Error::NodeIdTooShort { len: raw.len() })?;
    let mut hex = String::with_capacity(MACHINE_ID_BYTES * 2);
    for byte in head {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Talos node ID vector from spec/kubespan.md §1.1.
    const NODE_ID: &str = "sou7yy34ykX3n373Zw1DXKb8zD7UnyKT6HT3QDsGH6L";
    const NODE_ID_HEX: &str = "be871ac0d0dd31fa4caca753b0f3f1b2970f5c19dfbde7dd7932e37cb2eeea2c";

    #[test]
    fn talos_node_id_vector_decodes() {
        assert_eq!(decode(NODE_ID).unwrap(), hex(NODE_ID_HEX));
    }

    #[test]
    fn talos_node_id_vector_encodes() {
        assert_eq!(encode(&hex(NODE_ID_HEX)), NODE_ID);
    }

    #[test]
    fn talos_machine_id_vector() {
        assert_eq!(
            machine_id(NODE_ID).unwrap(),
            "be871ac0d0dd31fa4caca753b0f3f1b2"
        );
    }

    #[test]
    fn all_zero_node_id_is_43_a() {
        let encoded = encode(&[0u8; 32]);
        assert_eq!(encoded, "A".repeat(43));
        assert_eq!(decode(&encoded).unwrap(), vec![0u8; 32]);
    }

    /// Vectors from a line-by-line Python transcription of upstream base62.go
    /// (both its v1 and v2 encoders agree on all of them); they cover the 5-bit
    /// packing (`e`, `f`), the final-chunk exception and leading zero bytes.
    #[test]
    fn upstream_transcription_vectors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", ""),
            (&[0x00], "AA"),
            (&[0x00, 0x01], "BAA"),
            (&[0xff], "fH"),
            (&[0x3e], "eB"),
            (&[0xf8], "4D"),
            // Final chunk 0b011110 with exactly six bits left: one 6-bit `e`, not `eA`.
            (&[0x7b, 0xde], "eee"),
            (&[123, 234, 255], "fX99A"),
            ("Hello, 世界！".as_bytes(), "By77MW55WiL5gwybsxWZIB"),
            (
                &[0xff; 32],
                "fffffffffffffffffffffffffffffffffffffffffffffffffffB",
            ),
            (
                &[
                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                    22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
                ],
                "fwjO4YDNyAjLsoCKmQiIg4BHaghFUIBEOwgCIYABCAA",
            ),
        ];
        for (raw, text) in cases {
            assert_eq!(encode(raw), *text, "encode {raw:02x?}");
            assert_eq!(decode(text).unwrap(), *raw, "decode {text}");
        }
    }

    #[test]
    fn invalid_characters_are_rejected() {
        assert_eq!(
            decode("AB-C"),
            Err(Base62Error::InvalidCharacter {
                index: 2,
                character: '-'
            })
        );
        assert_eq!(
            decode("Aé"),
            Err(Base62Error::InvalidCharacter {
                index: 1,
                character: 'é'
            })
        );
        assert!(decode("abc=").is_err());
        assert!(decode(" abc").is_err());
    }

    #[test]
    fn machine_id_rejects_short_and_invalid_ids() {
        assert_eq!(
            machine_id("AAAA"),
            Err(Base62Error::NodeIdTooShort { len: 3 })
        );
        assert!(matches!(
            machine_id("not+base62"),
            Err(Base62Error::InvalidCharacter { .. })
        ));
    }

    #[test]
    fn generated_node_ids_look_like_talos_ones() {
        for _ in 0..200 {
            let id = generate_node_id().unwrap();
            // Talos' own unit test asserts this length range.
            assert!((43..=45).contains(&id.len()), "{id}");
            assert_eq!(decode(&id).unwrap().len(), NODE_ID_BYTES);
            assert_eq!(machine_id(&id).unwrap().len(), 32);
        }
        assert_ne!(generate_node_id().unwrap(), generate_node_id().unwrap());
    }

    proptest! {
        #[test]
        fn round_trip_any_bytes(raw in proptest::collection::vec(any::<u8>(), 0..80)) {
            prop_assert_eq!(decode(&encode(&raw)).unwrap(), raw);
        }

        #[test]
        fn round_trip_leading_zeros(zeros in 1usize..6, tail in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut raw = vec![0u8; zeros];
            raw.extend(tail);
            prop_assert_eq!(decode(&encode(&raw)).unwrap(), raw);
        }

        #[test]
        fn node_id_sized_inputs(raw in proptest::array::uniform32(any::<u8>())) {
            let text = encode(&raw);
            prop_assert!((43..=45).contains(&text.len()));
            prop_assert_eq!(decode(&text).unwrap(), raw.to_vec());
        }

        #[test]
        fn decode_never_panics(text in ".{0,64}") {
            let _ = decode(&text);
        }

        #[test]
        fn decode_of_alphabet_strings_succeeds(text in "[A-Za-z0-9]{0,64}") {
            let raw = decode(&text).unwrap();
            prop_assert!(raw.len() <= text.len() * 6 / 8 + 1);
        }
    }
}
