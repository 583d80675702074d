//! `shardmall token`: tokens signed with the node's JWT secret, one for `--sub`, or
//! `--count` of them for subjects `PREFIX0` .. `PREFIX(N-1)` (API.md, "Command line").

use std::io::{BufWriter, Write};
use std::time::Duration;

use anyhow::Context;
use shardmall_http_edge::{Claims, JwtKeys, Role};

use crate::cli::{self, TokenArgs};
use crate::config::Config;
use crate::secrets;

/// The longest lifetime a token may be given: the longest a node accepts.
const MAX_TTL: Duration = Duration::from_secs(shardmall_http_edge::auth::MAX_LIFETIME_SECS);

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let config = Config::load(&cli::ServeArgs {
        config: args.serve.config.clone(),
        data_dir: args.serve.data_dir.clone(),
        ..Default::default()
    })?;
    let role = Role::parse(&args.role)
        .with_context(|| format!("unknown role {:?}: customer, admin or operator", args.role))?;
    let ttl =
        humantime::parse_duration(&args.ttl).with_context(|| format!("--ttl {:?}", args.ttl))?;
    if ttl.is_zero() || ttl > MAX_TTL {
        anyhow::bail!("--ttl must be more than 0 and at most 365 days");
    }
    let now = shardmall_http_edge::extract::now_secs();
    let exp = now
        .checked_add(ttl.as_secs())
        .context("--ttl: the expiry overflows")?;
    let subjects = subjects(&args)?;
    let keys = JwtKeys::new(secrets::jwt_secret(&config, false)?);
    let out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(create_private(path)?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::new(out);
    for sub in subjects {
        let token = keys.sign(&Claims::new(sub, role, now, exp));
        writeln!(out, "{token}").context("writing the tokens")?;
    }
    out.flush().context("writing the tokens")?;
    Ok(())
}

/// The subjects to sign for, each checked against the id format.
fn subjects(args: &TokenArgs) -> anyhow::Result<Box<dyn Iterator<Item = String>>> {
    let valid = |s: &str| shardmall_http_edge::validate::is_id(s);
    match (&args.sub, args.count) {
        (Some(sub), None) => {
            if !valid(sub) {
                anyhow::bail!("--sub must match [A-Za-z0-9._-]{{1,64}}");
            }
            Ok(Box::new(std::iter::once(sub.clone())))
        }
        (None, Some(count)) => {
            // The longest subject is the last one.
            let last = format!("{}{}", args.prefix, count - 1);
            if !valid(&args.prefix) || !valid(&last) {
                anyhow::bail!(
                    "--prefix {:?} with --count {count} makes subjects like {last:?}: they must match [A-Za-z0-9._-]{{1,64}}",
                    args.prefix
                );
            }
            let prefix = args.prefix.clone();
            Ok(Box::new((0..count).map(move |i| format!("{prefix}{i}"))))
        }
        _ => anyhow::bail!("give --sub, or --count (with --prefix and --out)"),
    }
}

/// Creates `path` for the tokens: new (never over an existing file), readable by its
/// owner only, since the tokens are credentials.
fn create_private(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))
}
