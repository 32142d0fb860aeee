//! The task that keeps the outbox files current off the hot paths: it writes the cursor after
//! acknowledgements and compacts the log, so neither `publish` nor the next send waits for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::delivery::stopped;
use crate::outbox::Outbox;

/// At most one checkpoint per this interval: under a stream of acknowledgements the cursor
/// fsyncs would otherwise compete with `publish`'s own. A crash loses at most this much cursor
/// progress, which means redelivery, never loss.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Runs a checkpoint whenever one is wanted, until `stop`; then a last one.
pub(crate) async fn run(outbox: Arc<Outbox>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            () = outbox.checkpoint_wanted() => checkpoint(&outbox).await,
        }
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            () = tokio::time::sleep(MIN_INTERVAL) => {}
        }
    }
    checkpoint(&outbox).await;
}

/// Persists the cursor and compacts the log if due, on a blocking thread.
pub(crate) async fn checkpoint(outbox: &Arc<Outbox>) {
    let outbox = outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.checkpoint()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "event outbox checkpoint failed; will retry"),
        // The runtime is shutting down (e.g. a command that failed at start-up) and dropped the
        // task before it ran: the cursor stays where it was, which means redelivery, not loss.
        Err(e) if e.is_cancelled() => {
            tracing::debug!("event outbox checkpoint cancelled by the runtime's shutdown");
        }
        Err(e) => tracing::error!(error = %e, "event outbox checkpoint panicked"),
    }
}
