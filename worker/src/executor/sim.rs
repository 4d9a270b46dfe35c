//! The hollow executor: tasks are bookkeeping only, "running" after a tiny delay. For scale
//! tests of the managers (a thousand hollow nodes in one process); never a default.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use shoal_proto::v1::Task;
use tokio::sync::watch;

use super::{ExecError, Executor, Exit, Probe, Started, StopSignal};

/// How long a simulated start takes.
pub const SIM_START_DELAY: Duration = Duration::from_millis(5);
/// Exit code of a simulated task stopped by SIGTERM (128 + 15, as a shell reports it).
pub const SIM_TERM_EXIT: i32 = 143;

/// Simulated tasks of one hollow node.
#[derive(Default)]
pub struct SimExecutor {
    /// task id → its exit, `None` while running.
    tasks: Mutex<HashMap<String, watch::Sender<Option<Exit>>>>,
}

impl SimExecutor {
    /// A hollow node's executor with no tasks.
    pub fn new() -> SimExecutor {
        SimExecutor::default()
    }

    /// Ends a simulated task as if its process exited with `code` (tests of failures).
    pub fn exit(&self, task_id: &str, code: i32) -> bool {
        match self.lock().get(task_id) {
            Some(tx) => {
                tx.send_replace(Some(Exit { code }));
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Option<Exit>>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl Executor for SimExecutor {
    async fn prepare(&self, _task: &Task, _note: &super::Note) -> Result<(), ExecError> {
        Ok(())
    }

    async fn start(&self, task: &Task) -> Result<Started, ExecError> {
        let id = task.meta.as_ref().map_or("", |m| m.id.as_str()).to_string();
        tokio::time::sleep(SIM_START_DELAY).await;
        self.lock().insert(id.clone(), watch::channel(None).0);
        Ok(Started {
            container_id: id,
            pid: 0,
        })
    }

    async fn wait(&self, task_id: &str) -> Result<Exit, ExecError> {
        let mut rx = match self.lock().get(task_id) {
            Some(tx) => tx.subscribe(),
            None => return Err(ExecError::Runtime(format!("no task {task_id}"))),
        };
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| ExecError::Runtime(format!("task {task_id} was removed")))?;
        Ok(exit.unwrap_or(Exit { code: 0 }))
    }

    async fn signal(&self, task_id: &str, signal: StopSignal) -> Result<(), ExecError> {
        let code = match signal {
            StopSignal::Term => SIM_TERM_EXIT,
            StopSignal::Kill => 137,
        };
        if let Some(tx) = self.lock().get(task_id) {
            tx.send_if_modified(|e| {
                if e.is_none() {
                    *e = Some(Exit { code });
                    true
                } else {
                    false
                }
            });
        }
        Ok(())
    }

    async fn remove(&self, task_id: &str) -> Result<(), ExecError> {
        self.lock().remove(task_id);
        Ok(())
    }

    async fn probe(&self, task_id: &str) -> Result<Probe, ExecError> {
        Ok(match self.lock().get(task_id) {
            None => Probe::Missing,
            Some(tx) => match *tx.borrow() {
                None => Probe::Running { pid: 0 },
                Some(e) => Probe::Exited(e),
            },
        })
    }

    /// A hollow task's checks pass while it runs: there is nothing to check.
    async fn check(
        &self,
        task_id: &str,
        _argv: &[String],
        _timeout: std::time::Duration,
    ) -> Result<super::CheckResult, ExecError> {
        match self.lock().get(task_id).map(|tx| *tx.borrow()) {
            Some(None) => Ok(super::CheckResult {
                exit_code: 0,
                output: String::new(),
            }),
            _ => Err(ExecError::Runtime(format!("task {task_id} is not running"))),
        }
    }
}
