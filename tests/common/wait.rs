//! `eventually`: the one bounded poll. Tests wait for a state they can observe (a metric, a
//! tunnel field, a log line) rather than sleeping for it, and every such wait ends by `WAIT`.

use std::time::Duration;

use anyhow::{Context, bail};

use super::WAIT;

/// How often `eventually` looks again: short, so a test waits little past the moment its
/// condition holds, and not so short that polling takes a shared core from the broker.
pub const POLL: Duration = Duration::from_millis(20);

/// What one look of `eventually` found: done (with a value) or not yet. An `Err` ends the wait
/// at once: a probe that cannot look (a missing metric series, a refused API call) will not
/// start working by waiting.
pub trait Probe {
    /// What the wait hands back once the condition holds.
    type Value;
    /// `Some` when the condition holds.
    fn outcome(self) -> anyhow::Result<Option<Self::Value>>;
}

impl Probe for bool {
    type Value = ();
    fn outcome(self) -> anyhow::Result<Option<()>> {
        Ok(self.then_some(()))
    }
}

impl<T> Probe for Option<T> {
    type Value = T;
    fn outcome(self) -> anyhow::Result<Option<T>> {
        Ok(self)
    }
}

impl<P: Probe> Probe for anyhow::Result<P> {
    type Value = P::Value;
    fn outcome(self) -> anyhow::Result<Option<P::Value>> {
        self?.outcome()
    }
}

/// Looks with `probe` every `POLL` until it finds its condition, for at most `WAIT`; `what`
/// names the condition for the failure message ("the upload blocks").
pub async fn eventually<P: Probe>(
    what: &str,
    mut probe: impl AsyncFnMut() -> P,
) -> anyhow::Result<P::Value> {
    // tokio's clock, so a test on paused time waits on fake time too.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = probe()
            .await
            .outcome()
            .with_context(|| format!("while waiting until {what}"))?;
        if let Some(value) = found {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up after {WAIT:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
