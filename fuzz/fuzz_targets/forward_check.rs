//! `check_forward(grant, bind, address, port)` on an arbitrary bind address and port, with the
//! tunnels bound on 127.0.0.1.
//!
//! Input: `<grant port>\xFF<requested port>\xFF<address>` (ports in decimal; an unparsable
//! grant port becomes 20005 and an unparsable requested port 0, so every input is used).
//!
//! Never panics. When it allows the forward, the port is 0 or the grant's own, and the address
//! is "localhost" or exactly 127.0.0.1 by an independent check; and it allows every such request.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use tunnelbot::grants::{Grant, check_forward};
use tunnelbot::store::TunnelRecord;
use tunnelbot_fuzz::fields;

fn independent_loopback(address: &str) -> bool {
    if address == "localhost" {
        return true;
    }
    matches!(address.parse::<IpAddr>(), Ok(IpAddr::V4(v4)) if v4.octets() == [127, 0, 0, 1])
}

fuzz_target!(|data: &[u8]| {
    let [grant_port, port, address] = fields::<3>(data);
    let grant_port: u16 = grant_port.trim().parse().unwrap_or(20005);
    let port: u32 = port.trim().parse().unwrap_or(0);
    let grant = Grant::new(TunnelRecord {
        id: "tb_fuzz".into(),
        user: "alice".into(),
        server_name: String::new(),
        port: grant_port,
        public_key: String::new(),
        fingerprint: "SHA256:fuzz".into(),
        created_at: 0,
        expires_at: u64::MAX,
        ..TunnelRecord::default()
    });
    let bind = IpAddr::from([127, 0, 0, 1]);
    match check_forward(&grant, bind, &address, port) {
        Ok(()) => {
            assert!(
                port == 0 || port == u32::from(grant_port),
                "allowed port {port} on a grant for {grant_port}"
            );
            assert!(
                independent_loopback(&address),
                "allowed non-loopback bind address {address:?}"
            );
        }
        Err(refusal) => {
            // And it does not refuse what is plainly allowed.
            assert!(
                !((port == 0 || port == u32::from(grant_port)) && independent_loopback(&address)),
                "refused {address:?} port {port} on a grant for {grant_port}: {refusal}"
            );
            let _ = refusal.to_string();
            let _ = refusal.as_str();
        }
    }
});
