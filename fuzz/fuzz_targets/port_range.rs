//! `str::parse::<PortRange>`: never panics; what parses is a non-empty range without port 0
//! whose `Display` form parses back to the same range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelbot::config::PortRange;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let range = match text.parse::<PortRange>() {
        Ok(r) => r,
        Err(e) => {
            let _ = format!("{e:#}");
            return;
        }
    };
    let (first, last) = (range.first(), range.last());
    assert!(first > 0, "{text:?} gave {range:?}");
    assert!(first <= last, "{text:?} gave {range:?}");
    assert_eq!(
        range.len().get(),
        usize::from(last) - usize::from(first) + 1
    );
    assert!(range.contains(first) && range.contains(last));
    assert!(!range.contains(0));
    let shown = range.to_string();
    let again: PortRange = shown
        .parse()
        .unwrap_or_else(|e| panic!("{shown:?} (from {text:?}) does not parse back: {e:#}"));
    assert_eq!(again, range, "{text:?} -> {shown:?}");
    // The TOML path (`ports = "..."`) goes through the same parser.
    let toml = format!("[tunnels]\nports = {:?}\n", shown);
    let config = tunnelbot::Config::parse(&toml)
        .unwrap_or_else(|e| panic!("{toml:?} does not parse: {e:#}"));
    assert_eq!(config.tunnels.ports, range);
});
