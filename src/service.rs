//! Roles as services: every long-running role of a process (the order API,
//! the relay and its upkeep, a consumer group member) has one shape, and one
//! supervisor starts and stops them.
//!
//! * Everything that can fail because of a setting (parsing, binding a
//!   port, building a pool or a transport) happens while a role is *built*,
//!   before the supervisor starts anything: a bad setting stops the process
//!   before any role runs.
//! * The supervisor gives each role the same [`Shutdown`]; the first role
//!   to stop (or Ctrl-C / SIGTERM) stops them all, and the supervisor waits
//!   for every one of them before it returns, so whatever they use (the
//!   embedded Postgres) outlives them.
//! * Dropping a supervisor (an early return) stops and aborts its roles:
//!   none is left running detached.

use std::future::Future;

use tokio::task::JoinHandle;

use crate::shutdown::{self, Shutdown, ShutdownTrigger};

/// A long-running role.
pub trait Service: Send + 'static {
    /// The role's name in logs and errors (`api`, `relay`, …).
    fn name(&self) -> &'static str;

    /// Runs until `shutdown` fires (returning `Ok`) or the role fails.
    fn run(self, shutdown: Shutdown) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Starts services and stops them together.
pub struct Supervisor {
    trigger: ShutdownTrigger,
    shutdown: Shutdown,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl Supervisor {
    pub fn new() -> Supervisor {
        let (trigger, shutdown) = shutdown::channel();
        Supervisor {
            trigger,
            shutdown,
            tasks: Vec::new(),
        }
    }

    /// Starts `service` on its own task.
    pub fn start<S: Service>(&mut self, service: S) {
        let name = service.name();
        let shutdown = self.shutdown.clone();
        self.tasks.push((name, tokio::spawn(service.run(shutdown))));
        tracing::debug!(role = name, "role started");
    }

    /// Runs until `stop` resolves (Ctrl-C, SIGTERM, the demo's end) or a
    /// role stops on its own; then stops every role and waits for them.
    /// A role that stopped on its own is an error (it names the role).
    pub async fn run_until(mut self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        if self.tasks.is_empty() {
            return Ok(());
        }
        let first_exit = {
            let any_exit =
                futures_util::future::select_all(self.tasks.iter_mut().map(|(_, task)| task));
            tokio::select! {
                _ = stop => None,
                (result, index, _) = any_exit => Some((index, result)),
            }
        };
        self.trigger.trigger();
        let mut error = None;
        if let Some((index, result)) = first_exit {
            let (name, _) = self.tasks.remove(index);
            error = Some(match result {
                Ok(Ok(())) => anyhow::anyhow!("the {name} role stopped unexpectedly"),
                Ok(Err(e)) => e.context(format!("the {name} role failed")),
                Err(e) => anyhow::anyhow!("the {name} role panicked: {e}"),
            });
        }
        let rest = self.join_all().await;
        match error {
            Some(e) => Err(e),
            None => rest,
        }
    }

    /// Stops every role and waits for them.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.trigger.trigger();
        self.join_all().await
    }

    /// Runs until Ctrl-C or SIGTERM (or a role stops on its own).
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        self.run_until(shutdown::signal()).await
    }

    /// Waits for every role, in the order they started; the first error wins.
    async fn join_all(&mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        for (name, task) in self.tasks.drain(..) {
            let result = match task.await {
                Ok(result) => result.map_err(|e| e.context(format!("the {name} role failed"))),
                Err(e) => Err(anyhow::anyhow!("the {name} role panicked: {e}")),
            };
            if let Err(e) = result {
                tracing::warn!(
                    role = name,
                    error = format!("{e:#}"),
                    "role stopped with an error"
                );
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.trigger.trigger();
        for (_, task) in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Runs until shutdown, then takes a moment to stop and says it did.
    struct Steady {
        stopped: Arc<AtomicBool>,
    }

    impl Service for Steady {
        fn name(&self) -> &'static str {
            "steady"
        }

        async fn run(self, mut shutdown: Shutdown) -> anyhow::Result<()> {
            shutdown.recv().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            self.stopped.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    struct FailsAtStart;

    impl Service for FailsAtStart {
        fn name(&self) -> &'static str {
            "broken"
        }

        async fn run(self, _shutdown: Shutdown) -> anyhow::Result<()> {
            anyhow::bail!("bad setting")
        }
    }

    #[tokio::test]
    async fn a_failing_role_stops_the_others_and_they_finish_before_the_supervisor_returns() {
        let stopped = Arc::new(AtomicBool::new(false));
        let mut supervisor = Supervisor::new();
        supervisor.start(Steady {
            stopped: stopped.clone(),
        });
        supervisor.start(FailsAtStart);
        let error = supervisor
            .run_until(std::future::pending())
            .await
            .expect_err("a role failed");
        assert_eq!(format!("{error:#}"), "the broken role failed: bad setting");
        assert!(
            stopped.load(Ordering::SeqCst),
            "the steady role was stopped and had finished when run_until returned"
        );
    }
}
