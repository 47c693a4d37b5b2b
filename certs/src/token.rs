//! The site enrollment token as an operator pastes it: the one-time secret and, after an `@`,
//! the gateway's key pin (`3f…a1@sha256:9c…0e`). With the pin, even the site's first contact
//! with the gateway is pinned; a token without one (older gateways) still parses, and the
//! caller warns that the first connection is trusted blindly.

use std::fmt;
use std::str::FromStr;

use crate::pin::Pin;

/// The longest secret accepted: the gateway makes 48 hex digits; the gateway's protocol
/// bound on tokens is the real limit, this only keeps a pasted mistake from being echoed.
const MAX_SECRET_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "an enrollment token is the text that `pinhole-gateway site-token create` printed (hexadecimal, then `@sha256:` and the gateway's key pin)"
    )]
    Secret,
    #[error("the gateway pin after `@` is not valid: {0}")]
    Pin(String),
}

/// An enrollment token: the secret the gateway checks, and the gateway's pin if it carries one.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    secret: String,
    pin: Option<Pin>,
}

impl EnrollmentToken {
    pub fn new(secret: &str, pin: Option<Pin>) -> Result<Self, TokenError> {
        if secret.is_empty()
            || secret.len() > MAX_SECRET_LEN
            || !secret.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(TokenError::Secret);
        }
        Ok(Self {
            secret: secret.to_owned(),
            pin,
        })
    }

    /// The one-time secret the gateway checks.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The gateway's key pin, if the token carries one.
    pub fn pin(&self) -> Option<Pin> {
        self.pin
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret never reaches a log.
        f.debug_struct("EnrollmentToken")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pin {
            Some(pin) => write!(f, "{}@{pin}", self.secret),
            None => f.write_str(&self.secret),
        }
    }
}

impl FromStr for EnrollmentToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().split_once('@') {
            Some((secret, pin)) => {
                let pin = pin
                    .parse::<Pin>()
                    .map_err(|e| TokenError::Pin(e.to_string()))?;
                Self::new(secret, Some(pin))
            }
            None => Self::new(s.trim(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_with_and_without_pin() {
        let pin = Pin::of_spki(b"gateway key");
        let t = EnrollmentToken::new("abcdef01", Some(pin)).expect("token");
        let text = t.to_string();
        assert_eq!(text, format!("abcdef01@{pin}"));
        assert_eq!(text.parse::<EnrollmentToken>(), Ok(t.clone()));
        let bare: EnrollmentToken = "abcdef01".parse().expect("bare");
        assert_eq!((bare.secret(), bare.pin()), ("abcdef01", None));
        assert_eq!("".parse::<EnrollmentToken>(), Err(TokenError::Secret));
        assert_eq!("ab cd".parse::<EnrollmentToken>(), Err(TokenError::Secret));
        assert!(matches!(
            "abcdef01@sha256:00".parse::<EnrollmentToken>(),
            Err(TokenError::Pin(_))
        ));
        assert!(!format!("{t:?}").contains("abcdef01"));
    }
}
