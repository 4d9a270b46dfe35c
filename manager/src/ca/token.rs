//! Join tokens: `SHOAL-1-<base36 sha256 of the CA cert DER>-<base36 secret>`.
//!
//! The digest lets a joining node check the CA it is served before trusting it; the secret
//! (128 random bits) decides the role. Tokens are compared in constant time.

use std::fmt;

use rand::RngCore;

use super::{CaError, Role};

const PREFIX: &str = "SHOAL";
const VERSION: &str = "1";
/// Random bytes in a token secret (128 bits).
const SECRET_BYTES: usize = 16;
/// Base36 digits of a 128-bit number (36^25 > 2^128).
const SECRET_DIGITS: usize = 25;
/// Base36 digits of a 256-bit number (36^50 > 2^256).
pub(crate) const DIGEST_DIGITS: usize = 50;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    ca_digest: String,
    secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret is a credential: never in logs.
        write!(f, "JoinToken({PREFIX}-{VERSION}-{}-…)", self.ca_digest)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}-{VERSION}-{}-{}", self.ca_digest, self.secret)
    }
}

impl JoinToken {
    /// A new token with a fresh random secret for the CA of this digest.
    pub fn generate(ca_digest: &str) -> JoinToken {
        let mut secret = [0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        JoinToken {
            ca_digest: ca_digest.to_string(),
            secret: base36(&secret, SECRET_DIGITS),
        }
    }

    /// Parses `SHOAL-1-<digest>-<secret>`, with an error naming what is wrong.
    pub fn parse(s: &str) -> Result<JoinToken, CaError> {
        let s = s.trim();
        let mut parts = s.split('-');
        let (Some(prefix), Some(version), Some(digest), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CaError::TokenMalformed(
                "expected SHOAL-1-<ca digest>-<secret>",
            ));
        };
        if prefix != PREFIX {
            return Err(CaError::TokenMalformed("does not start with SHOAL-"));
        }
        if version != VERSION {
            return Err(CaError::TokenMalformed("unsupported token version"));
        }
        if digest.len() != DIGEST_DIGITS || !is_base36(digest) {
            return Err(CaError::TokenMalformed(
                "CA digest must be 50 lowercase base36 digits",
            ));
        }
        if secret.len() != SECRET_DIGITS || !is_base36(secret) {
            return Err(CaError::TokenMalformed(
                "secret must be 25 lowercase base36 digits",
            ));
        }
        Ok(JoinToken {
            ca_digest: digest.to_string(),
            secret: secret.to_string(),
        })
    }

    /// The base36 SHA-256 digest of the CA certificate this token trusts.
    pub fn ca_digest(&self) -> &str {
        &self.ca_digest
    }

    /// Whether `other` is the same token, in time independent of where they differ.
    pub fn matches(&self, other: &JoinToken) -> bool {
        // Both halves are always compared so timing shows nothing about which one differs.
        let digest = constant_time_eq(self.ca_digest.as_bytes(), other.ca_digest.as_bytes());
        let secret = constant_time_eq(self.secret.as_bytes(), other.secret.as_bytes());
        digest & secret
    }
}

/// The cluster's two current join tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinTokens {
    pub worker: JoinToken,
    pub manager: JoinToken,
}

impl JoinTokens {
    /// Fresh tokens for both roles.
    pub fn generate(ca_digest: &str) -> JoinTokens {
        JoinTokens {
            worker: JoinToken::generate(ca_digest),
            manager: JoinToken::generate(ca_digest),
        }
    }

    /// Parses the stored form (`objects.proto` `JoinTokens`).
    pub fn from_proto(p: &shoal_proto::v1::JoinTokens) -> Result<JoinTokens, CaError> {
        Ok(JoinTokens {
            worker: JoinToken::parse(&p.worker)?,
            manager: JoinToken::parse(&p.manager)?,
        })
    }

    /// The stored form (`objects.proto` `JoinTokens`).
    pub fn to_proto(&self) -> shoal_proto::v1::JoinTokens {
        shoal_proto::v1::JoinTokens {
            worker: self.worker.to_string(),
            manager: self.manager.to_string(),
        }
    }

