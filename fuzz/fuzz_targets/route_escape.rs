//! The typed route path and CHP's escaping on arbitrary user and server names (and base URL).
//!
//! Input: `<base_url>\xFF<user>\xFF<server_name>`; missing fields are empty.
//!
//! `BaseUrl::new` and `RoutePath::new` never panic. A path they accept reads back through
//! `RoutePath::parse` as itself (so the reconciler recognises every route it writes), its
//! segments hold no '/' and are never empty or all dots, and each segment escaped as CHP's
//! URLs escape it holds only `[A-Za-z0-9-._~@%]` and percent-decodes back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelbot::routes::chp::escape;
use tunnelbot::routes::{BaseUrl, RoutePath};
use tunnelbot_fuzz::{fields, percent_decode};

fn safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@' | b'%')
}

fuzz_target!(|data: &[u8]| {
    let [base_url, user, server_name] = fields::<3>(data);
    let base = BaseUrl::new(&base_url)
        .unwrap_or_else(|_| BaseUrl::new("/").unwrap_or_else(|e| panic!("{e}")));
    let Ok(path) = RoutePath::new(&base, &user, &server_name) else {
        return;
    };
    assert_eq!(path.user(), user);
    assert_eq!(path.server_name(), server_name);
    assert_eq!(
        RoutePath::parse(&base, &path.to_string()).as_ref(),
        Some(&path),
        "{path} does not read back"
    );
    for segment in path.segments() {
        assert!(
            !segment.is_empty() && !segment.contains('/') && !segment.bytes().all(|b| b == b'.'),
            "segment {segment:?} of {path}"
        );
        let e = escape(segment);
        assert!(e.bytes().all(safe), "escape({segment:?}) = {e:?}");
        assert_eq!(percent_decode(&e).as_deref(), Some(segment.as_bytes()));
    }
});
