//! Graceful shutdown: one watch channel fanned out to every long-running role.

use tokio::sync::watch;

/// Held by each role; resolves `recv()` once shutdown was requested.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Held by whoever decides to stop (Ctrl-C / SIGTERM handler, a test).
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// A shutdown that never fires (for one-shot commands and tests).
    pub fn never() -> Shutdown {
        // One sender kept for the life of the process, so `recv` never
        // returns for lack of senders.
        static NEVER: std::sync::OnceLock<watch::Sender<bool>> = std::sync::OnceLock::new();
        Shutdown {
            rx: NEVER.get_or_init(|| watch::channel(false).0).subscribe(),
        }
    }

    /// True once shutdown was requested, or once every trigger is gone
    /// (whoever could stop us has: a loop checking this must not spin on).
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Waits until shutdown is requested (or every trigger is gone).
    pub async fn recv(&mut self) {
        while !*self.rx.borrow_and_update() {
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop that checks `is_triggered` between steps stops once nobody
    /// can trigger it any more (the supervisor dropped after a failed start)
    /// rather than spinning on a `recv` that returns at once.
    #[tokio::test]
    async fn a_dropped_trigger_counts_as_shutdown() {
        let (trigger, mut shutdown) = channel();
        assert!(!shutdown.is_triggered());
        drop(trigger);
        assert!(shutdown.is_triggered());
        shutdown.recv().await;

        let (trigger, shutdown) = channel();
        trigger.trigger();
        assert!(shutdown.is_triggered());
        assert!(!Shutdown::never().is_triggered());
    }
}
