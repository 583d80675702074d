//! Bearer JWT (HS256) with roles. Tokens are verified with a constant-time HMAC check,
//! an `alg` of exactly HS256, and an `exp` in the future.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::ApiError;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Admin,
    Operator,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "customer" => Some(Role::Customer),
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub exp: u64,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub sub: String,
    pub role: Role,
}

impl Caller {
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::forbidden("this role may not call this endpoint"))
        }
    }
}

/// The signing key, keyed once: HMAC's inner and outer pads are computed at start-up and
/// each verification clones the keyed state (a copy, no allocation).
#[derive(Clone)]
pub struct JwtKeys {
    keyed: HmacSha256,
    /// Tokens verified already, by their exact text: a client sends the same token with
    /// every request, and a hit costs a hash instead of two base64 decodes, two JSON
    /// parses and an HMAC. Only a byte-identical token can hit, and its expiry is checked
    /// on every use. Bounded: cleared when full.
    verified: Arc<DashMap<Box<str>, Claims>>,
}

/// Verified tokens remembered at most (a few MiB).
const VERIFIED_CAP: usize = 16 * 1024;

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(..)")
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
}

impl JwtKeys {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            // HMAC accepts keys of any length; this cannot fail.
            keyed: HmacSha256::new_from_slice(&secret.into()).expect("HMAC takes any key length"),
            verified: Arc::new(DashMap::new()),
        }
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        // Claims are plain strings and integers: serializing them cannot fail.
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Claims, ApiError> {
        if let Some(claims) = self.verified.get(token) {
            if claims.exp > now_secs {
                return Ok(claims.clone());
            }
        }
        let claims = self.verify_uncached(token, now_secs)?;
        if self.verified.len() >= VERIFIED_CAP {
            self.verified.clear();
        }
        self.verified.insert(token.into(), claims.clone());
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str, now_secs: u64) -> Result<Claims, ApiError> {
        let bad = || ApiError::unauthorized("invalid token");
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let header: Header = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(bad)?;
        if header.alg != "HS256" {
            return Err(bad());
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig).map_err(|_| bad())?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(bad)?;
        if claims.exp <= now_secs {
            return Err(ApiError::unauthorized("token expired"));
        }
        if !crate::validate::is_id(&claims.sub) {
            return Err(ApiError::unauthorized("token subject is not a valid id"));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            role: Role::Customer,
            exp,
        }
    }

    #[test]
    fn signs_and_verifies() {
        let k = JwtKeys::new(b"secret".to_vec());
        let t = k.sign(&claims(100));
        assert_eq!(k.verify(&t, 99).unwrap().sub, "alice");
        assert_eq!(k.verify(&t, 100).unwrap_err().code, "unauthorized");
    }

    #[test]
    fn refuses_forgeries() {
        let k = JwtKeys::new(b"secret".to_vec());
        let other = JwtKeys::new(b"other".to_vec());
        let t = other.sign(&claims(100));
        assert!(k.verify(&t, 1).is_err());
        assert!(k.verify("a.b", 1).is_err());
        assert!(k.verify("", 1).is_err());
        let good = k.sign(&claims(100));
        let mut parts: Vec<&str> = good.split('.').collect();
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        parts[0] = &none;
        assert!(k.verify(&parts.join("."), 1).is_err());
    }

    /// A remembered token still expires, and only the exact text verified hits.
    #[test]
    fn a_remembered_token_still_expires_and_nothing_else_hits() {
        let k = JwtKeys::new(b"secret".to_vec());
        let t = k.sign(&claims(100));
        assert!(k.verify(&t, 50).is_ok());
        assert!(k.verify(&t, 60).is_ok(), "from memory");
        assert_eq!(
            k.verify(&t, 100).unwrap_err().message,
            "token expired",
            "a hit past its expiry is refused"
        );
        // Same header and signature, another payload: refused although `t` is remembered.
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","role":"admin","exp":100}"#);
        assert!(k.verify(&parts.join("."), 50).is_err());
        // Bounded: past the cap the memory starts over, and every token still verifies.
        for i in 0..VERIFIED_CAP + 10 {
            let mut c = claims(100);
            c.sub = format!("b{i}");
            assert!(k.verify(&k.sign(&c), 50).is_ok());
        }
        assert!(k.verified.len() <= VERIFIED_CAP);
        assert!(k.verify(&t, 50).is_ok());
    }
}