    /// The token of a role.
    pub fn get(&self, role: Role) -> &JoinToken {
        match role {
            Role::Manager => &self.manager,
            Role::Worker => &self.worker,
        }
    }

    /// Replaces a role's token with a new one; the old one is refused from then on.
    pub fn rotate(&mut self, role: Role) {
        let fresh = JoinToken::generate(&self.worker.ca_digest);
        match role {
            Role::Manager => self.manager = fresh,
            Role::Worker => self.worker = fresh,
        }
    }

    /// The role a presented token grants, if it is one of the current tokens.
    pub fn role_of(&self, presented: &JoinToken) -> Option<Role> {
        // Compare against both, always, so timing does not tell which role was close.
        let manager = self.manager.matches(presented);
        let worker = self.worker.matches(presented);
        match (manager, worker) {
            (true, _) => Some(Role::Manager),
            (false, true) => Some(Role::Worker),
            (false, false) => None,
        }
    }
}

fn is_base36(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// `bytes` as a big-endian number in lowercase base36, left-padded with zeros to `width`.
pub(crate) fn base36(bytes: &[u8], width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut num = bytes.to_vec();
    let mut out = Vec::with_capacity(width);
    while num.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in num.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 36) as u8;
            rem = cur % 36;
        }
        out.push(DIGITS[rem as usize]);
    }
    while out.len() < width {
        out.push(b'0');
    }
    out.reverse();
    out.into_iter().map(char::from).collect()
}

/// A fresh random node id: 128 bits in base36.
pub(crate) fn random_id() -> String {
    let mut b = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base36(&b, SECRET_DIGITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> String {
        base36(&[7u8; 32], DIGEST_DIGITS)
    }

    #[test]
    fn base36_is_fixed_width_and_exact() {
        assert_eq!(base36(&[0], 3), "000");
        assert_eq!(base36(&[35], 1), "z");
        assert_eq!(base36(&[1, 0], 1), "74"); // 256 = 7*36 + 4
        assert_eq!(base36(&[0xff; 32], DIGEST_DIGITS).len(), DIGEST_DIGITS);
        assert_eq!(base36(&[0xff; 16], SECRET_DIGITS).len(), SECRET_DIGITS);
    }

    #[test]
    fn round_trip_and_role() {
        let tokens = JoinTokens::generate(&digest());
        let text = tokens.worker.to_string();
        assert!(text.starts_with("SHOAL-1-"));
        let parsed = JoinToken::parse(&text).unwrap();
        assert_eq!(tokens.role_of(&parsed), Some(Role::Worker));
        let m = JoinToken::parse(&tokens.manager.to_string()).unwrap();
        assert_eq!(tokens.role_of(&m), Some(Role::Manager));
        assert_ne!(tokens.worker, tokens.manager);
    }

    #[test]
    fn rotated_out_token_is_refused() {
        let mut tokens = JoinTokens::generate(&digest());
        let old = tokens.worker.clone();
        tokens.rotate(Role::Worker);
        assert_eq!(tokens.role_of(&old), None);
        assert_eq!(tokens.role_of(&tokens.worker.clone()), Some(Role::Worker));
    }

    #[test]
    fn malformed_tokens_say_why() {
        let ok = JoinToken::generate(&digest()).to_string();
        for (bad, why) in [
            ("", "expected"),
            ("SHOAL-1-abc", "expected"),
            (&ok.replace("SHOAL", "SWARM"), "SHOAL-"),
            (&ok.replace("SHOAL-1", "SHOAL-2"), "version"),
            (&format!("{ok}-x"), "expected"),
            (
                &format!("SHOAL-1-{}-{}", "A".repeat(50), "a".repeat(25)),
                "digest",
            ),
            (
                &format!("SHOAL-1-{}-{}", digest(), "a".repeat(24)),
                "secret",
            ),
        ] {
            let err = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = JoinToken::generate(&digest());
        assert!(!format!("{t:?}").contains(&t.secret));
    }
}
