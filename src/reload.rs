//! SIGHUP: read the credential files again (the CA list and the KRL) without a restart, and cut
//! the certificate sessions they now withdraw.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::audit::Event;
use crate::broker::Broker;

/// Reloads on every SIGHUP until `cancel`.
pub async fn on_hangup(broker: Broker, cancel: CancellationToken) {
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGHUP; credential files are read at start only");
            return;
        }
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            got = hangups.recv() => {
                if got.is_none() {
                    return;
                }
                match broker.reload_credentials() {
                    Ok(cut) => broker.audit(Event::CredentialsReloaded { sessions_cut: cut }),
                    Err(e) => error!(error = %format!("{e:#}"), "SIGHUP: reload failed; the previous CA keys and revocation list stay in force"),
                }
            }
        }
    }
}
