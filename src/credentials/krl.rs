//! OpenSSH key revocation lists (`ssh-keygen -k`), as `sshd`'s `RevokedKeys` reads them:
//! certificates revoked by serial (list, range or bitmap) or key ID under a CA or any CA, and
//! plain keys revoked outright or by SHA-1/SHA-256 fingerprint. The format is OpenSSH's
//! PROTOCOL.krl; the signature section is skipped, as the file is the admin's own.

use std::collections::HashSet;

use anyhow::{Context, bail, ensure};
use russh::keys::ssh_key::public::KeyData;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"SSHKRL\n\0";
const FORMAT_VERSION: u32 = 1;

const SECTION_CERTIFICATES: u8 = 1;
const SECTION_EXPLICIT_KEY: u8 = 2;
const SECTION_FINGERPRINT_SHA1: u8 = 3;
const SECTION_SIGNATURE: u8 = 4;
const SECTION_FINGERPRINT_SHA256: u8 = 5;

const CERT_SERIAL_LIST: u8 = 0x20;
const CERT_SERIAL_RANGE: u8 = 0x21;
const CERT_SERIAL_BITMAP: u8 = 0x22;
const CERT_KEY_ID: u8 = 0x23;

/// Bound on serials a bitmap may expand to, so a hostile file cannot exhaust memory.
const MAX_BITMAP_BITS: usize = 1 << 24;

/// Revocations under one CA (or any CA, when `ca` is None).
#[derive(Debug, Default, Clone)]
struct CertRevocations {
    /// The CA's public key blob; None revokes under every CA.
    ca: Option<Vec<u8>>,
    serials: HashSet<u64>,
    ranges: Vec<(u64, u64)>,
    key_ids: HashSet<String>,
}

/// A parsed revocation list.
#[derive(Debug, Default, Clone)]
pub struct Krl {
    certs: Vec<CertRevocations>,
    keys: HashSet<Vec<u8>>,
    sha1: HashSet<Vec<u8>>,
    sha256: HashSet<Vec<u8>>,
}

impl Krl {
    /// Parses a KRL file's bytes.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut r = Reader(bytes);
        ensure!(r.take(8)? == MAGIC, "not an OpenSSH KRL (bad magic)");
        let version = r.u32()?;
        ensure!(
            version == FORMAT_VERSION,
            "KRL format version {version} is not supported"
        );
        let _krl_version = r.u64()?;
        let _generated = r.u64()?;
        let _flags = r.u64()?;
        let _reserved = r.string()?;
        let _comment = r.string()?;
        let mut krl = Self::default();
        while !r.0.is_empty() {
            let kind = r.u8()?;
            let mut data = Reader(r.string()?);
            match kind {
                SECTION_CERTIFICATES => krl.certs.push(CertRevocations::parse(&mut data)?),
                SECTION_EXPLICIT_KEY => {
                    while !data.0.is_empty() {
                        krl.keys.insert(data.string()?.to_vec());
                    }
                }
                SECTION_FINGERPRINT_SHA1 => {
                    while !data.0.is_empty() {
                        krl.sha1.insert(data.string()?.to_vec());
                    }
                }
                SECTION_FINGERPRINT_SHA256 => {
                    while !data.0.is_empty() {
                        krl.sha256.insert(data.string()?.to_vec());
                    }
                }
                // Signatures come last and cover what precedes them; nothing after one counts.
                SECTION_SIGNATURE => break,
                other => bail!("unknown KRL section type {other}"),
            }
        }
        Ok(krl)
    }

    /// Whether the plain key `blob` (SSH wire encoding) is revoked.
    pub fn key_revoked(&self, blob: &[u8]) -> bool {
        if self.keys.contains(blob) || self.sha256.contains(Sha256::digest(blob).as_slice()) {
            return true;
        }
        !self.sha1.is_empty() && self.sha1.contains(sha1::Sha1::digest(blob).as_slice())
    }

    /// Whether a certificate signed by `ca` (key blob) with `serial` and `key_id` is revoked.
    pub fn cert_revoked(&self, ca: &[u8], serial: u64, key_id: &str) -> bool {
        self.certs.iter().any(|c| {
            c.ca.as_deref().is_none_or(|k| k == ca)
                && ((serial != 0
                    && (c.serials.contains(&serial)
                        || c.ranges
                            .iter()
                            .any(|&(lo, hi)| lo <= serial && serial <= hi)))
                    || c.key_ids.contains(key_id))
        })
    }
}

