//! Tokens for the node under test: HS256 JWTs signed with the node's secret, the same
//! format `shardmall token` prints.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

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

    pub fn token(&self, role: &str, sub: &str) -> String {
        let claims = serde_json::json!({"sub": sub, "role": role, "exp": self.exp});
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{}.{}", self.header, payload);
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret)
            .expect("HMAC-SHA256 takes a key of any length");
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
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
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .expect("signature verifies with the same secret");
    }
}
