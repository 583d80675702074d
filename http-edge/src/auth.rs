//! Bearer JWT (HS256) with roles. Tokens are verified with a constant-time HMAC check,
//! an `alg` of exactly HS256, `iss` and `aud` of exactly [`ISSUER`] and [`AUDIENCE`], an
//! `exp` in the future, and a lifetime (`exp - iat`) of at most [`MAX_LIFETIME_SECS`].

use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The `iss` every token must carry.
pub const ISSUER: &str = "shardmall";
/// The `aud` every token must carry.
pub const AUDIENCE: &str = "shardmall-api";
/// The longest lifetime (`exp - iat`) a token may have: a year. A leaked token that
/// never expires is a credential that cannot be taken back short of a new secret.
pub const MAX_LIFETIME_SECS: u64 = 365 * 24 * 3600;
/// How far a token's `iat` may lie in the future (clocks of the signer and the node
/// disagree a little).
const CLOCK_SKEW_SECS: u64 = 300;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expires at, unix seconds.
    pub exp: u64,
}

impl Claims {
    /// Claims for `sub` as `role`, issued at `iat` and valid until `exp`, with this
    /// node's issuer and audience.
    pub fn new(sub: impl Into<String>, role: Role, iat: u64, exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            role,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat,
            exp,
        }
    }
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
    /// on every use.
    verified: Arc<Remembered>,
}

/// The header of every token [`JwtKeys::sign`] makes, base64url-encoded:
/// `{"alg":"HS256","typ":"JWT"}`.
const SIGNED_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// Verified tokens remembered per generation (a few MiB each).
const VERIFIED_CAP: usize = 16 * 1024;

/// Remembered tokens in two generations: new ones go into the current one; when it is
/// full, the previous one is emptied and becomes current. A token used again since the
/// last turn is moved into the current generation, so the tokens in use now survive a
/// turn (a sale's buyers retrying within seconds), unlike a map cleared when full, after
/// which every token misses at once. At most `2 * VERIFIED_CAP` tokens.
#[derive(Default)]
struct Remembered {
    generations: [DashMap<Box<str>, Claims>; 2],
    current: AtomicUsize,
}

impl Remembered {
    fn get(&self, token: &str) -> Option<Claims> {
        let cur = self.current.load(Ordering::Acquire);
        if let Some(claims) = self.generations[cur].get(token) {
            return Some(claims.clone());
        }
        let claims = self.generations[1 - cur].get(token)?.clone();
        self.insert(token, claims.clone());
        Some(claims)
    }

    fn insert(&self, token: &str, claims: Claims) {
        let cur = self.current.load(Ordering::Acquire);
        self.generations[cur].insert(token.into(), claims);
        if self.generations[cur].len() >= VERIFIED_CAP {
            // One caller turns the generations; the others keep inserting into the one
            // that just became previous, which is harmless.
            let next = 1 - cur;
            if self
                .current
                .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.generations[next].clear();
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.generations.iter().map(DashMap::len).sum()
    }
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
            verified: Arc::default(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let header = SIGNED_HEADER;
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
                return Ok(claims);
            }
        }
        let claims = self.verify_uncached(token, now_secs)?;
        self.verified.insert(token, claims.clone());
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
        // The header every token this node signs carries is recognised without decoding
        // it; any other is decoded and must still say HS256.
        if h != SIGNED_HEADER {
            let header: Header = URL_SAFE_NO_PAD
                .decode(h)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(bad)?;
            if header.alg != "HS256" {
                return Err(bad());
            }
        }
        // An HS256 signature is 32 bytes: 43 base64 characters, decoded on the stack.
        let mut sig = [0u8; 32];
        if s.len() != 43 || URL_SAFE_NO_PAD.decode_slice(s, &mut sig) != Ok(32) {
            return Err(bad());
        }
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
        if claims.iss != ISSUER || claims.aud != AUDIENCE {
            return Err(ApiError::unauthorized(
                "token issuer or audience is not this shop's",
            ));
        }
        if claims.iat > now_secs.saturating_add(CLOCK_SKEW_SECS)
            || claims.exp.saturating_sub(claims.iat) > MAX_LIFETIME_SECS
        {
            return Err(ApiError::unauthorized(
                "token lifetime is longer than a year or it is issued in the future",
            ));
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
        Claims::new("alice", Role::Customer, 0, exp)
    }

