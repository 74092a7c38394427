//! Checking that a webhook request came from tap (`--webhook-secret`): the
//! `x-tap-signature: t=<unix seconds>,sha256=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! header, compared in constant time, within a replay window.

use aws_lc_rs::{constant_time, hmac};

/// The header tap signs with.
pub const SIGNATURE_HEADER: &str = "x-tap-signature";

/// Why a request is not accepted as tap's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `t=<seconds>,sha256=<64 hex digits>`.
    #[error("malformed signature header")]
    Malformed,
    /// Signed too long ago or too far ahead: a replay, or clocks apart.
    #[error("signature time {signed} is more than {window} s from now ({now})")]
    Stale {
        /// When it was signed.
        signed: u64,
        /// Now.
        now: u64,
        /// The window allowed.
        window: u64,
    },
    /// The body or the time was changed, or the secret differs.
    #[error("signature does not match")]
    Mismatch,
}

/// Checks `header` (the value of [`SIGNATURE_HEADER`]) against `body` as received, with
/// the shared `secret`, at `now` (unix seconds), allowing `window` seconds either way.
///
/// # Errors
/// [`SignatureError`].
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: u64,
    window: u64,
) -> Result<(), SignatureError> {
    let (signed, mac) = parse(header).ok_or(SignatureError::Malformed)?;
    if signed.abs_diff(now) > window {
        return Err(SignatureError::Stale {
            signed,
            now,
            window,
        });
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(signed.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let expected = ctx.sign();
    constant_time::verify_slices_are_equal(expected.as_ref(), &mac)
        .map_err(|_| SignatureError::Mismatch)
}

fn parse(header: &str) -> Option<(u64, Vec<u8>)> {
    let (t, sig) = header.split_once(',')?;
    let signed = t.strip_prefix("t=")?.parse().ok()?;
    let hex = sig.strip_prefix("sha256=")?;
    if hex.len() != 64 {
        return None;
    }
    let mac = (0..32)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((signed, mac))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(
            &key,
            format!("{t}.")
                .as_bytes()
                .iter()
                .chain(body)
                .copied()
                .collect::<Vec<u8>>()
                .as_slice(),
        );
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("t={t},sha256={hex}")
    }

    #[test]
    fn a_signature_verifies_only_for_its_body_secret_and_time() {
        let header = sign(b"k", 1000, b"{\"id\":1}");
        assert_eq!(verify(b"k", &header, b"{\"id\":1}", 1010, 300), Ok(()));
        assert_eq!(
            verify(b"k", &header, b"{\"id\":2}", 1010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"x", &header, b"{\"id\":1}", 1010, 300),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            verify(b"k", &header, b"{\"id\":1}", 2000, 300),
            Err(SignatureError::Stale { .. })
        ));
        let moved = header.replace("t=1000", "t=1001");
        assert_eq!(
            verify(b"k", &moved, b"{\"id\":1}", 1010, 300),
            Err(SignatureError::Mismatch)
        );
        for bad in ["", "t=1,sha256=zz", "sha256=00,t=1", "t=x,sha256=00"] {
            assert_eq!(
                verify(b"k", bad, b"", 0, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }
}
