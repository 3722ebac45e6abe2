//! Certificate decisions: CAs, principals, times, options.

use super::*;
use russh::keys::ssh_key::certificate::Builder;
use russh::keys::{Algorithm, PrivateKey};

fn key() -> PrivateKey {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
}

fn cert(ca: &PrivateKey, edit: impl FnOnce(&mut Builder) -> &mut Builder) -> Certificate {
    typed(ca, CertType::User, edit)
}

fn typed(
    ca: &PrivateKey,
    kind: CertType,
    edit: impl FnOnce(&mut Builder) -> &mut Builder,
) -> Certificate {
    let mut b = Builder::new(
        vec![7u8; 32],
        key().public_key().key_data().clone(),
        0,
        4_000_000_000,
    )
    .unwrap();
    b.cert_type(kind).unwrap();
    b.extension("permit-port-forwarding", "").unwrap();
    edit(&mut b);
    b.sign(ca).unwrap()
}

fn authority(ca: &PrivateKey) -> (tempfile::TempDir, Authority) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pub");
    std::fs::write(&path, ca.public_key().to_openssh().unwrap()).unwrap();
    let config = SshConfig {
        trusted_user_ca_keys: Some(path),
        ..SshConfig::default()
    };
    (dir, Authority::load(&config).unwrap())
}

#[test]
fn certificate_decisions() {
    let ca = key();
    let (_dir, authority) = authority(&ca);
    let peer: IpAddr = "10.1.2.3".parse().unwrap();
    let check = |c: &Certificate| authority.check(c, peer, 1_000_000);
    let good = cert(&ca, |b| b.valid_principal("alice").unwrap());
    let login = check(&good).unwrap();
    assert_eq!((login.user.as_str(), login.may_forward), ("alice", true));
    let cases: Vec<(Certificate, CertRefusal)> = vec![
        (
            cert(&key(), |b| b.valid_principal("alice").unwrap()),
            CertRefusal::UnknownCa,
        ),
        (
            typed(&ca, CertType::Host, |b| b.valid_principal("alice").unwrap()),
            CertRefusal::HostCertificate,
        ),
        (
            cert(&ca, |b| b.all_principals_valid().unwrap()),
            CertRefusal::Principal,
        ),
        (
            cert(&ca, |b| b.valid_principal("..").unwrap()),
            CertRefusal::Principal,
        ),
        (
            cert(&ca, |b| {
                b.valid_principal("alice").unwrap();
                b.critical_option("source-address", "192.0.2.0/24").unwrap()
            }),
            CertRefusal::SourceAddress,
        ),
        (
            cert(&ca, |b| {
                b.valid_principal("alice").unwrap();
                b.critical_option("force-command", "/bin/true").unwrap()
            }),
            CertRefusal::CriticalOption("force-command".into()),
        ),
    ];
    for (c, want) in cases {
        assert_eq!(check(&c).unwrap_err(), want);
    }
    let outside = cert(&ca, |b| b.valid_principal("alice").unwrap());
    assert_eq!(
        authority.check(&outside, peer, 4_000_000_001).unwrap_err(),
        CertRefusal::Expired
    );
    let no_forwarding = {
        let mut b = Builder::new(
            vec![7u8; 32],
            key().public_key().key_data().clone(),
            0,
            u64::MAX,
        )
        .unwrap();
        b.cert_type(CertType::User).unwrap();
        b.valid_principal("alice").unwrap();
        b.sign(&ca).unwrap()
    };
    let login = check(&no_forwarding).unwrap();
    assert!(!login.may_forward);
    assert_eq!(login.valid_before, u64::MAX);
}

#[test]
fn source_address_lists() {
    let p = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(source_allowed("10.0.0.0/8", p("10.1.2.3")));
    assert!(source_allowed("192.0.2.1,10.0.0.0/8", p("10.1.2.3")));
    assert!(!source_allowed("10.0.0.0/8", p("11.0.0.1")));
    assert!(source_allowed("127.0.0.1", p("127.0.0.1")));
    assert!(!source_allowed("127.0.0.1", p("127.0.0.2")));
    assert!(source_allowed("0.0.0.0/0", p("203.0.113.9")));
    assert!(source_allowed("::1", p("::1")));
    assert!(source_allowed("127.0.0.0/8", p("::ffff:127.0.0.5")));
    assert!(!source_allowed("garbage", p("127.0.0.1")));
}

#[test]
fn principal_templates() {
    let t = Template::parse("{user}").unwrap();
    assert_eq!(t.user("alice"), Some("alice"));
    assert_eq!(
        t.user(".."),
        None,
        "names JupyterHub would refuse map to nobody"
    );
    let t = Template::parse("jh-{user}@hpc").unwrap();
    assert_eq!(t.user("jh-alice@hpc"), Some("alice"));
    assert_eq!(t.user("alice"), None);
    assert!(Template::parse("nobody").is_err());
    assert!(Template::parse("{user}{user}").is_err());
}
