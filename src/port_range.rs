//! A hub port range (`tunnels.ports`): an inclusive range whose invariant lives in its
//! constructor. A domain type: config, the port pool and the route layer all use it.

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;

use anyhow::{Context, ensure};
use serde::{Deserialize, Deserializer};

/// An inclusive port range written `"20000-29999"`: never empty and never holding port 0, since
/// `new` is the only way to make one (parsing and deserializing go through it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// 20000-24999: below Linux's ephemeral range (32768-60999), so outgoing connections never
    /// hold one. Written out (this module may): 20000 <= 24999, neither is 0.
    pub const DEFAULT: Self = Self {
        first: 20000,
        last: 24999,
    };

    /// The ports `first..=last`; refused when that holds no port or includes port 0.
    pub fn new(first: u16, last: u16) -> anyhow::Result<Self> {
        ensure!(
            first > 0,
            "port range {first}-{last} must not include port 0"
        );
        ensure!(first <= last, "port range {first}-{last} is empty");
        Ok(Self { first, last })
    }

    /// First port, inclusive.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// Last port, inclusive.
    pub fn last(&self) -> u16 {
        self.last
    }

    /// How many ports the range holds; at least one, so there is no `is_empty` to ask.
    pub fn len(&self) -> NonZeroUsize {
        // `first <= last` by construction, so the count is at least 1.
        NonZeroUsize::MIN.saturating_add(usize::from(self.last - self.first))
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (a, b) = s
            .split_once('-')
            .with_context(|| format!("port range {s:?} must look like \"20000-29999\""))?;
        let first: u16 = a
            .trim()
            .parse()
            .with_context(|| format!("bad port {a:?}"))?;
        let last: u16 = b
            .trim()
            .parse()
            .with_context(|| format!("bad port {b:?}"))?;
        Self::new(first, last)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}
