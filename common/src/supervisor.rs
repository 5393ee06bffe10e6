//! Runs a service's long-lived tasks and stops them in order; a task that
//! ends before shutdown is never silent.
//!
//! Every task has a name. Until the shutdown token fires, no task is
//! supposed to end: one that returns (with or without an error) or panics
//! makes the supervisor log why, turn health `NOT_SERVING`, cancel the token
//! so that the other tasks finish what they hold, and return
//! [`TaskFailed`], which the binary turns into a non-zero exit so that its
//! supervisor (systemd, Kubernetes) restarts it.
//!
//! Shutdown runs in two stages: the front tasks (servers, consumers,
//! sweepers, health) stop on the shutdown token, so no new work arrives and
//! in-flight work commits; only then are the last tasks (the outbox relay)
//! told to stop, so that they publish what the front tasks wrote.

use std::{collections::HashMap, future::Future};

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// Why a service stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
#[error("task {task:?} {how}")]
pub struct TaskFailed {
    /// The task's name, as given to [`Supervisor::spawn`].
    pub task: &'static str,
    /// What happened: returned early, failed with an error, panicked.
    pub how: String,
}

/// What a supervised task returns: `Ok` when it stopped because it was
/// asked to, `Err` when it cannot go on.
pub type TaskResult = anyhow::Result<()>;

/// See the module docs.
pub struct Supervisor {
    front: JoinSet<TaskResult>,
    last: JoinSet<TaskResult>,
    last_stop: CancellationToken,
    names: HashMap<Id, &'static str>,
    health: Option<(HealthReporter, Vec<String>)>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    #[must_use]
    pub fn new() -> Self {
        Self {
            front: JoinSet::new(),
            last: JoinSet::new(),
            last_stop: CancellationToken::new(),
            names: HashMap::new(),
            health: None,
        }
    }

    /// On a task's failure, turn these health statuses (and "") `NOT_SERVING`.
    pub fn report_to(&mut self, reporter: HealthReporter, services: Vec<String>) {
        self.health = Some((reporter, services));
    }

    /// Runs a front task, which must stop by itself when the service's
    /// shutdown token fires.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = TaskResult> + Send + 'static,
    {
        let handle = self.front.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Runs a task at once that is stopped, through the token it is given,
    /// only after every front task has finished (a writer that front tasks
    /// wait on must outlive them).
    pub fn spawn_last<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        let handle = self.last.spawn(task(self.last_stop.clone()));
        self.names.insert(handle.id(), name);
    }

