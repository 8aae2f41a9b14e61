//! [`Shutdown`]: a stop request (SIGTERM, Ctrl-C) that long-running work
//! checks at its safe points. A leaf module: the pipeline, the scheduler and
//! capture all take it, and it depends on none of them.

use std::time::Duration;

/// A request to stop. Pipeline runs finish their in-flight batches and start
/// no new one; capture stops at its next transaction boundary.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Option<tokio::sync::watch::Receiver<bool>>);

impl Shutdown {
    /// Follows a watch channel that turns `true` on shutdown.
    pub fn new(receiver: tokio::sync::watch::Receiver<bool>) -> Self {
        Shutdown(Some(receiver))
    }

    /// True once a stop was requested.
    pub fn requested(&self) -> bool {
        self.0.as_ref().is_some_and(|r| *r.borrow())
    }

    /// Returns once a stop is requested (never, without a stop source).
    pub async fn wait(&self) {
        match self.0.clone() {
            None => std::future::pending().await,
            Some(mut r) => {
                let _ = r.wait_for(|stop| *stop).await;
            }
        }
    }

    /// Sleeps for `delay` or until a stop is requested.
    pub async fn sleep(&self, delay: Duration) {
        match self.0.clone() {
            None => tokio::time::sleep(delay).await,
            Some(mut r) => {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = r.wait_for(|stop| *stop) => {}
                }
            }
        }
    }
}
