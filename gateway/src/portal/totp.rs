//! Time-based one-time passwords (RFC 6238): 30 s steps, 6 digits, HMAC-SHA-1 (what every
//! authenticator app speaks), one step of skew either way.
//!
//! [`verify`] answers which step a code belongs to; the caller accepts a step only if it is
//! later than the last one it accepted for the administrator ([`crate::store::Store::use_totp_step`]
//! makes that atomic), so each code works once.

use std::fmt::Write as _;

use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Builder, Totp};
use zeroize::Zeroizing;

/// RFC 6238's recommended step.
pub const STEP: u64 = 30;
/// Six digits: what authenticator apps show by default.
pub const DIGITS: u8 = 6;
/// One step either way absorbs clock drift and the time it takes to type the code (RFC 6238
/// §5.2 recommends at most one).
pub const SKEW: u64 = 1;
/// 160 bits, the length RFC 4226 recommends for HMAC-SHA-1.
pub const SECRET_BYTES: usize = 20;

/// A TOTP secret, wiped on drop.
#[derive(Clone)]
pub struct TotpSecret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpSecret(<redacted>)")
    }
}

impl TotpSecret {
    pub fn generate() -> Self {
        Self(Zeroizing::new(
            pinhole_certs::random::<SECRET_BYTES>().to_vec(),
        ))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The secret as authenticator apps take it typed in: RFC 4648 base32 without padding.
    pub fn base32(&self) -> String {
        const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let mut out = String::new();
        let mut buffer = 0u32;
        let mut bits = 0;
        for &b in self.0.iter() {
            buffer = (buffer << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
            }
        }
        if bits > 0 {
            out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
        }
        out
    }

    /// The `otpauth://` URI the QR code carries.
    pub fn uri(&self, issuer: &str, account: &str) -> String {
        let enc = |s: &str| {
            let mut o = String::new();
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    o.push(char::from(b));
                } else {
                    let _ = write!(o, "%{b:02X}");
                }
            }
            o
        };
        format!(
            "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP}",
            enc(issuer),
            enc(account),
            self.base32(),
            enc(issuer)
        )
    }

    fn totp(&self) -> Option<Totp> {
        Builder::new()
            .with_algorithm(Algorithm::SHA1)
            .with_digits(DIGITS)
            .with_skew(0)
            .with_step_duration(STEP)
            .with_secret(self.0.to_vec())
            .build()
            .ok()
    }

    /// The code for the step that contains `unix_time`.
    pub fn code(&self, unix_time: u64) -> String {
        self.totp()
            .map(|t| t.generate(unix_time).to_string())
            .unwrap_or_default()
    }
}

/// The step of `code` if it is valid at `unix_time` (±[`SKEW`] steps); compared in constant
/// time. Whether the step was already used is the caller's question.
pub fn verify(secret: &TotpSecret, code: &str, unix_time: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != usize::from(DIGITS) || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = secret.totp()?;
    let now = unix_time / STEP;
    let mut found = None;
    // Every candidate is computed and compared, so the time taken does not say which matched.
    for step in now.saturating_sub(SKEW)..=now + SKEW {
        let expected = totp.generate(step * STEP).to_string();
        if bool::from(expected.as_bytes().ct_eq(code.as_bytes())) {
            found = Some(step);
        }
    }
    found
}

/// The QR code of `data` as an inline SVG element (dark modules on white, with a quiet zone).
pub fn qr_svg(data: &str) -> String {
    match qrcode::QrCode::with_error_correction_level(data, qrcode::EcLevel::M) {
        Ok(code) => code
            .render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(200, 200)
            .dark_color(qrcode::render::svg::Color("#000000"))
            .light_color(qrcode::render::svg::Color("#ffffff"))
            .quiet_zone(true)
            .build()
            // The renderer writes an XML declaration; inline SVG in HTML starts at <svg.
            .split_once("<svg")
            .map(|(_, rest)| {
                format!("<svg role=\"img\" aria-label=\"QR code of the TOTP secret\"{rest}")
            })
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 secret "12345678901234567890", truncated to 6 digits.
    #[test]
    fn rfc6238_vectors() {
        let s = TotpSecret::from_bytes(b"12345678901234567890".to_vec());
        for (t, code) in [
            (59, "287082"),
            (1111111109, "081804"),
            (1111111111, "050471"),
            (1234567890, "005924"),
            (2000000000, "279037"),
        ] {
            assert_eq!(s.code(t), code, "t={t}");
            assert_eq!(verify(&s, code, t), Some(t / STEP));
        }
    }

    #[test]
    fn one_step_of_skew_either_way_and_no_more() {
        let s = TotpSecret::generate();
        let t = 1_800_000_000;
        let code = s.code(t);
        assert_eq!(verify(&s, &code, t), Some(t / STEP));
        assert_eq!(verify(&s, &code, t + STEP), Some(t / STEP));
        assert_eq!(verify(&s, &code, t - STEP), Some(t / STEP));
        assert_eq!(verify(&s, &code, t + 2 * STEP), None);
        assert_eq!(verify(&s, &code, t - 2 * STEP), None);
    }

    #[test]
    fn malformed_codes_are_refused() {
        let s = TotpSecret::generate();
        for bad in ["", "12345", "1234567", "12a456", "１２３４５６"] {
            assert_eq!(verify(&s, bad, 1_800_000_000), None, "{bad}");
        }
    }

    #[test]
    fn base32_and_uri() {
        let s = TotpSecret::from_bytes(b"12345678901234567890".to_vec());
        assert_eq!(s.base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert_eq!(
            s.uri("Pinhole gw", "ad min"),
            "otpauth://totp/Pinhole%20gw:ad%20min?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Pinhole%20gw&algorithm=SHA1&digits=6&period=30"
        );
        let svg = qr_svg(&s.uri("Pinhole", "admin"));
        assert!(svg.starts_with("<svg role=\"img\""), "{svg:.80}");
        assert!(!svg.contains("<?xml"));
    }
}
