//! Discovery payload encryption, byte-compatible with siderolabs/discovery-client.
//!
//! The Talos cluster secret, base64-decoded, is the AES key: no key derivation,
//! no associated data. Affiliate data is AES-GCM (`nonce(12) ‖ ciphertext ‖
//! tag(16)`); each endpoint is AES-ECB over `len ‖ protobuf ‖ zero padding` so the
//! discovery service can deduplicate equal endpoints by comparing bytes.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use aes::cipher::consts::{U12, U16};
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, BlockSizeUser, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use aes_gcm::AesGcm;
use aes_gcm::aead::Aead;
use base64::Engine as _;
use base64::engine::{GeneralPurpose, GeneralPurposeConfig};

use crate::core::payload::{self, PayloadError};
use crate::core::types::AffiliateSpec;

/// AES-GCM nonce length (Go's standard nonce size).
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
const BLOCK_LEN: usize = 16;

/// Go's `base64.StdEncoding` ignores non-zero trailing bits; so do we.
const GO_STD_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    #[error("cluster secret is not valid standard base64: {0}")]
    SecretBase64(#[from] base64::DecodeError),
    #[error("cluster secret must decode to 16, 24 or 32 bytes, got {0}")]
    KeyLength(usize),
    #[error("cannot draw a random nonce from the OS: {0}")]
    Random(getrandom::Error),
    #[error("AES-GCM cannot seal {0} bytes in one message")]
    PlaintextTooLong(usize),
    #[error(
        "encrypted affiliate data is {0} bytes, shorter than the 28-byte minimum \
         (12-byte nonce + 16-byte tag)"
    )]
    BlobTooShort(usize),
    #[error(
        "affiliate data failed authentication: it was sealed with another cluster secret, \
         or corrupted"
    )]
    Authentication,
    #[error("encrypted endpoint must be a non-zero multiple of 16 bytes, got {0}")]
    EndpointBlobLength(usize),
    #[error(
        "encrypted endpoint declares {declared} payload bytes but only {available} follow \
         (sealed with another cluster secret?)"
    )]
    EndpointLengthByte { declared: u8, available: usize },
    #[error("decrypted payload is invalid (sealed with another cluster secret?): {0}")]
    Payload(#[from] PayloadError),
}

/// The block-cipher and GCM operations for one AES key size.
trait Engine: Send + Sync {
    fn encrypt_block(&self, block: &mut [u8; BLOCK_LEN]);
    fn decrypt_block(&self, block: &mut [u8; BLOCK_LEN]);
    fn seal(&self, nonce: [u8; NONCE_LEN], plaintext: &[u8]) -> Option<Vec<u8>>;
    fn open(&self, nonce: [u8; NONCE_LEN], ciphertext: &[u8]) -> Option<Vec<u8>>;
}

struct Keyed<C> {
    block: C,
    gcm: AesGcm<C, U12>,
}

impl<C> Keyed<C>
where
    C: BlockSizeUser<BlockSize = U16> + BlockCipherEncrypt + KeyInit + Clone,
{
    fn new(key: &[u8]) -> Option<Self> {
        let block = C::new_from_slice(key).ok()?;
        Some(Self {
            gcm: AesGcm::from(block.clone()),
            block,
        })
    }
}

impl<C> Engine for Keyed<C>
where
    C: BlockSizeUser<BlockSize = U16> + BlockCipherEncrypt + BlockCipherDecrypt + Send + Sync,
{
    fn encrypt_block(&self, block: &mut [u8; BLOCK_LEN]) {
        self.block.encrypt_block(block.into());
    }

    fn decrypt_block(&self, block: &mut [u8; BLOCK_LEN]) {
        self.block.decrypt_block(block.into());
    }

    fn seal(&self, nonce: [u8; NONCE_LEN], plaintext: &[u8]) -> Option<Vec<u8>> {
        self.gcm.encrypt(&nonce.into(), plaintext).ok()
    }

    fn open(&self, nonce: [u8; NONCE_LEN], ciphertext: &[u8]) -> Option<Vec<u8>> {
        self.gcm.decrypt(&nonce.into(), ciphertext).ok()
    }
}

/// The cluster-secret cipher for affiliate data and endpoints. Cheap to clone.
#[derive(Clone)]
pub struct ClusterCipher {
    engine: Arc<dyn Engine>,
    key_len: usize,
}

