//! The agent's local task database (sled, `<data_dir>/worker/`): the tasks this node runs and
//! their last status, so a restarted agent adopts its containers instead of restarting them.

use std::path::Path;

use prost::Message;
use shoal_proto::v1::{Task, TaskStatus};

/// Directory of the database under the data dir.
pub const WORKER_DIR: &str = "worker";
/// sled's page cache: the database holds a few hundred small tasks at most.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Errors of the task database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("task database: {0}")]
    Sled(#[from] sled::Error),
    #[error("task database: corrupt entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Tasks by id, each with its last known status (in `Task.status`).
#[derive(Clone)]
pub struct TaskDb {
    db: sled::Db,
}

impl TaskDb {
    /// Opens (creating) the database in `<data_dir>/worker`.
    pub fn open(data_dir: &Path) -> Result<TaskDb, DbError> {
        let db = sled::Config::new()
            .path(data_dir.join(WORKER_DIR))
            .cache_capacity(CACHE_BYTES)
            .open()?;
        Ok(TaskDb { db })
    }

    /// Records a task (its spec and desired state as assigned, its status as stored).
    pub fn put(&self, task: &Task) -> Result<(), DbError> {
        let id = task.meta.as_ref().map_or("", |m| m.id.as_str());
        self.db.insert(id.as_bytes(), task.encode_to_vec())?;
        Ok(())
    }

    /// Records a new status of a known task; an unknown task is ignored.
    pub fn set_status(&self, id: &str, status: &TaskStatus) -> Result<(), DbError> {
        if let Some(mut t) = self.get(id)? {
            t.status = Some(status.clone());
            self.put(&t)?;
        }
        Ok(())
    }

    /// A task by id.
    pub fn get(&self, id: &str) -> Result<Option<Task>, DbError> {
        match self.db.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(id, &v)?)),
            None => Ok(None),
        }
    }

    /// Forgets a task.
    pub fn remove(&self, id: &str) -> Result<(), DbError> {
        self.db.remove(id.as_bytes())?;
        Ok(())
    }

    /// Every task, ordered by id.
    pub fn list(&self) -> Result<Vec<Task>, DbError> {
        self.db
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&String::from_utf8_lossy(&k), &v)
            })
            .collect()
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), DbError> {
        self.db.flush()?;
        Ok(())
    }
}

fn decode(key: &str, v: &[u8]) -> Result<Task, DbError> {
    Task::decode(v).map_err(|e| DbError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}
