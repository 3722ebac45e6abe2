//! SIGINT and SIGTERM as one future; a second signal exits at once.

use tracing::{info, warn};

/// Resolves on the first SIGINT or SIGTERM, and arms a second-signal hard exit.
pub async fn signal() {
    wait_one().await;
    info!("signal received; shutting down (a second signal exits at once)");
    tokio::spawn(async {
        wait_one().await;
        warn!("second signal; exiting now");
        std::process::exit(130);
    });
}

async fn wait_one() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is nothing to wait for; never resolve.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
