//! The agent's last resort: an OS thread that watches the async runtime itself.
//!
//! A failed disk can wedge the database rather than fail it (sled's flusher gives up and
//! every later call that needs a new segment waits for good). The agent calls its store from
//! the runtime's worker threads, so once as many calls are stuck as there are workers, nothing
//! async runs any more: not the Raft core, not the heartbeats, not `watch_raft`, which would
//! have stopped the manager and started the agent afresh. The node looks alive to nobody and
//! never comes back (chaos, seed 18064749306334425311 at 5 managers: an ext4-full follower's
//! agent went silent for good). This thread needs nothing from the runtime: a task on the
//! runtime bumps a pulse; when the pulse has not moved for [`STALL_AFTER`] while this thread
//! itself kept time (a stopped or starved process stops it too), the agent starts afresh as
//! `watch_raft` would — once the data dir has room again. Containers are separate processes
//! and the restarted agent adopts them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the runtime's task bumps the pulse.
const PULSE: Duration = Duration::from_millis(250);
/// How often the thread looks.
const CHECK: Duration = Duration::from_secs(1);
/// A look that came this late means the thread itself was stopped or starved: no verdict.
const LATE: Duration = Duration::from_secs(3);
/// How long the pulse may stand still before the runtime is taken as wedged.
pub const STALL_AFTER: Duration = Duration::from_secs(20);

/// What the thread has seen so far.
#[derive(Debug, Default)]
pub struct Stall {
    last: u64,
    still: Duration,
}

impl Stall {
    /// One look: the pulse now, and how long since the last look. Whether the runtime has
    /// stood still for [`STALL_AFTER`] of looks made on time.
    pub fn observe(&mut self, pulse: u64, took: Duration) -> bool {
        if pulse != self.last || took >= LATE {
            self.last = pulse;
            self.still = Duration::ZERO;
            return false;
        }
        self.still += took;
        self.still >= STALL_AFTER
    }

    /// How long the pulse has stood still.
    pub fn still(&self) -> Duration {
        self.still
    }
}

/// Starts the pulse on the current runtime and the thread that watches it (the agent's
/// command does; in-process test daemons do not, where a blocked test thread would look like a
/// stall). The thread ends when the runtime drops the pulse's task.
pub fn watch(data_dir: PathBuf) {
    let pulse = Arc::new(AtomicU64::new(0));
    let beat = pulse.clone();
    tokio::spawn(async move {
        loop {
            beat.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(PULSE).await;
        }
    });
    let spawned = std::thread::Builder::new()
        .name("shoal-stall-watch".into())
        .spawn(move || {
            let mut stall = Stall::default();
            loop {
                let t = Instant::now();
                std::thread::sleep(CHECK);
                if Arc::strong_count(&pulse) == 1 {
                    return;
                }
                if !stall.observe(pulse.load(Ordering::Relaxed), t.elapsed()) {
                    continue;
                }
                tracing::error!(
                    "the agent's runtime has not moved for {:?} (its store is wedged: is the disk \
                     full or stuck?); the agent starts afresh once {} has {} MiB free",
                    stall.still(),
                    data_dir.display(),
                    super::RAFT_RESTART_FREE_BYTES >> 20
                );
                while !super::has_room_now(&data_dir) {
                    std::thread::sleep(super::RAFT_CHECK_INTERVAL);
                }
                tracing::error!(
                    "{} has room again: starting the agent afresh",
                    data_dir.display()
                );
                super::reexec();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no runtime stall watch: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulse_that_stands_still_on_time_is_a_stall() {
        let mut s = Stall::default();
        let mut pulse = 0;
        // A moving pulse never is.
        for _ in 0..100 {
            pulse += 4;
            assert!(!s.observe(pulse, CHECK));
        }
        // Standing still: a stall only once STALL_AFTER of looks on time have passed.
        let looks = (STALL_AFTER.as_secs() / CHECK.as_secs()) as usize;
        for k in 1..looks {
            assert!(!s.observe(pulse, CHECK), "look {k}");
        }
        assert!(s.observe(pulse, CHECK));
        assert_eq!(s.still(), STALL_AFTER);
    }

    #[test]
    fn a_late_look_or_a_beat_starts_the_count_again() {
        let mut s = Stall::default();
        for _ in 0..15 {
            assert!(!s.observe(7, CHECK));
        }
        // The watcher itself was stopped (SIGSTOP of the agent): the pulse could not move.
        assert!(!s.observe(7, Duration::from_secs(30)));
        assert_eq!(s.still(), Duration::ZERO);
        for _ in 0..15 {
            assert!(!s.observe(7, CHECK));
        }
        assert!(!s.observe(8, CHECK));
        assert_eq!(s.still(), Duration::ZERO);
    }
}