impl CertRevocations {
    fn parse(r: &mut Reader<'_>) -> anyhow::Result<Self> {
        let ca = r.string()?;
        let _reserved = r.string()?;
        let mut out = Self {
            ca: (!ca.is_empty()).then(|| ca.to_vec()),
            ..Self::default()
        };
        while !r.0.is_empty() {
            let kind = r.u8()?;
            let mut data = Reader(r.string()?);
            match kind {
                CERT_SERIAL_LIST => {
                    while !data.0.is_empty() {
                        out.serials.insert(data.u64()?);
                    }
                }
                CERT_SERIAL_RANGE => {
                    let (lo, hi) = (data.u64()?, data.u64()?);
                    ensure!(lo <= hi, "KRL serial range {lo}-{hi} is reversed");
                    out.ranges.push((lo, hi));
                }
                CERT_SERIAL_BITMAP => {
                    let offset = data.u64()?;
                    let bitmap = data.string()?;
                    ensure!(
                        bitmap.len().saturating_mul(8) <= MAX_BITMAP_BITS,
                        "KRL serial bitmap too large"
                    );
                    // An mpint: big-endian, bit 0 of the last byte is serial `offset`.
                    for (i, byte) in bitmap.iter().rev().enumerate() {
                        for bit in 0..8u64 {
                            if byte & (1 << bit) != 0 {
                                let n = u64::try_from(i)?.saturating_mul(8).saturating_add(bit);
                                out.serials.insert(offset.saturating_add(n));
                            }
                        }
                    }
                }
                CERT_KEY_ID => {
                    while !data.0.is_empty() {
                        out.key_ids.insert(
                            String::from_utf8(data.string()?.to_vec())
                                .context("KRL key ID is not UTF-8")?,
                        );
                    }
                }
                other => bail!("unknown KRL certificate section type {other:#x}"),
            }
        }
        Ok(out)
    }
}

/// The SSH wire encoding of a public key, as KRLs name keys.
pub fn key_blob(key: &KeyData) -> anyhow::Result<Vec<u8>> {
    use russh::keys::ssh_key::encoding::Encode;
    let mut out = Vec::new();
    key.encode(&mut out).context("encoding a key")?;
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        ensure!(self.0.len() >= n, "KRL truncated");
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into()?))
    }

    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into()?))
    }

    fn string(&mut self) -> anyhow::Result<&'a [u8]> {
        let n = usize::try_from(self.u32()?)?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
        out.extend_from_slice(s);
    }

    fn header() -> Vec<u8> {
        let mut k = MAGIC.to_vec();
        k.extend_from_slice(&1u32.to_be_bytes());
        k.extend_from_slice(&[0; 24]);
        string(&mut k, b"");
        string(&mut k, b"test");
        k
    }

    #[test]
    fn serials_ranges_bitmaps_and_key_ids() {
        let mut certs = Vec::new();
        string(&mut certs, b"CAKEY");
        string(&mut certs, b"");
        certs.push(CERT_SERIAL_LIST);
        string(
            &mut certs,
            &[5u64.to_be_bytes(), 9u64.to_be_bytes()].concat(),
        );
        certs.push(CERT_SERIAL_RANGE);
        string(
            &mut certs,
            &[100u64.to_be_bytes(), 200u64.to_be_bytes()].concat(),
        );
        certs.push(CERT_SERIAL_BITMAP);
        let mut bm = 1000u64.to_be_bytes().to_vec();
        string(&mut bm, &[0b0000_0010, 0b0000_0001]); // serials 1000 and 1009
        string(&mut certs, &bm);
        certs.push(CERT_KEY_ID);
        let mut ids = Vec::new();
        string(&mut ids, b"job-7");
        string(&mut certs, &ids);
        let mut krl = header();
        krl.push(SECTION_CERTIFICATES);
        string(&mut krl, &certs);
        let k = Krl::parse(&krl).unwrap();
        for s in [5, 9, 100, 150, 200, 1000, 1009] {
            assert!(k.cert_revoked(b"CAKEY", s, "x"), "{s}");
        }
        for s in [0, 6, 99, 201, 1001, 1008] {
            assert!(!k.cert_revoked(b"CAKEY", s, "x"), "{s}");
        }
        assert!(k.cert_revoked(b"CAKEY", 0, "job-7"));
        assert!(
            !k.cert_revoked(b"OTHER", 5, "job-7"),
            "another CA's certificates"
        );
    }

    #[test]
    fn damaged_files_are_errors_not_panics() {
        assert!(Krl::parse(b"").is_err());
        assert!(Krl::parse(b"SSHKRL\n\0\0\0\0\x02").is_err());
        let mut k = header();
        k.push(SECTION_CERTIFICATES);
        k.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Krl::parse(&k).is_err());
        let mut k = header();
        k.push(99);
        string(&mut k, b"");
        assert!(Krl::parse(&k).is_err());
        assert!(Krl::parse(&header()).is_ok(), "an empty list is fine");
    }
}
