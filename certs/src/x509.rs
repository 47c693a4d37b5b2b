//! Small helpers over `x509-parser`: whole-input parsing and the fields Pinhole reads.

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// Why a DER certificate was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("the certificate is not valid DER X.509")]
    Malformed,
    #[error("the certificate is followed by trailing bytes")]
    TrailingBytes,
}

/// Parses a DER certificate and refuses trailing bytes.
pub fn parse(der: &[u8]) -> Result<X509Certificate<'_>, ParseError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|_| ParseError::Malformed)?;
    if !rest.is_empty() {
        return Err(ParseError::TrailingBytes);
    }
    Ok(cert)
}

/// The DER SubjectPublicKeyInfo of a certificate.
pub fn spki_der(der: &[u8]) -> Result<Vec<u8>, ParseError> {
    Ok(parse(der)?.public_key().raw.to_vec())
}

/// The first value of an attribute type in a certificate's subject, if it is a string.
pub(crate) fn subject_attr(
    cert: &X509Certificate<'_>,
    oid: &x509_parser::oid_registry::Oid<'_>,
) -> Option<String> {
    cert.subject()
        .iter_attributes()
        .find(|a| a.attr_type() == oid)
        .and_then(|a| a.as_str().ok())
        .map(str::to_owned)
}

/// Encodes `text` as a DER UTF8String.
pub(crate) fn der_utf8_string(text: &str) -> Vec<u8> {
    const UTF8_STRING: u8 = 0x0c;
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + 4);
    out.push(UTF8_STRING);
    let len = bytes.len();
    if len < 0x80 {
        // Short form: the length fits in seven bits (checked just above).
        out.push(len as u8);
    } else {
        let be = len.to_be_bytes();
        let skip = be.iter().take_while(|b| **b == 0).count();
        let significant = &be[skip..];
        // At most size_of::<usize>() == 8 bytes, so the count fits in the low seven bits.
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(bytes);
    out
}

/// Decodes a DER UTF8String that fills `der` exactly; `None` for anything else.
pub(crate) fn parse_der_utf8_string(der: &[u8]) -> Option<&str> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, body) = rest.split_at(n);
        if len_bytes[0] == 0 {
            return None; // not minimal: DER forbids it
        }
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        if len < 0x80 {
            return None; // long form for a short length: not DER
        }
        (len, body)
    };
    if body.len() != len {
        return None;
    }
    std::str::from_utf8(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_string_round_trips_short_and_long() {
        for n in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let text = "x".repeat(n);
            let der = der_utf8_string(&text);
            assert_eq!(
                parse_der_utf8_string(&der),
                Some(text.as_str()),
                "length {n}"
            );
        }
    }

    #[test]
    fn utf8_string_rejects_bad_encodings() {
        assert_eq!(parse_der_utf8_string(&[]), None);
        assert_eq!(parse_der_utf8_string(&[0x04, 0x01, b'a']), None); // OCTET STRING
        assert_eq!(parse_der_utf8_string(&[0x0c, 0x02, b'a']), None); // truncated
        assert_eq!(parse_der_utf8_string(&[0x0c, 0x81, 0x01, b'a']), None); // not minimal
        assert_eq!(parse_der_utf8_string(&[0x0c, 0x01, 0xff]), None); // not UTF-8
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(parse(b"\x30\x03abc").err(), Some(ParseError::Malformed));
    }
}
