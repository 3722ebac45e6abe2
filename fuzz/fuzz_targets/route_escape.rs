//! `Route::for_server` on arbitrary user and server names (and base URL, target host, port).
//!
//! Input: `<base_url>\xFF<user>\xFF<server_name>\xFF<target_host>\xFF<port>`; missing fields
//! are empty, an unparsable port is 20001.
//!
//! Never panics, whatever the base URL. With a base URL `validate()` accepts (starts and ends
//! with '/'), the part after the base URL that `for_server` escapes holds only
//! `[A-Za-z0-9-._~@%/]`, with '/' only between user and server, and percent-decoding it gives
//! back the same part of `path`. When the base URL itself is made of those characters (and no
//! '%'), the whole of `escaped` is, and decodes to `path`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelbot::routes::{Route, escape};
use tunnelbot_fuzz::{fields, percent_decode};

fn safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@' | b'%' | b'/')
}

fuzz_target!(|data: &[u8]| {
    let [base_url, user, server_name, target_host, port] = fields::<5>(data);
    let port: u16 = port.trim().parse().unwrap_or(20001);

    // Anything at all: no panic.
    let _ = Route::for_server(&base_url, &user, &server_name, &target_host, port).data();

    let base_url = if base_url.starts_with('/') && base_url.ends_with('/') {
        base_url
    } else {
        "/".to_owned()
    };
    let r = Route::for_server(&base_url, &user, &server_name, &target_host, port);
    assert_eq!(r.user, user);
    assert_eq!(r.server_name, server_name);
    assert_eq!(r.target, format!("http://{target_host}:{port}"));
    let data = r.data();
    assert_eq!(data["user"].as_str(), Some(user.as_str()));
    assert_eq!(data["server_name"].as_str(), Some(server_name.as_str()));
    assert_eq!(data["jupyterhub"], serde_json::Value::Bool(true));

    // A single segment never holds a '/' once escaped, and decodes back.
    for segment in [&user, &server_name] {
        let e = escape(segment);
        assert!(
            e.bytes().all(|b| safe(b) && b != b'/'),
            "escape({segment:?}) = {e:?}"
        );
        assert_eq!(percent_decode(&e).as_deref(), Some(segment.as_bytes()));
    }

    let prefix = format!("{base_url}user/");
    let path_rest = r
        .path
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("path {:?} lacks {prefix:?}", r.path));
    let escaped_rest = r
        .escaped
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("escaped {:?} lacks {prefix:?}", r.escaped));
    assert!(
        escaped_rest.bytes().all(safe),
        "escaped {:?} holds a character outside [A-Za-z0-9-._~@%/] (user {user:?}, server {server_name:?})",
        r.escaped
    );
    let slashes = escaped_rest.bytes().filter(|&b| b == b'/').count();
    assert_eq!(
        slashes,
        usize::from(!server_name.is_empty()),
        "escaped {:?}",
        r.escaped
    );
    assert_eq!(
        percent_decode(escaped_rest).as_deref(),
        Some(path_rest.as_bytes()),
        "escaped {:?} does not decode to path {:?}",
        r.escaped,
        r.path
    );
    if base_url.bytes().all(|b| safe(b) && b != b'%') {
        assert!(r.escaped.bytes().all(safe), "escaped {:?}", r.escaped);
        assert_eq!(
            percent_decode(&r.escaped).as_deref(),
            Some(r.path.as_bytes())
        );
    }
});
