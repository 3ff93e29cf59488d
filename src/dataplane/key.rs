//! WireGuard keys at the adapter boundary.
//!
//! Three types so a private key or the cluster PSK cannot end up where a public key
//! is printed: only [`PublicKey`] implements `Display`; the secret types redact
//! themselves in `Debug` and have no `Display` at all.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use defguard_wireguard_rs::key::Key;

/// Length of every WireGuard key (Curve25519 point or scalar, or a PSK).
pub const KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "invalid WireGuard key: {0} (expected 44 characters of standard base64 encoding 32 bytes, as `wg genkey` prints)"
    )]
    Invalid(String),
}

fn decode_base64(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| KeyError::Invalid(e.to_string()))?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice())
        .map_err(|_| KeyError::Invalid(format!("decodes to {} bytes, not 32", bytes.len())))
}

/// A WireGuard public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_base64(text).map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub(crate) fn to_wg(self) -> Key {
        Key::new(self.0)
    }

    pub(crate) fn from_wg(key: &Key) -> Self {
        Self(key.as_array())
    }
}

/// Peers are listed sorted by the base64 text of their key, like Talos and `wg show`
/// users expect to read them.
impl Ord for PublicKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.to_base64().cmp(&other.to_base64())
    }
}

impl PartialOrd for PublicKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_base64(s)
    }
}

/// A WireGuard private key (Curve25519 scalar). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// A fresh clamped key from the OS CSPRNG (what `wg genkey` does).
    pub fn generate() -> Self {
        Self(Key::generate().as_array())
    }

    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_base64(text).map(Self)
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(Key::new(self.0).public_key().as_array())
    }

    /// The base64 text, for writing the identity file. Keep it out of logs.
    pub fn expose_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub(crate) fn to_wg(&self) -> Key {
        Key::new(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

/// A WireGuard preshared key. For KubeSpan this is the cluster secret: its base64
/// text parsed as a WireGuard key (§1.3 of the spec). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses the cluster secret (`cluster.secret`, base64 of 32 bytes).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_base64(text).map(Self)
    }

    pub fn expose_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub(crate) fn to_wg(&self) -> Key {
        Key::new(self.0)
    }

    /// WireGuard reports "no PSK" as all zeroes (kernel) or by omitting it (UAPI).
    pub(crate) fn from_wg(key: &Key) -> Option<Self> {
        let bytes = key.as_array();
        (bytes != [0; KEY_LEN]).then_some(Self(bytes))
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7748 §6.1 Alice: private scalar and its public key.
    const ALICE_PRIVATE: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
    const ALICE_PUBLIC: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

    #[test]
    fn derives_the_rfc7748_public_key() {
        let private = PrivateKey::from_base64(ALICE_PRIVATE).unwrap();
        assert_eq!(private.public_key().to_base64(), ALICE_PUBLIC);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let private = PrivateKey::from_base64(ALICE_PRIVATE).unwrap();
        let psk = PresharedKey::from_base64(ALICE_PRIVATE).unwrap();
        for text in [format!("{private:?}"), format!("{psk:?}")] {
            assert!(!text.contains(ALICE_PRIVATE), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
    }

    #[test]
    fn rejects_wrong_lengths_and_bad_base64() {
        assert!(PublicKey::from_base64("AAAA").is_err());
        assert!(PublicKey::from_base64("not base64 at all!").is_err());
        let err = PresharedKey::from_base64("AAAA").unwrap_err();
        assert!(err.to_string().contains("decodes to 3 bytes"), "{err}");
    }

    #[test]
    fn base64_round_trip_and_text_order() {
        let a = PublicKey::from_bytes([0xff; 32]); // "//8..." sorts before "AAA..."
        let b = PublicKey::from_bytes([0; 32]);
        assert_eq!(PublicKey::from_base64(&a.to_base64()).unwrap(), a);
        assert!(a < b, "ordered by base64 text, not by bytes");
    }

    #[test]
    fn all_zero_psk_means_none() {
        assert_eq!(PresharedKey::from_wg(&Key::new([0; 32])), None);
        assert!(PresharedKey::from_wg(&Key::new([1; 32])).is_some());
    }
}
