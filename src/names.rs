//! JupyterHub user and server names: which ones the broker accepts, and why.
//!
//! A name becomes a segment of a proxy route path (`<base_url>user/<user>/<server>`), so a name
//! that a URL normaliser can reinterpret (`.`, `..`, `%2e%2e`) would address another route,
//! the hub's own `/` included. The rules are JupyterHub 6.1.1's, plus ours:
//!
//! - user (`Authenticator.validate_username`, `jupyterhub/auth.py`): not empty, no `/`, not all
//!   dots before or after percent-decoding, no leading or trailing white space; and in the form
//!   the default `normalize_username` produces (lower case), since the hub never issues another.
//! - server (`is_valid_safe_slug`, `jupyterhub/slugs.py`, required for new named servers since
//!   JupyterHub 6): empty for the default server, else 1-30 characters of `a-z`, `0-9` and single
//!   `-`, starting with a letter and ending with a letter or digit.
//! - ours, for both: no control, bidi or zero-width characters (they hide what a log line or
//!   an admin's listing really says), at most 255 bytes (JupyterHub's column size).

use std::fmt;

/// JupyterHub keeps user names in a 255-character column; bytes bound the log lines too.
const MAX_USER_BYTES: usize = 255;
/// `jupyterhub/slugs.py` `_max_length`.
const MAX_SERVER_CHARS: usize = 30;

/// Why a name was refused; the text is the 400 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    field: &'static str,
    reason: &'static str,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.reason)
    }
}

impl std::error::Error for NameError {}

fn refuse(field: &'static str, reason: &'static str) -> Result<(), NameError> {
    Err(NameError { field, reason })
}

/// Checks a JupyterHub user name (already normalised by the hub).
pub fn check_user(name: &str) -> Result<(), NameError> {
    const F: &str = "user";
    if name.is_empty() {
        return refuse(F, "must not be empty");
    }
    if name.len() > MAX_USER_BYTES {
        return refuse(F, "is longer than 255 bytes");
    }
    hidden_characters(F, name)?;
    if name.contains('/') {
        return refuse(F, "must not contain '/'");
    }
    if all_dots(name) || all_dots(&percent_decode(name)) {
        return refuse(
            F,
            "must not be only dots (even percent-encoded): it would name another URL path",
        );
    }
    if name.trim() != name {
        return refuse(F, "must not start or end with white space");
    }
    if name.to_lowercase() != name {
        return refuse(
            F,
            "must be lower case, as JupyterHub's normalize_username leaves every name it issues",
        );
    }
    Ok(())
}

/// Checks a JupyterHub server name; "" is the default server.
pub fn check_server(name: &str) -> Result<(), NameError> {
    const F: &str = "server_name";
    if name.is_empty() {
        return Ok(());
    }
    hidden_characters(F, name)?;
    if all_dots(name) {
        return refuse(F, "must not be only dots: it would name another URL path");
    }
    let bytes = name.as_bytes();
    let safe_slug = bytes.len() <= MAX_SERVER_CHARS
        && bytes.first().is_some_and(u8::is_ascii_lowercase)
        && bytes
            .last()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && !name.contains("--");
    if !safe_slug {
        return refuse(
            F,
            "must be 1-30 characters of a-z, 0-9 and single '-', starting with a letter and \
             ending with a letter or digit (JupyterHub 6's server name rule)",
        );
    }
    Ok(())
}

/// Control, bidi and zero-width characters: they make a name look like another one.
fn hidden_characters(field: &'static str, name: &str) -> Result<(), NameError> {
    for c in name.chars() {
        if c.is_control() {
            return refuse(field, "must not contain control characters");
        }
        if matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
        {
            return refuse(
                field,
                "must not contain bidirectional formatting characters",
            );
        }
        if matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}') {
            return refuse(field, "must not contain zero-width characters");
        }
    }
    Ok(())
}

fn all_dots(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == b'.')
}

/// Python's `urllib.parse.unquote` for what matters here: `%XX` decoded, anything else kept.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            // Both digits are below 16, so the byte fits.
            out.push(u8::try_from(h * 16 + l).unwrap_or(0));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_jupyterhub_issues_are_accepted() {
        for user in [
            "alice",
            "a@b.c",
            "bob@example.org",
            "a b",
            "jörg",
            "o'neil",
            "a.b",
            ".a",
            "a%20b",
            "x".repeat(255).as_str(),
        ] {
            assert_eq!(check_user(user), Ok(()), "{user:?}");
        }
        for server in [
            "",
            "gpu",
            "gpu-1",
            "a",
            "a1",
            &format!("a{}", "b".repeat(29)),
        ] {
            assert_eq!(check_server(server), Ok(()), "{server:?}");
        }
    }

    #[test]
    fn names_hostile_users_are_refused_with_a_reason() {
        let table: &[(&str, &str)] = &[
            ("", "empty"),
            (".", "dots"),
            ("..", "dots"),
            ("...", "dots"),
            ("%2e%2e", "dots"),
            ("%2E.", "dots"),
            (".%2e", "dots"),
            ("a/b", "'/'"),
            ("../hub", "'/'"),
            (" alice", "white space"),
            ("alice ", "white space"),
            ("alice\u{3000}", "white space"),
            ("Alice", "lower case"),
            ("a\nb", "control"),
            ("a\0", "control"),
            ("a\u{7f}", "control"),
            ("a\u{85}", "control"),
            ("a\u{202E}b", "bidirectional"),
            ("a\u{2066}", "bidirectional"),
            ("a\u{200E}", "bidirectional"),
            ("a\u{200F}", "bidirectional"),
            ("a\u{061C}", "bidirectional"),
            ("a\u{200B}", "zero-width"),
            ("a\u{200C}", "zero-width"),
            ("a\u{200D}", "zero-width"),
            ("a\u{2060}", "zero-width"),
            ("\u{FEFF}alice", "zero-width"),
        ];
        for (name, why) in table {
            let err = check_user(name).expect_err(name);
            let text = err.to_string();
            assert!(
                text.starts_with("user ") && text.contains(why),
                "{name:?}: {text}"
            );
        }
        assert!(check_user(&"x".repeat(256)).is_err());
    }

    #[test]
    fn names_hostile_servers_are_refused_with_a_reason() {
        let table: &[(&str, &str)] = &[
            (".", "dots"),
            ("..", "dots"),
            ("....", "dots"),
            ("%2e%2e", "server name rule"),
            ("a/b", "server name rule"),
            ("gpu 1", "server name rule"),
            ("GPU", "server name rule"),
            ("1gpu", "server name rule"),
            ("gpu-", "server name rule"),
            ("a--b", "server name rule"),
            ("a?b", "server name rule"),
            ("a#b", "server name rule"),
            ("a\\b", "server name rule"),
            ("a\tb", "control"),
            ("a\u{202A}", "bidirectional"),
            ("a\u{FEFF}", "zero-width"),
        ];
        for (name, why) in table {
            let err = check_server(name).expect_err(name);
            let text = err.to_string();
            assert!(
                text.starts_with("server_name ") && text.contains(why),
                "{name:?}: {text}"
            );
        }
        assert!(check_server(&"a".repeat(31)).is_err());
    }

    #[test]
    fn names_percent_decoding_is_pythons() {
        assert_eq!(percent_decode("%2e%2E"), "..");
        assert_eq!(percent_decode("%2"), "%2");
        assert_eq!(percent_decode("%zz."), "%zz.");
        assert_eq!(percent_decode("a%20b"), "a b");
    }
}
