//! Admin API tokens and their scopes: the full admin token, and spawner tokens that may only
//! manage tunnels.
//!
//! | request | admin token | spawner token |
//! |---|---|---|
//! | `POST /api/v1/tunnels`, `GET /api/v1/tunnels` | yes | yes |
//! | `GET`, `DELETE /api/v1/tunnels/{id}` | yes | yes |
//! | `POST /api/v1/tunnels/{id}/renew` | yes | yes |
//! | any other `/api/v1/...` (today none; later config, reload) | yes | no (403) |
//! | `/healthz`, `/readyz`, `/metrics` | not needed | not needed |
//!
//! Spawner tokens are files `spawner-<name>.token` in the tokens folder (`admin.tokens_dir`,
//! default `<keys_dir>/tokens`). They are read again on every request that does not carry the
//! admin token: deleting a file revokes its token at once and `tunnelbot token create` needs no
//! restart or signal, and the cost (a directory listing and a few small reads) is nothing at
//! the rate a hub calls. Unlike `admin.token` they may be group-readable, so a hub running as
//! another user in that group can read one; a file that others can read, or that group or
//! others can write, is refused, as is a folder that group or others can write (anyone who
//! could add a file there could mint a token). Tokens are compared in constant time and never
//! logged.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use axum::http::Method;

use crate::secret::Secret;

/// File name prefix and suffix of a spawner token.
pub const SPAWNER_PREFIX: &str = "spawner-";
/// File name suffix of every scoped token.
pub const TOKEN_SUFFIX: &str = ".token";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Admin,
    /// Issue, list, show, renew and revoke tunnels; nothing else.
    Spawner,
}

/// Whether a spawner token may make this request (the table in the module doc). Anything not
/// listed needs the admin token, so a route added later is admin-only until listed here.
pub fn spawner_may(method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/api/v1/tunnels") else {
        return false;
    };
    let segments: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        match rest.strip_prefix('/') {
            Some(r) => r.split('/').collect(),
            None => return false,
        }
    };
    match (segments.as_slice(), method) {
        ([], &Method::GET | &Method::POST) => true,
        ([id], &Method::GET | &Method::DELETE) => !id.is_empty(),
        ([id, "renew"], &Method::POST) => !id.is_empty(),
        _ => false,
    }
}

/// The spawner tokens in `dir` now, and a line for each file or folder refused (paths only,
/// never contents). A missing folder holds no tokens.
pub fn load_spawner_tokens(dir: &Path) -> (Vec<Secret>, Vec<String>) {
    let mut tokens = Vec::new();
    let mut refused = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (tokens, refused),
        Err(e) => {
            refused.push(format!("{}: {e}", dir.display()));
            return (tokens, refused);
        }
    };
    if let Err(e) = check_tokens_dir(dir) {
        refused.push(format!("{e:#}"));
        return (tokens, refused);
    }
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(SPAWNER_PREFIX) && name.ends_with(TOKEN_SUFFIX)) {
            continue;
        }
        match read_scoped_file(&entry.path()) {
            Ok(t) => tokens.push(t),
            Err(e) => refused.push(format!("{e:#}")),
        }
    }
    (tokens, refused)
}

/// Refuses a tokens folder that group or others can write.
pub fn check_tokens_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() || mode & 0o022 != 0 {
        bail!(
            "{} is refused: it must be a folder that only its owner can write (0750), not {mode:04o}",
            dir.display()
        );
    }
    Ok(())
}

/// Reads a scoped token file: a regular file, group-readable at most (0640), never readable by
/// others nor writable by anyone but its owner.
pub fn read_scoped_file(path: &Path) -> anyhow::Result<Secret> {
    // symlink_metadata: a link could point at a file with other permissions.
    let meta = fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.file_type().is_file() || mode & 0o7137 != 0 {
        bail!(
            "{} is refused: a token file must be a regular file with mode 0640 or tighter, not {mode:04o}",
            path.display()
        );
    }
    crate::keys::read_token(path)
}

