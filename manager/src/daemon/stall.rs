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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// How long the agent's start (opening its stores, resuming its role; no network wait) may
/// take before it is taken as hung on its disk.
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// While the agent waits for room to start, how often it says it still does.
const WAIT_SAY_EVERY: u32 = 30;

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

/// Before the agent opens its stores: on a data dir without room they fail or wedge at once
/// (chaos seed 20261208007: an agent SIGKILLed and restarted on a full tmpfs opened sled and
/// hung for good, without a word and without its socket, even once space returned). Waits,
/// saying so, until `data_dir` takes [`super::RAFT_RESTART_FREE_BYTES`]. A data dir that does
/// not exist yet is made later, by the start itself.
pub fn wait_for_room(data_dir: &Path) {
    match nix::sys::statvfs::statvfs(data_dir) {
        Err(_) => return,
        Ok(s) if s.blocks_available() * s.fragment_size() >= 2 * super::RAFT_RESTART_FREE_BYTES => {
            return
        }
        Ok(_) => {}
    }
    let mut looks = 0u32;
    while !super::has_room_now(data_dir) {
        if looks.is_multiple_of(WAIT_SAY_EVERY) {
            tracing::error!(
                "{} has less than {} MiB free: the agent waits for room before it opens its \
                 stores (is the disk full?)",
                data_dir.display(),
                super::RAFT_RESTART_FREE_BYTES >> 20
            );
        }
        looks += 1;
        std::thread::sleep(super::RAFT_CHECK_INTERVAL);
    }
    if looks > 0 {
        tracing::warn!("{} has room again: the agent starts", data_dir.display());
    }
}

/// Watches the agent's start from an OS thread until [`StartWatch::started`]: a start that
/// has not finished in [`START_DEADLINE`] (counted in looks made on time, so a stopped
/// process does not count) hangs on its disk — the disk filled up or stopped while the stores
/// opened — and the agent starts afresh once the data dir has room.
pub fn watch_start(data_dir: PathBuf) -> StartWatch {
    let done = Arc::new(AtomicBool::new(false));
    let seen = done.clone();
    let spawned = std::thread::Builder::new()
        .name("shoal-start-watch".into())
        .spawn(move || {
            let mut waited = Duration::ZERO;
            while !seen.load(Ordering::Relaxed) {
                let t = Instant::now();
                std::thread::sleep(CHECK);
                let took = t.elapsed();
                if took < LATE {
                    waited += took;
                }
                if waited < START_DEADLINE || seen.load(Ordering::Relaxed) {
                    continue;
                }
                tracing::error!(
                    "the agent has not started in {:?} (opening its stores hangs: is the disk \
                     full or stuck?); it starts afresh once {} has {} MiB free",
                    START_DEADLINE,
                    data_dir.display(),
                    super::RAFT_RESTART_FREE_BYTES >> 20
                );
                while !super::has_room_now(&data_dir) {
                    std::thread::sleep(super::RAFT_CHECK_INTERVAL);
                }
                super::reexec();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no start watch: {e}");
    }
    StartWatch(done)
}

/// The start watch of [`watch_start`]; it ends at [`StartWatch::started`] or when dropped.
#[derive(Debug)]
pub struct StartWatch(Arc<AtomicBool>);

impl StartWatch {
    /// The agent is up: the watch ends.
    pub fn started(self) {}
}

impl Drop for StartWatch {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
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
