//! Tokens for the node under test: HS256 JWTs signed with the node's secret, the same
//! format `shardmall token` prints.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    role: &'a str,
    exp: u64,
}

pub struct Minter {
    secret: Vec<u8>,
    header: String,
    exp: u64,
}

impl Minter {
    /// Tokens valid for `ttl_secs` from now.
    pub fn new(secret: &[u8], ttl_secs: u64) -> Minter {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Minter {
            secret: secret.to_vec(),
            header: URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
            exp: now + ttl_secs,
        }
    }

    /// Hot path in a flash sale (one token per buy, a few microseconds): one buffer for
    /// the claims, one for the token.
    pub fn token(&self, role: &str, sub: &str) -> String {
        let claims = Claims {
            sub,
            role,
            exp: self.exp,
        };
        // Serializing three plain fields into a Vec cannot fail.
        let claims = serde_json::to_vec(&claims).unwrap_or_default();
        let mut token = String::with_capacity(self.header.len() + 2 * claims.len() + 48);
        token.push_str(&self.header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret)
            .expect("HMAC-SHA256 takes a key of any length");
        mac.update(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), &mut token);
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_nodes_shape_and_verify() {
        let m = Minter::new(b"secret", 60);
        let t = m.token("customer", "buyer-1");
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "buyer-1");
        assert_eq!(claims["role"], "customer");
        assert!(claims["exp"].as_u64().unwrap() > 60);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header, serde_json::json!({"alg": "HS256", "typ": "JWT"}));
        assert!(!t.contains('=') && !t.contains('+') && !t.contains('/'));
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .expect("signature verifies with the same secret");
    }
}
