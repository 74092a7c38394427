//! Public keys and signature verification: K-256 via libsecp256k1 (`secp256k1` crate) and
//! P-256 via aws-lc-rs with an explicit low-S check. Only 64-byte compact (r‖s) signatures
//! are accepted. Keys come from did:key / Multikey strings or legacy DID-document key types.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ParsedPublicKey};

use crate::hash;

/// Multicodec code of a compressed secp256k1 public key.
pub const MULTICODEC_K256: u64 = 0xe7;
/// Multicodec code of a compressed P-256 public key.
pub const MULTICODEC_P256: u64 = 0x1200;

/// Half the P-256 group order: signatures with `s` above this are high-S and invalid.
const P256_HALF_ORDER: [u8; 32] = [
    0x7F, 0xFF, 0xFF, 0xFF, 0x80, 0x00, 0x00, 0x00, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    0xDE, 0x73, 0x7D, 0x56, 0xD3, 0x8B, 0xCF, 0x42, 0x79, 0xDC, 0xE5, 0x61, 0x7E, 0x31, 0x92, 0xA8,
];

/// Why a key could not be parsed or a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not `did:key:z…`.
    #[error("not a did:key")]
    NotDidKey,
    /// The multibase string is not base58btc (`z…`) or does not decode.
    #[error("key is not base58btc multibase")]
    BadMultibase,
    /// The multicodec prefix names a key type we do not support.
    #[error("unsupported key type (multicodec {0:#x})")]
    UnsupportedKeyType(u64),
    /// The DID-document verification-method type is not supported.
    #[error("unsupported verification method type {0:?}")]
    UnsupportedMethodType(String),
    /// The point is not a valid public key of the curve.
    #[error("invalid public key point")]
    BadPoint,
    /// The signature is not 64 bytes (DER signatures are rejected).
    #[error("signature must be 64 bytes (compact r||s), got {0}")]
    BadSignatureLength(usize),
    /// `s` is above half the group order.
    #[error("high-S signature")]
    HighS,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
}

/// The curve of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// secp256k1 (ES256K).
    K256,
    /// NIST P-256 (ES256).
    P256,
}

/// A parsed public key, ready to verify signatures (parse once per DID and cache it).
#[derive(Clone)]
pub struct PublicKey {
    inner: Inner,
    compressed: [u8; 33],
}

#[derive(Clone)]
enum Inner {
    K256(secp256k1::PublicKey),
    P256(ParsedPublicKey),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_did_key())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.key_type() == other.key_type() && self.compressed == other.compressed
    }
}
impl Eq for PublicKey {}