impl fmt::Debug for ClusterCipher {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCipher")
            .field("aes_bits", &(self.key_len * 8))
            .finish_non_exhaustive()
    }
}

impl ClusterCipher {
    /// AES-128/192/256 from a 16, 24 or 32-byte key (Talos uses 32).
    pub fn new(key: &[u8]) -> Result<Self, CipherError> {
        let engine: Option<Arc<dyn Engine>> = match key.len() {
            16 => Keyed::<Aes128>::new(key).map(|k| Arc::new(k) as Arc<dyn Engine>),
            24 => Keyed::<Aes192>::new(key).map(|k| Arc::new(k) as Arc<dyn Engine>),
            32 => Keyed::<Aes256>::new(key).map(|k| Arc::new(k) as Arc<dyn Engine>),
            _ => None,
        };
        let engine = engine.ok_or(CipherError::KeyLength(key.len()))?;
        Ok(Self {
            engine,
            key_len: key.len(),
        })
    }

    /// From the Talos `cluster.secret` (standard base64; surrounding whitespace is ignored).
    pub fn from_secret_base64(secret: &str) -> Result<Self, CipherError> {
        let key = GO_STD_BASE64.decode(secret.trim())?;
        Self::new(&key)
    }

    /// Key size in bits: 128, 192 or 256.
    pub fn key_bits(&self) -> usize {
        self.key_len * 8
    }

    /// AES-GCM with a caller-chosen nonce: `nonce ‖ ciphertext ‖ tag`. Reusing a
    /// nonce under one key breaks GCM; outside tests use [`Self::seal`].
    pub fn seal_with_nonce(
        &self,
        nonce: [u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CipherError> {
        let sealed = self
            .engine
            .seal(nonce, plaintext)
            .ok_or(CipherError::PlaintextTooLong(plaintext.len()))?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(blob)
    }

    /// AES-GCM with a fresh random nonce, the layout Go's `NewGCMWithRandomNonce` writes.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CipherError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(CipherError::Random)?;
        self.seal_with_nonce(nonce, plaintext)
    }

    /// Opens a `nonce ‖ ciphertext ‖ tag` blob.
    pub fn open(&self, blob: &[u8]) -> Result<Vec<u8>, CipherError> {
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(CipherError::BlobTooShort(blob.len()));
        }
        let (nonce, ciphertext) = blob
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(CipherError::BlobTooShort(blob.len()))?;
        self.engine
            .open(*nonce, ciphertext)
            .ok_or(CipherError::Authentication)
    }

    /// The deterministic endpoint blob: AES-ECB over `len ‖ Endpoint ‖ zero padding`.
    pub fn encrypt_endpoint(&self, addr: SocketAddr) -> Vec<u8> {
        let body = payload::encode_endpoint(addr);
        let mut data = Vec::with_capacity(2 * BLOCK_LEN);
        // At most 22 bytes (two tags, a length, a 16-byte IP, a 3-byte port varint).
        data.push(u8::try_from(body.len()).unwrap_or(u8::MAX));
        data.extend_from_slice(&body);
        data.resize(data.len().next_multiple_of(BLOCK_LEN), 0);
        for block in data.as_chunks_mut::<BLOCK_LEN>().0 {
            self.engine.encrypt_block(block);
        }
        data
    }

    /// Decrypts and validates one endpoint blob. ECB has no integrity: a blob made
    /// with another key is only caught if its plaintext happens not to parse.
    pub fn decrypt_endpoint(&self, blob: &[u8]) -> Result<SocketAddr, CipherError> {
        if blob.is_empty() || !blob.len().is_multiple_of(BLOCK_LEN) {
            return Err(CipherError::EndpointBlobLength(blob.len()));
        }
        let mut data = blob.to_vec();
        for block in data.as_chunks_mut::<BLOCK_LEN>().0 {
            self.engine.decrypt_block(block);
        }
        let (&declared, rest) = data
            .split_first()
            .ok_or(CipherError::EndpointBlobLength(0))?;
        // The Go client slices without this check and can panic on a bogus length byte.
        let body = rest
            .get(..usize::from(declared))
            .ok_or(CipherError::EndpointLengthByte {
                declared,
                available: rest.len(),
            })?;
        Ok(payload::decode_endpoint(body)?)
    }

