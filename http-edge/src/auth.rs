//! Bearer JWT (HS256) with roles. Tokens are verified with a constant-time HMAC check,
//! an `alg` of exactly HS256, and an `exp` in the future.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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
}

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
}
