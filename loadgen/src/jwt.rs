//! Tokens for the node under test: HS256 JWTs signed with the node's secret, the same
//! format `shardmall token` prints, or read from a file of customer tokens that
//! `shardmall token --count N --prefix P --out FILE` wrote (no secret needed then).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    role: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

pub struct Minter {
    secret: Vec<u8>,
    header: String,
    iat: u64,
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
            iat: now,
            exp: now + ttl_secs,
        }
    }

    /// Hot path in a flash sale (one token per buy, a few microseconds): one buffer for
    /// the claims, one for the token.
    pub fn token(&self, role: &str, sub: &str) -> String {
        let claims = Claims {
            sub,
            role,
            // The issuer and audience a node requires (its `auth` module).
            iss: "shardmall",
            aud: "shardmall-api",
            iat: self.iat,
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

/// Where the buyers' tokens come from.
pub enum Tokens {
    /// Signed here with the node's secret, for any buyer name.
    Minted(Minter),
    /// Read from a file: the buyers are the subjects of its tokens, in file order.
    Listed {
        subjects: Vec<String>,
        by_subject: HashMap<String, String>,
    },
}

impl Tokens {
    /// The tokens of `path`, one a line (blank lines skipped); each names its buyer in
    /// its `sub` and must be a customer's.
    pub fn from_file(path: &Path) -> anyhow::Result<Tokens> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokens from {}", path.display()))?;
        let mut subjects = Vec::new();
        let mut by_subject = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() {
                continue;
            }
            let (sub, role) = subject_of(token)
                .with_context(|| format!("{} line {}: not a token", path.display(), n + 1))?;
            if role != "customer" {
                bail!(
                    "{} line {}: a {role}'s token; the file must hold customer tokens",
                    path.display(),
                    n + 1
                );
            }
            if by_subject.insert(sub.clone(), token.to_owned()).is_none() {
                subjects.push(sub);
            }
        }
        if subjects.is_empty() {
            bail!("{} holds no tokens", path.display());
        }
        Ok(Tokens::Listed {
            subjects,
            by_subject,
        })
    }

    /// Buyer `i`'s name: `PREFIX(i % n)` when minting, else the `i % len`th subject of
    /// the file.
    pub fn buyer(&self, prefix: &str, i: u64, n: u64) -> String {
        match self {
            Tokens::Minted(_) => format!("{prefix}{}", i % n.max(1)),
            Tokens::Listed { subjects, .. } => {
                subjects[(i % subjects.len() as u64) as usize].clone()
            }
        }
    }

    /// How many distinct buyers there are: `n` when minting, else the file's.
    pub fn buyers(&self, n: u64) -> u64 {
        match self {
            Tokens::Minted(_) => n,
            Tokens::Listed { subjects, .. } => subjects.len() as u64,
        }
    }

    /// The customer token of `buyer` (empty for a buyer the file does not hold: the node
    /// answers 401, which the run reports).
    pub fn customer(&self, buyer: &str) -> String {
        match self {
            Tokens::Minted(m) => m.token("customer", buyer),
            Tokens::Listed { by_subject, .. } => by_subject.get(buyer).cloned().unwrap_or_default(),
        }
    }
}

/// The `sub` and `role` a token's payload names (its signature is the node's to check).
fn subject_of(token: &str) -> anyhow::Result<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Named {
        sub: String,
        role: String,
    }
    let payload = token.split('.').nth(1).context("no payload")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .context("payload is not base64url")?;
    let named: Named = serde_json::from_slice(&bytes).context("payload names no sub and role")?;
    Ok((named.sub, named.role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_tokens_names_its_buyers_in_order() {
        let m = Minter::new(b"secret", 60);
        let dir = std::env::temp_dir().join(format!("lg-tokens-{}", std::process::id()));
        let file = dir.with_extension("txt");
        let lines = [
            m.token("customer", "b-0"),
            String::new(),
            m.token("customer", "b-1"),
        ];
        std::fs::write(&file, lines.join("\n")).unwrap();
        let t = Tokens::from_file(&file).unwrap();
        assert_eq!(t.buyers(1_000), 2);
        assert_eq!(
            (t.buyer("x-", 0, 9), t.buyer("x-", 3, 9)),
            ("b-0".into(), "b-1".into())
        );
        assert_eq!(t.customer("b-1"), lines[2]);
        assert_eq!(t.customer("nobody"), "");
        std::fs::write(&file, m.token("admin", "root")).unwrap();
        let e = Tokens::from_file(&file).err().unwrap().to_string();
        assert!(e.contains("customer tokens"), "{e}");
        std::fs::write(&file, "not-a-token\n").unwrap();
        assert!(Tokens::from_file(&file).is_err());
        std::fs::remove_file(&file).unwrap();
    }

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
        assert_eq!(claims["iss"], "shardmall");
        assert_eq!(claims["aud"], "shardmall-api");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            60
        );
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