    /// Seals an affiliate with a fresh nonce. `kubespan.endpoints` is not included:
    /// send those with [`Self::encrypt_endpoint`].
    pub fn encrypt_affiliate(&self, spec: &AffiliateSpec) -> Result<Vec<u8>, CipherError> {
        self.seal(&payload::encode_affiliate(spec))
    }

    /// [`Self::encrypt_affiliate`] with a fixed nonce, for reproducible output.
    pub fn encrypt_affiliate_with_nonce(
        &self,
        nonce: [u8; NONCE_LEN],
        spec: &AffiliateSpec,
    ) -> Result<Vec<u8>, CipherError> {
        self.seal_with_nonce(nonce, &payload::encode_affiliate(spec))
    }

    /// Opens and validates an affiliate blob; `kubespan.endpoints` comes back empty.
    pub fn decrypt_affiliate(&self, blob: &[u8]) -> Result<AffiliateSpec, CipherError> {
        Ok(payload::decode_affiliate(&self.open(blob)?)?)
    }

    /// One raw AES block, for the FIPS-197 known-answer test of the ECB path.
    #[cfg(test)]
    fn encrypt_raw_block(&self, mut block: [u8; BLOCK_LEN]) -> [u8; BLOCK_LEN] {
        self.engine.encrypt_block(&mut block);
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::payload::tests::{arb_affiliate, small_affiliate, unhex};
    use proptest::prelude::*;
    use std::net::IpAddr;

    /// FIPS-197 Appendix C key: 00 01 02 ... (16, 24 or 32 bytes).
    fn seq_key(len: u8) -> Vec<u8> {
        (0..len).collect()
    }

    fn seq_nonce() -> [u8; NONCE_LEN] {
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    }

    fn cipher256() -> ClusterCipher {
        ClusterCipher::new(&seq_key(32)).unwrap()
    }

    #[test]
    fn fips197_c3_aes256_block() {
        let block = <[u8; 16]>::try_from(unhex("00112233445566778899aabbccddeeff")).unwrap();
        let want = unhex("8ea2b7ca516745bfeafc49904b496089");
        assert_eq!(cipher256().encrypt_raw_block(block).to_vec(), want);
    }

    /// Go `crypto/cipher` `ExampleNewGCM_encrypt`: key, nonce and ciphertext as documented.
    #[test]
    fn go_newgcm_example() {
        let key = unhex("6368616e676520746869732070617373776f726420746f206120736563726574");
        let cipher = ClusterCipher::new(&key).unwrap();
        let nonce = <[u8; 12]>::try_from(unhex("64a9433eae7ccceee2fc0eda")).unwrap();
        let mut want = nonce.to_vec();
        want.extend(unhex(
            "c3aaa29f002ca75870806e44086700f62ce4d43e902b3888e23ceff797a7a471",
        ));
        let blob = cipher.seal_with_nonce(nonce, b"exampleplaintext").unwrap();
        assert_eq!(blob, want);
        assert_eq!(cipher.open(&blob).unwrap(), b"exampleplaintext");
    }

    /// AES-128/192-GCM, nonce 00..0b, "exampleplaintext" (Python `cryptography` AESGCM).
    #[test]
    fn gcm_128_and_192_vectors() {
        for (len, ct) in [
            (
                16,
                "f614c6a31677922427b308e442c6087c38ebcdc9d279b2590be9d15f1dd41b73",
            ),
            (
                24,
                "838143f6e9d5ac7ebc52b5ec8bcca404160fe486b2d17f2a86aa3444b7d4232f",
            ),
        ] {
            let cipher = ClusterCipher::new(&seq_key(len)).unwrap();
            let blob = cipher
                .seal_with_nonce(seq_nonce(), b"exampleplaintext")
                .unwrap();
            assert_eq!(blob[..12], seq_nonce());
            assert_eq!(blob[12..], unhex(ct), "AES-{}", len * 8);
            assert_eq!(cipher.open(&blob).unwrap(), b"exampleplaintext");
        }
    }

    /// The worked endpoint example (10.0.0.2:51820): plaintext block
    /// `0a 0a040a00000210ec9403 0000000000`, encrypted with `openssl enc -aes-*-ecb -nopad`.
    #[test]
    fn endpoint_example_vectors() {
        let addr: SocketAddr = "10.0.0.2:51820".parse().unwrap();
        for (len, ct) in [
            (32, "45c55198f8ad5b07dd423e192f7e13e8"),
            (24, "50336b6b5e1d75b3f1ba752e9642df6b"),
            (16, "3b9c4a5bc19bac455ae902143a94a86c"),
        ] {
            let cipher = ClusterCipher::new(&seq_key(len)).unwrap();
            assert_eq!(cipher.encrypt_endpoint(addr), unhex(ct), "AES-{}", len * 8);
            assert_eq!(cipher.decrypt_endpoint(&unhex(ct)).unwrap(), addr);
        }
    }

    /// [2001:db8::1]:51820: 1 + 22 bytes pad to two blocks (openssl, AES-256-ECB).
    #[test]
    fn ipv6_endpoint_is_two_blocks() {
        let addr: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        let want = unhex("e2702633ca89239d5ee036a316dde237d604c19a74d2f45c1e624c2d38c4cca0");
        let blob = cipher256().encrypt_endpoint(addr);
        assert_eq!(blob, want);
        assert_eq!(cipher256().decrypt_endpoint(&blob).unwrap(), addr);
    }

    #[test]
    fn endpoints_are_deterministic() {
        let addr: SocketAddr = "192.0.2.7:51820".parse().unwrap();
        assert_eq!(
            cipher256().encrypt_endpoint(addr),
            cipher256().encrypt_endpoint(addr)
        );
    }

    /// The small affiliate's protoc bytes sealed with key 00..1f and nonce 00..0b
    /// (Python `cryptography` AESGCM).
    #[test]
    fn affiliate_blob_vector() {
        let want = unhex(
            "000102030405060708090a0b4d29a574b0d2bb62be75eee0e9da165eb4e5dd43c13f07375a5f9fc12a3c\
             6ecb4a4498b4fbf243dc07e337dbc4952c32ee59629758b892f83df91b331e949a9c9b59b448d69d4f0f\
             692c903ae5a35ea468c48b06120e070fb5b7f6b80fc0cff5a78c28d7fe03ac4ace256cfc0730741b8f2d\
             08e1b9bf67c814c245dd7f997954022e56c498cd7dacf6b2c9c827d246c63c00e0352509b142865b28df\
             fad2f9fed19496bedbf757d41001fe36f0daa0886f1a7b886a",
        );
        let blob = cipher256()
            .encrypt_affiliate_with_nonce(seq_nonce(), &small_affiliate())
            .unwrap();
        assert_eq!(blob, want);
        assert_eq!(
            cipher256().decrypt_affiliate(&want).unwrap(),
            small_affiliate()
        );
    }

    #[test]
    fn affiliate_endpoints_are_dropped() {
        let mut spec = small_affiliate();
        if let Some(ks) = spec.kubespan.as_mut() {
            ks.endpoints = vec!["10.0.0.2:51820".parse().unwrap()];
        }
        let blob = cipher256().encrypt_affiliate(&spec).unwrap();
        assert_eq!(
            cipher256().decrypt_affiliate(&blob).unwrap(),
            small_affiliate()
        );
    }

    #[test]
    fn seal_uses_fresh_nonces() {
        let cipher = cipher256();
        let a = cipher.seal(b"same").unwrap();
        let b = cipher.seal(b"same").unwrap();
        assert_eq!(a.len(), 4 + NONCE_LEN + TAG_LEN);
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_eq!(cipher.open(&a).unwrap(), b"same");
        assert_eq!(cipher.open(&b).unwrap(), b"same");
    }

    #[test]
    fn key_sizes() {
        for len in [16u8, 24, 32] {
            let cipher = ClusterCipher::new(&seq_key(len)).unwrap();
            assert_eq!(cipher.key_bits(), usize::from(len) * 8);
        }
        for len in [0u8, 1, 15, 17, 23, 31, 33, 64] {
            assert_eq!(
                ClusterCipher::new(&seq_key(len)).unwrap_err(),
                CipherError::KeyLength(usize::from(len))
            );
        }
    }

    #[test]
    fn secret_from_base64() {
        // base64 of bytes 00..1f, as a Talos cluster.secret would look.
        let secret = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let cipher = ClusterCipher::from_secret_base64(secret).unwrap();
        assert_eq!(cipher.key_bits(), 256);
        let addr: SocketAddr = "10.0.0.2:51820".parse().unwrap();
        assert_eq!(
            cipher.encrypt_endpoint(addr),
            unhex("45c55198f8ad5b07dd423e192f7e13e8")
        );
        assert!(ClusterCipher::from_secret_base64(&format!(" {secret}\n")).is_ok());

        assert!(matches!(
            ClusterCipher::from_secret_base64("not base64!"),
            Err(CipherError::SecretBase64(_))
        ));
        let short = ClusterCipher::from_secret_base64("AAECAwQFBgcICQoLDA0ODw==");
        assert_eq!(short.unwrap().key_bits(), 128);
        let err = ClusterCipher::from_secret_base64("AAECAwQFBgcICQ==").unwrap_err();
        assert_eq!(err, CipherError::KeyLength(10));
        assert_eq!(
            err.to_string(),
            "cluster secret must decode to 16, 24 or 32 bytes, got 10"
        );
    }

    #[test]
    fn debug_does_not_leak_the_key() {
        let text = format!("{:?}", cipher256());
        assert_eq!(text, "ClusterCipher { aes_bits: 256, .. }");
    }

    #[test]
    fn open_rejects_short_tampered_and_foreign_blobs() {
        let cipher = cipher256();
        let blob = cipher
            .seal_with_nonce(seq_nonce(), b"exampleplaintext")
            .unwrap();
        for len in [0, 1, 12, 27] {
            assert_eq!(
                cipher.open(&blob[..len]),
                Err(CipherError::BlobTooShort(len))
            );
        }
        // Exactly nonce + tag is a valid (empty) message only if the tag matches.
        assert_eq!(cipher.open(&blob[..28]), Err(CipherError::Authentication));
        assert_eq!(
            cipher.open(&blob[..blob.len() - 1]),
            Err(CipherError::Authentication)
        );
        for index in [0, 11, 12, blob.len() - 1] {
            let mut tampered = blob.clone();
            tampered[index] ^= 0x01;
            assert_eq!(
                cipher.open(&tampered),
                Err(CipherError::Authentication),
                "{index}"
            );
        }
        let other = ClusterCipher::new(&[7u8; 32]).unwrap();
        assert_eq!(other.open(&blob), Err(CipherError::Authentication));
        assert_eq!(
            other.decrypt_affiliate(&blob),
            Err(CipherError::Authentication)
        );
        let empty = cipher.seal_with_nonce(seq_nonce(), b"").unwrap();
        assert_eq!(empty.len(), 28);
        assert_eq!(cipher.open(&empty).unwrap(), b"");
    }

    #[test]
    fn decrypt_endpoint_rejects_bad_sizes() {
        let cipher = cipher256();
        for len in [0usize, 1, 15, 17, 31, 33] {
            assert_eq!(
                cipher.decrypt_endpoint(&vec![0; len]),
                Err(CipherError::EndpointBlobLength(len))
            );
        }
    }

    /// Encrypts raw plaintext blocks the way an attacker holding the key could.
    fn ecb(cipher: &ClusterCipher, plaintext: &[u8]) -> Vec<u8> {
        let mut data = plaintext.to_vec();
        for block in data.as_chunks_mut::<16>().0 {
            cipher.engine.encrypt_block(block);
        }
        data
    }

    #[test]
    fn decrypt_endpoint_bounds_checks_the_length_byte() {
        let cipher = cipher256();
        // 0xff: far beyond one block.
        let mut plain = [0u8; 16];
        plain[0] = 0xff;
        assert_eq!(
            cipher.decrypt_endpoint(&ecb(&cipher, &plain)),
            Err(CipherError::EndpointLengthByte {
                declared: 0xff,
                available: 15
            })
        );
        // 16 is one past the end of a single block; 15 fits (and then fails to parse).
        plain[0] = 16;
        assert!(matches!(
            cipher.decrypt_endpoint(&ecb(&cipher, &plain)),
            Err(CipherError::EndpointLengthByte { declared: 16, .. })
        ));
        plain[0] = 15;
        assert!(matches!(
            cipher.decrypt_endpoint(&ecb(&cipher, &plain)),
            Err(CipherError::Payload(_))
        ));
        // Three blocks (48 bytes) are accepted when the length byte is in range.
        let mut long = vec![0u8; 48];
        let body = unhex("0a040a00000210ec9403");
        long[0] = 10;
        long[1..11].copy_from_slice(&body);
        assert_eq!(
            cipher.decrypt_endpoint(&ecb(&cipher, &long)).unwrap(),
            "10.0.0.2:51820".parse().unwrap()
        );
        long[0] = 48;
        assert!(matches!(
            cipher.decrypt_endpoint(&ecb(&cipher, &long)),
            Err(CipherError::EndpointLengthByte {
                declared: 48,
                available: 47
            })
        ));
    }

    /// The payload error for one block of endpoint plaintext (length byte first).
    fn endpoint_payload_error(plain_hex: &str) -> PayloadError {
        let cipher = cipher256();
        let mut plain = unhex(plain_hex);
        plain.resize(16, 0);
        match cipher.decrypt_endpoint(&ecb(&cipher, &plain)) {
            Err(CipherError::Payload(err)) => err,
            other => panic!("{plain_hex}: expected a payload error, got {other:?}"),
        }
    }

    #[test]
    fn decrypt_endpoint_rejects_bad_protobuf() {
        // Truncated length-delimited field.
        assert!(matches!(
            endpoint_payload_error("0a0a0a"),
            PayloadError::Protobuf(_)
        ));
        // 3-byte IP.
        assert!(matches!(
            endpoint_payload_error("090a030a000010ec9403"),
            PayloadError::IpLength { len: 3, .. }
        ));
        // Port 0 (omitted) and 65536.
        assert!(matches!(
            endpoint_payload_error("060a040a000002"),
            PayloadError::Port { port: 0, .. }
        ));
        assert!(matches!(
            endpoint_payload_error("0a0a040a00000210808004"),
            PayloadError::Port { port: 65536, .. }
        ));
        // Declared length 0: an empty Endpoint has no IP.
        assert!(matches!(
            endpoint_payload_error("00"),
            PayloadError::IpLength { len: 0, .. }
        ));
    }

    #[test]
    fn decrypt_endpoint_with_wrong_key_fails_for_these_keys() {
        // ECB has no integrity; with these fixed keys the garbage does not parse.
        let blob = cipher256().encrypt_endpoint("10.0.0.2:51820".parse().unwrap());
        for other in [[7u8; 32], [0u8; 32]] {
            let other = ClusterCipher::new(&other).unwrap();
            assert!(other.decrypt_endpoint(&blob).is_err());
        }
    }

    #[test]
    fn decrypt_affiliate_rejects_garbage_plaintext() {
        // Authenticated, but not a valid Affiliate protobuf.
        let blob = cipher256()
            .seal_with_nonce(seq_nonce(), &[0x0a, 0x05, 0x61])
            .unwrap();
        assert!(matches!(
            cipher256().decrypt_affiliate(&blob),
            Err(CipherError::Payload(PayloadError::Protobuf(_)))
        ));
    }

    fn arb_socket_addr() -> impl Strategy<Value = SocketAddr> {
        (any::<IpAddr>(), 1u16..=65535).prop_map(|(ip, port)| SocketAddr::new(ip, port))
    }

    proptest! {
        #[test]
        fn endpoint_round_trip(addr in arb_socket_addr()) {
            let blob = cipher256().encrypt_endpoint(addr);
            prop_assert_eq!(blob.len(), if addr.is_ipv4() { 16 } else { 32 });
            prop_assert_eq!(cipher256().decrypt_endpoint(&blob)?, addr);
        }

        #[test]
        fn affiliate_round_trip(spec in arb_affiliate()) {
            let cipher = cipher256();
            let blob = cipher.encrypt_affiliate(&spec)?;
            prop_assert_eq!(cipher.decrypt_affiliate(&blob)?, spec);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let cipher = cipher256();
            let _ = cipher.open(&bytes);
            let _ = cipher.decrypt_endpoint(&bytes);
            let _ = cipher.decrypt_affiliate(&bytes);
        }

        #[test]
        fn arbitrary_plaintext_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Get past authentication so the protobuf and endpoint decoders see garbage.
            let cipher = cipher256();
            let _ = cipher.decrypt_affiliate(&cipher.seal(&bytes)?);
            let mut padded = bytes;
            padded.resize(padded.len().next_multiple_of(16).max(16), 0);
            let _ = cipher.decrypt_endpoint(&ecb(&cipher, &padded));
        }
    }
}
