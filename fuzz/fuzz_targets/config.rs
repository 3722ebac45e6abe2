//! `Config::parse` then `validate` on arbitrary text: errors are fine, panics are not.
//!
//! `validate` only stats `chp.token_file` / `chp.hub_token_file` (read-only), so arbitrary
//! paths are harmless.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelbot::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            if let Err(e) = config.validate() {
                // The message the operator sees is built too.
                let _ = format!("{e:#}");
            } else {
                // A config that validates keeps the range invariants the pool relies on.
                let ports = config.tunnels.ports;
                assert!(ports.first > 0 && ports.first <= ports.last);
                assert!(!ports.contains(config.ssh.listen.port()));
                assert!(!ports.contains(config.admin.listen.port()));
                assert!(config.tunnels.default_ttl <= config.tunnels.max_ttl);
                let _ = config.ssh_public_port(config.ssh.listen);
            }
        }
        Err(e) => {
            let _ = format!("{e:#}");
        }
    }
});
