//! A helper process (CHP, redis-server, traefik) started by PID on ports picked for it: wait
//! until it answers, or learn that it exited because one of its ports was taken meanwhile.

use std::process::Stdio;

use anyhow::Context;
use tokio::process::{Child, Command};

use super::eventually;

/// Starts `cmd` (output discarded, killed on drop) and polls `answers` until it does:
/// `Some(child)` once it answers, `None` when it exited first (the caller picks new ports and
/// tries again). The wait is bounded by `eventually`.
pub async fn start_answering(
    mut cmd: Command,
    what: &str,
    mut answers: impl AsyncFnMut() -> bool,
) -> anyhow::Result<Option<Child>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let up = eventually(&format!("{what} answers"), async || {
        if child.try_wait()?.is_some() {
            return anyhow::Ok(Some(false));
        }
        Ok(answers().await.then_some(true))
    })
    .await?;
    Ok(up.then_some(child))
}
