//! The keys folder: the host key and admin token made on first run, kept private, loaded once.
//!
//! The folder is 0700 and every file in it 0600. A folder found looser is tightened (we own it);
//! a secret file found looser is refused, as OpenSSH refuses an unprotected private key, because
//! someone else may already have read it.
//!
//! One deliberate exception: the keys folder may be 0710, search without read for its group,
//! so that group can reach spawner tokens in `<keys_dir>/tokens` (0750, see `tokens.rs`) by
//! name. It can list nothing and every other file here stays 0600, so the host key and the
//! admin token stay private; any other looser bit is still tightened.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey};
use tracing::{info, warn};

use crate::secret::Secret;

const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// The admin token's file name inside the keys folder.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// What the broker loads from the keys folder at start.
pub struct Keys {
    /// The SSH host key; regenerating it would break every job's pinned `known_hosts`.
    pub host_key: PrivateKey,
    /// The bearer token of the admin API.
    pub admin_token: Secret,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field(
                "host_key",
                &self.host_key.fingerprint(HashAlg::Sha256).to_string(),
            )
            .field("admin_token", &self.admin_token)
            .finish()
    }
}

impl Keys {
    /// Loads the keys in `dir`, creating the folder, host key and token the first time.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        ensure_dir(dir, 0o010)?;
        let key_path = dir.join(HOST_KEY_FILE);
        let host_key = if key_path.exists() {
            check_private_file(&key_path)?;
            PrivateKey::read_openssh_file(&key_path)
                .with_context(|| format!("reading host key {}", key_path.display()))?
        } else {
            let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                .context("generating the host key")?;
            let pem = key
                .to_openssh(LineEnding::LF)
                .context("encoding the host key")?;
            write_private_file(&key_path, pem.as_bytes())?;
            let public = key
                .public_key()
                .to_openssh()
                .context("encoding the host key")?;
            write_private_file(
                &key_path.with_extension("pub"),
                format!("{public}\n").as_bytes(),
            )?;
            info!(path = %key_path.display(), fingerprint = %key.fingerprint(HashAlg::Sha256), "host key created");
            key
        };
        let token_path = dir.join(ADMIN_TOKEN_FILE);
        let admin_token = if token_path.exists() {
            read_secret_file(&token_path)?
        } else {
            let token = Secret::new(random_token());
            write_private_file(&token_path, format!("{}\n", token.expose()).as_bytes())?;
            info!(path = %token_path.display(), "admin token created");
            token
        };
        Ok(Self {
            host_key,
            admin_token,
        })
    }

    /// The host key as one `known_hosts` line for jobs, so they never need
    /// `StrictHostKeyChecking=no`. Without a configured host name the pattern is `*`: the file is
    /// private to one job and names only this key, so the pin holds for whatever name it dials.
    pub fn known_hosts_line(&self, host: Option<&str>, port: u16) -> String {
        let pattern = host.unwrap_or("*");
        let key = self.host_key.public_key().to_openssh().unwrap_or_default();
        if port == 22 {
            format!("{pattern} {key}")
        } else {
            format!("[{pattern}]:{port} {key}")
        }
    }
}

/// A fresh 256-bit token, hex encoded.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a token file (token on the first line), refusing one that others can read.
pub fn read_secret_file(path: &Path) -> anyhow::Result<Secret> {
    check_private_file(path)?;
    read_token(path)
}

/// The token a file holds (surrounding white space trimmed), its permissions checked by the caller.
pub fn read_token(path: &Path) -> anyhow::Result<Secret> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(Secret::new(token))
}

/// Creates `dir` 0700, or tightens an existing one that is looser.
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    ensure_dir(dir, 0)
}

/// Creates `dir` 0700, or tightens an existing one to 0700 plus whichever `allowed` bits it had.
fn ensure_dir(dir: &Path, allowed: u32) -> anyhow::Result<()> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        return Ok(());
    }
    let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 & !allowed != 0 {
        let tight = 0o700 | (mode & allowed);
        warn!(path = %dir.display(), mode = format!("{mode:o}"), to = format!("{tight:o}"), "tightening folder");
        fs::set_permissions(dir, fs::Permissions::from_mode(tight))
            .with_context(|| format!("chmod {tight:o} {}", dir.display()))?;
    }
    Ok(())
}

/// Refuses a secret file that group or others can access.
pub fn check_private_file(path: &Path) -> anyhow::Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "permissions {mode:04o} on {} are too open: it holds a secret; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// Writes `contents` to `path` as 0600, whole or not at all (temp file, fsync, rename).
pub fn write_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_run_creates_private_files_and_second_run_reuses_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let a = Keys::load_or_create(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for f in [HOST_KEY_FILE, ADMIN_TOKEN_FILE, "ssh_host_ed25519_key.pub"] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let b = Keys::load_or_create(&dir).unwrap();
        assert_eq!(a.host_key.public_key(), b.host_key.public_key());
        assert!(b.admin_token.matches(a.admin_token.expose()));
        assert!(!format!("{b:?}").contains(b.admin_token.expose()));
    }

    #[test]
    fn loose_secret_is_refused_and_loose_folder_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        Keys::load_or_create(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o764)).unwrap();
        Keys::load_or_create(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Group search is kept (spawner tokens below it), group read is not.
        for (set, kept) in [(0o710, 0o710), (0o750, 0o710), (0o711, 0o710)] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(set)).unwrap();
            Keys::load_or_create(&dir).unwrap();
            let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, kept, "{set:o}");
        }
        let token = dir.join(ADMIN_TOKEN_FILE);
        fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keys::load_or_create(&dir).unwrap_err();
        assert!(format!("{err:#}").contains("too open"), "{err:#}");
    }

    #[test]
    fn known_hosts_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = Keys::load_or_create(tmp.path()).unwrap();
        assert!(
            keys.known_hosts_line(None, 2222)
                .starts_with("[*]:2222 ssh-ed25519 ")
        );
        assert!(
            keys.known_hosts_line(Some("hub"), 22)
                .starts_with("hub ssh-ed25519 ")
        );
    }
}
