//! Secrets and node metadata that first start creates.
//!
//! Secrets come from the config file or the environment, never from a flag. Without one,
//! first start writes a random secret to the data dir with mode 0600.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use shardmall_persistence::Wal;

use crate::config::Config;

/// The fewest bytes a signing secret (JWT, payment callbacks) may have: an HMAC-SHA256
/// key shorter than the hash's 32 bytes is weaker than the signature it makes.
pub const MIN_SIGNING_SECRET: usize = 32;

/// Refuses a signing secret shorter than [`MIN_SIGNING_SECRET`].
fn long_enough(what: &str, secret: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    if secret.len() < MIN_SIGNING_SECRET {
        anyhow::bail!(
            "{what} is {} bytes; it must be at least {MIN_SIGNING_SECRET} (make one with `openssl rand -hex 32`)",
            secret.len()
        );
    }
    Ok(secret)
}

/// The JWT signing secret: configured, or `DIR/jwt.secret` (created when `create`).
pub fn jwt_secret(config: &Config, create: bool) -> anyhow::Result<Vec<u8>> {
    if let Some(s) = &config.jwt_secret {
        return long_enough("SHARDMALL_JWT_SECRET", s.as_bytes().to_vec());
    }
    let path = config.data_dir.join("jwt.secret");
    let secret = if create {
        file_secret(&path)
    } else {
        read_secret(&path).with_context(|| {
            format!(
                "no SHARDMALL_JWT_SECRET and no {} (start the node once first)",
                path.display()
            )
        })
    }?;
    long_enough(&path.display().to_string(), secret)
}

/// The payment callback secret: configured, or `DIR/payment.secret`.
pub fn payment_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    match &config.payment_secret {
        Some(s) => long_enough("SHARDMALL_PAYMENT_SECRET", s.as_bytes().to_vec()),
        None => {
            let path = config.data_dir.join("payment.secret");
            long_enough(&path.display().to_string(), file_secret(&path)?)
        }
    }
}

/// The cluster secret peers prove membership with: configured, or `DIR/cluster.secret`
/// (created at first start; every other member must then be given the same value in
/// `SHARDMALL_CLUSTER_SECRET`).
pub fn cluster_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    match &config.cluster_secret {
        Some(s) if s.len() < 16 => {
            anyhow::bail!("SHARDMALL_CLUSTER_SECRET must be at least 16 characters")
        }
        Some(s) => Ok(s.as_bytes().to_vec()),
        None => file_secret(&config.data_dir.join("cluster.secret")),
    }
}

/// A secret a joining node received from the cluster: kept in `DIR/<file>` (mode 0600)
/// so later starts use it, unless one is configured, which must then be the same.
pub fn adopt(
    config: &Config,
    file: &str,
    configured: Option<&str>,
    shared: &[u8],
) -> anyhow::Result<Vec<u8>> {
    if let Some(c) = configured {
        if c.as_bytes() != shared {
            anyhow::bail!("the configured {file} differs from the cluster's: tokens and callbacks would not be accepted by every node");
        }
        return Ok(shared.to_vec());
    }
    let path = config.data_dir.join(file);
    if path.exists() {
        let mine = read_secret(&path)?;
        if mine != shared {
            tracing::warn!(file = %path.display(), "replacing this node's own secret with the cluster's");
            std::fs::remove_file(&path)?;
        } else {
            return Ok(mine);
        }
    }
    write_secret(&path, shared)?;
    Ok(shared.to_vec())
}

fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        anyhow::bail!("{} is empty", path.display());
    }
    Ok(trimmed.as_bytes().to_vec())
}

fn file_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.exists() {
        return read_secret(path);
    }
    let secret = hex::encode(rand::random::<[u8; 32]>()).into_bytes();
    write_secret(path, &secret)?;
    Ok(secret)
}

fn write_secret(path: &Path, secret: &[u8]) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(secret)?;
    file.sync_all()?;
    Ok(())
}

/// The partition count is fixed when the data set is created; later starts keep it.
pub fn partition_count(wal: &Wal, configured: u16) -> anyhow::Result<u16> {
    match wal.meta_get("partitions")? {
        Some(bytes) => {
            let stored = u16::from_be_bytes(
                bytes
                    .as_slice()
                    .try_into()
                    .context("corrupt partition count in node metadata")?,
            );
            if stored != configured {
                tracing::warn!(
                    stored,
                    configured,
                    "the data set was created with another partition count; keeping it"
                );
            }
            Ok(stored)
        }
        None => {
            wal.meta_put("partitions", &configured.to_be_bytes())?;
            Ok(configured)
        }
    }
}

/// The cluster's id, created with the data set.
pub fn cluster_id(wal: &Wal) -> anyhow::Result<String> {
    if let Some(bytes) = wal.meta_get("cluster_id")? {
        return String::from_utf8(bytes).context("corrupt cluster id in node metadata");
    }
    let id = format!("c-{}", hex::encode(rand::random::<[u8; 8]>()));
    wal.meta_put("cluster_id", id.as_bytes())?;
    Ok(id)
}

/// This data dir's incarnation (`DIR/incarnation`), made at first start: random and
/// never 0, so the cluster tells a node that lost its data dir from the one it knew.
pub fn incarnation(config: &Config) -> anyhow::Result<u64> {
    let path = config.data_dir.join("incarnation");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n != 0)
            .with_context(|| format!("{} is not a node incarnation", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&config.data_dir)?;
            let n = rand::random::<u64>().max(1);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, n.to_string())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(n)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
