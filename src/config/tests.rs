//! Config parsing and validation.

use super::*;

#[test]
fn empty_file_is_the_defaults() {
    let c = Config::parse("").unwrap();
    c.validate().unwrap();
    assert_eq!(c.ssh.listen.port(), 2222);
    assert_eq!(c.ssh.user, "tunnelbot");
    assert_eq!(c.tunnels.ports, PortRange::new(20000, 24999).unwrap());
    assert_eq!(c.tunnels.default_ttl, Duration::from_secs(8 * 3600));
    assert!(c.admin.listen.ip().is_loopback());
}

#[test]
fn example_config_parses_and_equals_the_defaults() {
    let text = include_str!("../../config/tunnelbot.example.toml");
    let c = Config::parse(text).unwrap();
    c.validate().unwrap();
    let d = Config::default();
    assert_eq!(format!("{c:?}"), format!("{d:?}"));
}

#[test]
fn unknown_keys_are_refused() {
    let err = Config::parse("[ssh]\nlisten_addr = \"0.0.0.0:22\"\n").unwrap_err();
    assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    assert!(Config::parse("typo = 1\n").is_err());
}

#[test]
fn port_ranges() {
    assert_eq!("1-1".parse::<PortRange>().unwrap().len().get(), 1);
    assert_eq!(
        "20000-29999".parse::<PortRange>().unwrap().len().get(),
        10000
    );
    assert_eq!(Config::default().tunnels.ports.len().get(), 5000);
    assert_eq!(PortRange::new(65535, 65535).unwrap().len().get(), 1);
    assert!(PortRange::new(0, 10).is_err());
    assert!(PortRange::new(10, 9).is_err());
    for bad in ["", "5", "9-5", "0-10", "a-b", "1-70000", "-"] {
        assert!(bad.parse::<PortRange>().is_err(), "{bad:?} parsed");
    }
    let err = Config::parse("[tunnels]\nports = \"30000-20000\"\n").unwrap_err();
    assert!(format!("{err:#}").contains("empty"), "{err:#}");
}

#[test]
fn non_loopback_admin_needs_opt_in() {
    let c = Config::parse("[admin]\nlisten = \"0.0.0.0:8090\"\n").unwrap();
    let err = c.validate().unwrap_err();
    assert!(format!("{err:#}").contains("allow_non_loopback"), "{err:#}");
    let c =
        Config::parse("[admin]\nlisten = \"0.0.0.0:8090\"\nallow_non_loopback = true\n").unwrap();
    c.validate().unwrap();
}

#[test]
fn durations_and_ttls() {
    let c = Config::parse("[tunnels]\ndefault_ttl = \"2h\"\nmax_ttl = \"1d\"\n").unwrap();
    c.validate().unwrap();
    assert_eq!(c.tunnels.max_ttl, Duration::from_secs(86400));
    let c = Config::parse("[tunnels]\ndefault_ttl = \"2d\"\nmax_ttl = \"1d\"\n").unwrap();
    assert!(c.validate().is_err());
    assert!(Config::parse("[tunnels]\nmax_ttl = \"soon\"\n").is_err());
}

#[test]
fn worker_threads() {
    assert_eq!(Config::default().runtime.worker_threads, 1);
    let c = Config::parse("[runtime]\nworker_threads = 0\n").unwrap();
    c.validate().unwrap();
    let c = Config::parse("[runtime]\nworker_threads = 5000\n").unwrap();
    let err = c.validate().unwrap_err();
    assert!(format!("{err:#}").contains("worker_threads"), "{err:#}");
    assert!(Config::parse("[runtime]\nworker_threads = -1\n").is_err());
}

