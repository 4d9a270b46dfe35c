//! openraft's own storage test suite against the real sled log store and state machine.

use openraft::testing::{StoreBuilder, Suite};
use shoal_manager::raft::typ::StorageError;
use shoal_manager::raft::{LogStore, StateMachine, Storage, TypeConfig};

/// Each build gets a fresh sled database in its own tempdir (kept alive by the guard).
struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let storage = Storage::open(&dir.path().join("raft"))
            .map_err(|e| openraft::StorageIOError::write(&e))?;
        Ok((dir, storage.log, storage.state_machine))
    }
}

#[test]
fn openraft_suite_passes_on_sled() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}