    fn sign_json(k: &JwtKeys, claims: serde_json::Value) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let mut mac = k.mac();
        mac.update(format!("{SIGNED_HEADER}.{payload}").as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{SIGNED_HEADER}.{payload}.{sig}")
    }

    /// A token signed with the right secret is still refused without this shop's issuer
    /// and audience, with a lifetime over a year, or issued in the future.
    #[test]
    fn refuses_foreign_issuers_audiences_and_long_lifetimes() {
        let k = JwtKeys::new(b"secret".to_vec());
        let now = 1_000_000;
        let good = serde_json::json!({"sub":"alice","role":"customer","iss":ISSUER,"aud":AUDIENCE,"iat":now,"exp":now + 60});
        assert!(k.verify(&sign_json(&k, good.clone()), now).is_ok());
        for (field, value) in [
            ("iss", serde_json::json!("someone-else")),
            ("aud", serde_json::json!("another-api")),
            ("exp", serde_json::json!(now + MAX_LIFETIME_SECS + 1)),
            ("iat", serde_json::json!(now + 3600)),
        ] {
            let mut c = good.clone();
            c[field] = value;
            assert_eq!(
                k.verify(&sign_json(&k, c), now).unwrap_err().code,
                "unauthorized",
                "{field}"
            );
        }
        for missing in ["iss", "aud", "iat"] {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove(missing);
            assert!(k.verify(&sign_json(&k, c), now).is_err(), "no {missing}");
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
    fn the_signed_header_is_the_hs256_jwt_header() {
        assert_eq!(
            SIGNED_HEADER,
            URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#)
        );
    }

    #[test]
    fn verifies_any_hs256_header_and_refuses_a_bad_signature_length() {
        let k = JwtKeys::new(b"secret".to_vec());
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(100)).unwrap());
        let mut mac = k.mac();
        mac.update(format!("{header}.{payload}").as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        let token = format!("{header}.{payload}.{sig}");
        assert_eq!(k.verify(&token, 1).unwrap().sub, "alice");
        let good = k.sign(&claims(100));
        assert!(k.verify(&format!("{good}A"), 1).is_err());
        assert!(k.verify(&good[..good.len() - 1], 1).is_err());
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

    /// A token in use survives a turn of the generations; one unused for two turns is
    /// forgotten (and still verifies, from scratch).
    #[test]
    fn tokens_in_use_are_remembered_across_a_turn() {
        let k = JwtKeys::new(b"secret".to_vec());
        let busy = k.sign(&claims(100));
        let mut idle = claims(100);
        idle.sub = "idle".into();
        let idle = k.sign(&idle);
        assert!(k.verify(&busy, 50).is_ok());
        assert!(k.verify(&idle, 50).is_ok());
        let cached = |t: &str| k.verified.generations.iter().any(|g| g.contains_key(t));
        for turn in 0..2 {
            for i in 0..VERIFIED_CAP {
                let mut c = claims(100);
                c.sub = format!("t{turn}-{i}");
                k.verify(&k.sign(&c), 50).unwrap();
                if i % 1024 == 0 {
                    // The busy buyer keeps sending requests.
                    assert!(k.verify(&busy, 50).is_ok());
                }
            }
        }
        assert!(cached(&busy), "a token in use is remembered");
        assert!(!cached(&idle), "a token unused for two turns is forgotten");
        assert!(k.verify(&idle, 50).is_ok());
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
        parts[1] = URL_SAFE_NO_PAD.encode(
            br#"{"sub":"mallory","role":"admin","iss":"shardmall","aud":"shardmall-api","iat":0,"exp":100}"#,
        );
        assert!(k.verify(&parts.join("."), 50).is_err());
        // Bounded: past the cap a generation turns, and every token still verifies.
        for i in 0..3 * VERIFIED_CAP {
            let mut c = claims(100);
            c.sub = format!("b{i}");
            assert!(k.verify(&k.sign(&c), 50).is_ok());
        }
        assert!(k.verified.len() <= 2 * VERIFIED_CAP);
        assert!(k.verify(&t, 50).is_ok());
    }
}