#[test]
fn rekey_limit_sizes() {
    assert_eq!(Config::default().ssh.rekey_limit, 1 << 30);
    for (text, bytes) in [
        ("65536", 65536),
        ("\"256KiB\"", 256 << 10),
        ("\"512M\"", 512 << 20),
        ("\"1GiB\"", 1 << 30),
    ] {
        let c = Config::parse(&format!("[ssh]\nrekey_limit = {text}\n")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.ssh.rekey_limit, bytes, "{text}");
    }
    for too_far in ["\"32KiB\"", "\"2G\"", "0"] {
        let c = Config::parse(&format!("[ssh]\nrekey_limit = {too_far}\n")).unwrap();
        let err = c.validate().unwrap_err();
        assert!(format!("{err:#}").contains("rekey_limit"), "{err:#}");
    }
    for bad in ["\"1 TB\"", "\"lots\"", "\"KiB\"", "-1", "\"99999999999G\""] {
        assert!(
            Config::parse(&format!("[ssh]\nrekey_limit = {bad}\n")).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn ssh_port_inside_tunnel_range_is_refused() {
    let c = Config::parse("[ssh]\nlisten = \"0.0.0.0:20001\"\n").unwrap();
    assert!(c.validate().is_err());
}

#[test]
fn chp_token_files_are_checked_up_front() {
    let c = Config::parse("[chp]\ntoken_file = \"/nonexistent/chp.token\"\n").unwrap();
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("chp.token_file"));
}

#[test]
fn tunnel_host_from_public_host_alias_or_bind() {
    let host = |text: &str| Config::parse(text).unwrap().tunnel_host();
    assert_eq!(host("").unwrap(), "127.0.0.1");
    assert_eq!(
        host("[tunnels]\nbind_address = \"::1\"\n").unwrap(),
        "[::1]"
    );
    let all = "[tunnels]\nbind_address = \"0.0.0.0\"\n";
    assert!(format!("{:#}", host(all).unwrap_err()).contains("public_host"));
    assert_eq!(
        host(&format!("{all}public_host = \"hub.internal\"\n")).unwrap(),
        "hub.internal"
    );
    // The old key still works, and agreeing with the new one is fine; differing is refused.
    assert_eq!(
        host("[chp]\ntarget_host = \"10.0.0.5\"\n").unwrap(),
        "10.0.0.5"
    );
    let both = |a: &str, b: &str| {
        host(&format!(
            "[tunnels]\npublic_host = \"{a}\"\n[chp]\ntarget_host = \"{b}\"\n"
        ))
    };
    assert_eq!(both("h", "h").unwrap(), "h");
    assert_eq!(both("::1", "[::1]").unwrap(), "[::1]");
    assert!(format!("{:#}", both("a", "b").unwrap_err()).contains("differ"));
    for bad in ["", "h:80", "http://h", "a b", "u@h", "h/x"] {
        let text = format!("[tunnels]\npublic_host = {bad:?}\n");
        assert!(Config::parse(&text).unwrap().validate().is_err(), "{bad:?}");
    }
}

#[test]
fn lease_is_bounded_by_max_ttl() {
    let c = Config::parse("[tunnels]\nlease = \"5m\"\n").unwrap();
    c.validate().unwrap();
    assert_eq!(c.tunnels.lease, Duration::from_secs(300));
    assert!(Config::default().tunnels.lease.is_zero());
    let c = Config::parse("[tunnels]\nlease = \"8d\"\n").unwrap();
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("tunnels.lease"));
}

#[test]
fn base_url_shape() {
    for section in ["routes", "chp"] {
        let c = Config::parse(&format!("[{section}]\nbase_url = \"/jh\"\n")).unwrap();
        assert!(c.validate().is_err(), "{section}");
        for bad in ["/a?b/", "/a#/", "/a b/", "/a%20/", "/a/../", "//"] {
            let c = Config::parse(&format!("[{section}]\nbase_url = {bad:?}\n")).unwrap();
            assert!(c.validate().is_err(), "{section}: {bad}");
        }
    }
    // Routes off: nothing about them is checked.
    for off in ["[routes]\nbackend = \"none\"\n", "[chp]\nenabled = false\n"] {
        let c = Config::parse(&format!("{off}base_url = \"/jh\"\n")).unwrap();
        c.validate().unwrap();
    }
}