/// Makes a spawner token `spawner-<name>.token` in `dir` for group `group` (by name): the
/// folder 0750 and the file 0640, both owned by `owner` (the broker's user, which must read
/// them) and group `group` (the hub's, which may read them). An existing token of that name is
/// replaced, which revokes the old one. Returns the file's path.
pub fn create_spawner_token(
    dir: &Path,
    name: &str,
    group: &str,
    owner: u32,
) -> anyhow::Result<PathBuf> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("token name {name:?} may hold only letters, digits, '-' and '_'");
    }
    let gid = nix::unistd::Group::from_name(group)
        .with_context(|| format!("looking up group {group:?}"))?
        .with_context(|| format!("no group named {group:?}"))?
        .gid
        .as_raw();
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    std::os::unix::fs::chown(dir, Some(owner), Some(gid))
        .with_context(|| format!("chown {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o750))
        .with_context(|| format!("chmod 0750 {}", dir.display()))?;
    let path = dir.join(format!("{SPAWNER_PREFIX}{name}{TOKEN_SUFFIX}"));
    let tmp = dir.join(format!(".{SPAWNER_PREFIX}{name}{TOKEN_SUFFIX}.tmp"));
    // Written 0600 first, then handed to the group: never readable by the group half-written.
    crate::keys::write_private_file(
        &tmp,
        format!("{}\n", crate::keys::random_token()).as_bytes(),
    )?;
    std::os::unix::fs::chown(&tmp, Some(owner), Some(gid))
        .with_context(|| format!("chown {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o640))
        .with_context(|| format!("chmod 0640 {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(path)
}

/// The first folder above `path` that members of group `gid` cannot pass through (no search
/// permission for the group or for others), if any: the hub could not open the token there.
pub fn unreachable_ancestor(path: &Path, gid: u32) -> Option<PathBuf> {
    path.ancestors().skip(1).find_map(|dir| {
        let meta = fs::metadata(dir).ok()?;
        let mode = meta.permissions().mode();
        let passes = mode & 0o001 != 0 || (meta.gid() == gid && mode & 0o010 != 0);
        (!passes).then(|| dir.to_path_buf())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spawner_scope_is_the_tunnels_api_only() {
        let ok = [
            (Method::GET, "/api/v1/tunnels"),
            (Method::POST, "/api/v1/tunnels"),
            (Method::GET, "/api/v1/tunnels/tb_1"),
            (Method::DELETE, "/api/v1/tunnels/tb_1"),
            (Method::POST, "/api/v1/tunnels/tb_1/renew"),
        ];
        for (m, p) in &ok {
            assert!(spawner_may(m, p), "{m} {p}");
        }
        let refused = [
            (Method::DELETE, "/api/v1/tunnels"),
            (Method::PUT, "/api/v1/tunnels/tb_1"),
            (Method::GET, "/api/v1/tunnels/tb_1/renew"),
            (Method::POST, "/api/v1/tunnels/tb_1/other"),
            (Method::GET, "/api/v1/tunnelsx"),
            (Method::GET, "/api/v1/tunnels//"),
            (Method::POST, "/api/v1/reload"),
            (Method::GET, "/api/v1/config"),
            (Method::GET, "/api/v2/tunnels"),
        ];
        for (m, p) in &refused {
            assert!(!spawner_may(m, p), "{m} {p}");
        }
    }

    #[test]
    fn token_files_may_be_group_readable_but_nothing_looser() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tokens");
        let path = create_spawner_token(&dir, "hub", "root", 0).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&dir), mode(&path)), (0o750, 0o640));
        let (tokens, refused) = load_spawner_tokens(&dir);
        assert_eq!((tokens.len(), refused.len()), (1, 0));
        let text = fs::read_to_string(&path).unwrap();
        assert!(tokens[0].matches(text.trim()));
        for (bad, ok) in [(0o644, false), (0o660, false), (0o600, true), (0o440, true)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let (tokens, refused) = load_spawner_tokens(&dir);
            assert_eq!(tokens.len() == 1, ok, "{bad:o}");
            if !ok {
                assert!(refused[0].contains("0640 or tighter"), "{refused:?}");
                assert!(!refused[0].contains(text.trim()), "token in a message");
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        let (tokens, refused) = load_spawner_tokens(&dir);
        assert!(tokens.is_empty() && refused[0].contains("only its owner can write"));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        // Other files are ignored; a missing folder holds no tokens and is no error.
        fs::write(dir.join("notes.txt"), "x").unwrap();
        assert_eq!(load_spawner_tokens(&dir).0.len(), 1);
        let (t, r) = load_spawner_tokens(&tmp.path().join("absent"));
        assert!(t.is_empty() && r.is_empty());
        assert!(create_spawner_token(&dir, "../x", "root", 0).is_err());
        assert!(create_spawner_token(&dir, "x", "no-such-group-tb", 0).is_err());
    }
}