impl PublicKey {
    /// Parses a SEC1 point (33-byte compressed or 65-byte uncompressed) of the given curve.
    ///
    /// # Errors
    /// [`KeyError::BadPoint`] when the bytes are not a point on the curve.
    pub fn from_sec1(key_type: KeyType, bytes: &[u8]) -> Result<Self, KeyError> {
        match key_type {
            KeyType::K256 => {
                let pk = secp256k1::PublicKey::from_slice(bytes).map_err(|_| KeyError::BadPoint)?;
                Ok(Self {
                    compressed: pk.serialize(),
                    inner: Inner::K256(pk),
                })
            }
            KeyType::P256 => {
                let compressed = compress_p256(bytes)?;
                let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, compressed)
                    .map_err(|_| KeyError::BadPoint)?;
                Ok(Self {
                    compressed,
                    inner: Inner::P256(parsed),
                })
            }
        }
    }

    /// Parses a Multikey string (`z` + base58btc of multicodec varint ‖ compressed point).
    ///
    /// # Errors
    /// [`KeyError`] when the encoding, key type or point is invalid.
    pub fn from_multikey(s: &str) -> Result<Self, KeyError> {
        let raw = decode_base58btc(s)?;
        let (codec, n) = hash::read_uvarint(&raw).ok_or(KeyError::BadMultibase)?;
        let key_type = match codec {
            MULTICODEC_K256 => KeyType::K256,
            MULTICODEC_P256 => KeyType::P256,
            other => return Err(KeyError::UnsupportedKeyType(other)),
        };
        Self::from_sec1(key_type, &raw[n..])
    }

    /// Parses `did:key:z…`.
    ///
    /// # Errors
    /// [`KeyError`] when it is not a supported did:key.
    pub fn from_did_key(s: &str) -> Result<Self, KeyError> {
        let mk = s.strip_prefix("did:key:").ok_or(KeyError::NotDidKey)?;
        Self::from_multikey(mk)
    }

    /// Parses a DID-document verification method: `Multikey` with a Multikey value, or the
    /// legacy `EcdsaSecp256k1VerificationKey2019` / `EcdsaSecp256r1VerificationKey2019`
    /// whose `publicKeyMultibase` carries the bare point without a multicodec prefix.
    ///
    /// # Errors
    /// [`KeyError`] when the type is unknown or the key is invalid.
    pub fn from_verification_method(
        method_type: &str,
        public_key_multibase: &str,
    ) -> Result<Self, KeyError> {
        match method_type {
            "Multikey" => Self::from_multikey(public_key_multibase),
            "EcdsaSecp256k1VerificationKey2019" => {
                Self::from_sec1(KeyType::K256, &decode_base58btc(public_key_multibase)?)
            }
            "EcdsaSecp256r1VerificationKey2019" => {
                Self::from_sec1(KeyType::P256, &decode_base58btc(public_key_multibase)?)
            }
            other => Err(KeyError::UnsupportedMethodType(other.to_owned())),
        }
    }

    /// The curve.
    #[must_use]
    pub fn key_type(&self) -> KeyType {
        match self.inner {
            Inner::K256(_) => KeyType::K256,
            Inner::P256(_) => KeyType::P256,
        }
    }

    /// The 33-byte compressed SEC1 point.
    #[must_use]
    pub fn compressed(&self) -> &[u8; 33] {
        &self.compressed
    }

    /// The Multikey string (`z…`).
    #[must_use]
    pub fn to_multikey(&self) -> String {
        let mut raw = Vec::with_capacity(35);
        hash::write_uvarint(
            &mut raw,
            match self.key_type() {
                KeyType::K256 => MULTICODEC_K256,
                KeyType::P256 => MULTICODEC_P256,
            },
        );
        raw.extend_from_slice(&self.compressed);
        multibase::encode(multibase::Base::Base58Btc, raw)
    }

    /// The `did:key:z…` string.
    #[must_use]
    pub fn to_did_key(&self) -> String {
        format!("did:key:{}", self.to_multikey())
    }

    /// Verifies a 64-byte compact ECDSA signature over SHA-256(`msg`), rejecting high-S.
    ///
    /// # Errors
    /// [`KeyError`] when the signature is not 64 bytes, is high-S, or does not verify.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        if sig.len() != 64 {
            return Err(KeyError::BadSignatureLength(sig.len()));
        }
        match &self.inner {
            Inner::K256(pk) => {
                let s = secp256k1::ecdsa::Signature::from_compact(sig)
                    .map_err(|_| KeyError::BadSignature)?;
                let digest = hash::sha256(msg);
                // libsecp256k1 refuses non-normalised (high-S) signatures on its own.
                secp256k1::ecdsa::verify(&s, secp256k1::Message::from_digest(digest), pk).map_err(
                    |_| {
                        let mut normal = s;
                        normal.normalize_s();
                        if normal == s {
                            KeyError::BadSignature
                        } else {
                            KeyError::HighS
                        }
                    },
                )
            }
            Inner::P256(pk) => {
                // aws-lc accepts high-S; atproto does not, so check s <= n/2 first.
                if sig[32..] > P256_HALF_ORDER[..] {
                    return Err(KeyError::HighS);
                }
                pk.verify_sig(msg, sig).map_err(|_| KeyError::BadSignature)
            }
        }
    }
}

fn decode_base58btc(s: &str) -> Result<Vec<u8>, KeyError> {
    match multibase::decode(s) {
        Ok((multibase::Base::Base58Btc, raw)) => Ok(raw),
        _ => Err(KeyError::BadMultibase),
    }
}

/// Compresses a P-256 SEC1 point (validating it via aws-lc when uncompressed).
fn compress_p256(bytes: &[u8]) -> Result<[u8; 33], KeyError> {
    match bytes.len() {
        33 if matches!(bytes[0], 2 | 3) => {
            let mut c = [0u8; 33];
            c.copy_from_slice(bytes);
            Ok(c)
        }
        65 if bytes[0] == 4 => {
            ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, bytes)
                .map_err(|_| KeyError::BadPoint)?;
            let mut c = [0u8; 33];
            c[0] = 2 | (bytes[64] & 1);
            c[1..].copy_from_slice(&bytes[1..33]);
            Ok(c)
        }
        _ => Err(KeyError::BadPoint),
    }
}