    /// Runs until `shutdown` fires or a task ends early (see module docs);
    /// returns once every task has stopped.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), TaskFailed> {
        let early = tokio::select! {
            biased;
            () = shutdown.cancelled() => None,
            Some(done) = self.front.join_next_with_id() => Some(done),
            Some(done) = self.last.join_next_with_id() => Some(done),
        };
        let mut failure = None;
        if let Some(done) = early {
            if shutdown.is_cancelled() {
                // It stopped because shutdown began meanwhile: not early.
                self.note(done, &mut failure);
            } else {
                let failed = match self.outcome(done) {
                    Ok(task) => TaskFailed {
                        task,
                        how: "returned before shutdown".to_owned(),
                    },
                    Err(failed) => failed,
                };
                tracing::error!(task = failed.task, reason = %failed.how,
                "a task stopped unexpectedly; reporting NOT_SERVING and shutting down");
                if let Some((reporter, services)) = &self.health {
                    crate::health::set_all(reporter, services, ServingStatus::NotServing).await;
                }
                shutdown.cancel();
                failure = Some(failed);
            }
        }
        while let Some(done) = self.front.join_next_with_id().await {
            self.note(done, &mut failure);
        }
        self.last_stop.cancel();
        while let Some(done) = self.last.join_next_with_id().await {
            self.note(done, &mut failure);
        }
        match failure {
            None => {
                tracing::info!("shutdown complete");
                Ok(())
            }
            Some(failed) => Err(failed),
        }
    }

    /// A task that stopped during shutdown: fine if it returned Ok, else
    /// logged and kept as the failure if it is the first.
    fn note(&self, done: Result<(Id, TaskResult), JoinError>, failure: &mut Option<TaskFailed>) {
        if let Err(failed) = self.outcome(done) {
            tracing::error!(task = failed.task, reason = %failed.how, "task failed while shutting down");
            failure.get_or_insert(failed);
        }
    }

    /// `Ok(name)` when the task returned Ok, `Err` with what went wrong
    /// otherwise.
    fn outcome(
        &self,
        done: Result<(Id, TaskResult), JoinError>,
    ) -> Result<&'static str, TaskFailed> {
        let name = |id: &Id| self.names.get(id).copied().unwrap_or("unnamed");
        match done {
            Ok((id, Ok(()))) => Ok(name(&id)),
            Ok((id, Err(e))) => Err(TaskFailed {
                task: name(&id),
                how: format!("failed: {e:#}"),
            }),
            Err(e) => Err(TaskFailed {
                task: name(&e.id()),
                how: if e.is_panic() {
                    format!("panicked: {}", panic_message(&*e.into_panic()))
                } else {
                    "was cancelled".to_owned()
                },
            }),
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    async fn until(token: CancellationToken) -> TaskResult {
        token.cancelled().await;
        Ok(())
    }

    #[tokio::test]
    async fn stops_cleanly_on_shutdown_with_the_last_tasks_last() {
        let shutdown = CancellationToken::new();
        let front_done = CancellationToken::new();
        let mut s = Supervisor::new();
        let (token, done) = (shutdown.clone(), front_done.clone());
        s.spawn("front", async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.cancel();
            Ok(())
        });
        let done = front_done.clone();
        s.spawn_last("last", move |stop| async move {
            stop.cancelled().await;
            anyhow::ensure!(done.is_cancelled(), "stopped before the front task");
            Ok(())
        });
        shutdown.cancel();
        s.run(shutdown).await.expect("clean shutdown");
    }

    /// Order's intake writers must run before its API lets a call in, which
    /// is before the service's `run()`: a last task runs once spawned.
    #[tokio::test]
    async fn a_last_task_runs_before_the_supervisor_does() {
        let started = Arc::new(tokio::sync::Notify::new());
        let mut s = Supervisor::new();
        let signal = started.clone();
        s.spawn_last("writer", move |stop| async move {
            signal.notify_one();
            until(stop).await
        });
        tokio::time::timeout(Duration::from_secs(5), started.notified())
            .await
            .expect("the last task started without run()");
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        s.run(shutdown).await.expect("clean shutdown");
    }

    #[tokio::test]
    async fn a_task_that_returns_early_fails_the_service_and_stops_the_rest() {
        let shutdown = CancellationToken::new();
        let mut s = Supervisor::new();
        s.spawn("server", until(shutdown.clone()));
        s.spawn("consume loop", async { Ok(()) });
        let failed = s.run(shutdown.clone()).await.unwrap_err();
        assert_eq!(failed.task, "consume loop");
        assert!(failed.how.contains("returned before shutdown"), "{failed}");
        assert!(shutdown.is_cancelled(), "the other tasks were told to stop");
    }

    #[tokio::test]
    async fn errors_and_panics_are_reported_with_the_task_name() {
        let shutdown = CancellationToken::new();
        let mut s = Supervisor::new();
        s.spawn_last("outbox relay", |_| async {
            Err(anyhow::anyhow!("relation \"outbox\" does not exist"))
        });
        let failed = s.run(shutdown).await.unwrap_err();
        assert_eq!(failed.task, "outbox relay");
        assert!(failed.how.contains("does not exist"), "{failed}");

        let shutdown = CancellationToken::new();
        let mut s = Supervisor::new();
        s.spawn("sweeper", async { panic!("boom") });
        let failed = s.run(shutdown).await.unwrap_err();
        assert_eq!(failed.task, "sweeper");
        assert!(failed.how.contains("panicked: boom"), "{failed}");
    }
}
