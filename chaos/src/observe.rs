//! The task sampler: every [`SAMPLE_PERIOD`] it reads all tasks (a linearizable read, so one
//! consistent store state) and checks each replicated slot for two tasks at once, in the
//! store (desired ≤ RUNNING: the orchestrators' invariant) and on the machines (two task
//! containers with live processes).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use shoal_proto::v1 as pb;

use crate::cluster::{container_live, control, CALL_TIMEOUT};
use crate::workload::Shared;

/// How often tasks are sampled.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(1000);
/// Overlaps recorded at most (each kind); counting goes on beyond.
const MAX_RECORDED: usize = 200;

/// Two tasks of one slot seen at once.
#[derive(Debug, Clone, Serialize)]
pub struct Overlap {
    pub at_ms: u64,
    pub service: String,
    pub slot: u64,
    pub tasks: Vec<String>,
    /// The fault in progress (or healed less than the grace period before), if any.
    pub during_fault: Option<String>,
}

/// What the sampler saw.
#[derive(Debug, Default, Serialize)]
pub struct Observations {
    pub samples: u64,
    pub failed_samples: u64,
    pub tasks_seen: usize,
    /// Slots with two tasks whose desired state is ≤ RUNNING in one store state.
    pub store_overlaps: Vec<Overlap>,
    pub store_overlap_count: u64,
    /// Slots with two live task containers at once.
    pub live_overlaps: Vec<Overlap>,
    pub live_overlap_count: u64,
    /// Cluster network addresses held by two tasks in one store state.
    pub address_conflicts: Vec<String>,
    pub address_conflict_count: u64,
    /// Task attachments seen (over all samples).
    pub attachments_seen: u64,
}

/// The fault the harness has in progress, for tagging what the sampler sees.
#[derive(Default)]
pub struct FaultTag {
    pub current: Option<String>,
    /// The last healed fault and when (ms since the run started).
    pub healed: Option<(String, u64)>,
}

/// After a fault is healed, what it caused may take this long to be undone (a cut-off agent
/// learns that its tasks were replaced only once it reaches a manager again).
pub const HEAL_GRACE_MS: u64 = 15_000;

impl FaultTag {
    /// The fault in progress or healed within the grace period, by name alone.
    pub fn fault(&self, now_ms: u64) -> Option<String> {
        if let Some(c) = &self.current {
            return Some(c.clone());
        }
        match &self.healed {
            Some((f, at)) if now_ms.saturating_sub(*at) <= HEAL_GRACE_MS => Some(f.clone()),
            _ => None,
        }
    }

    fn tag(&self, now_ms: u64) -> Option<String> {
        if let Some(c) = &self.current {
            return Some(c.clone());
        }
        match &self.healed {
            Some((f, at)) if now_ms.saturating_sub(*at) <= HEAL_GRACE_MS => {
                Some(format!("{f} (healed {} ms before)", now_ms - at))
            }
            _ => None,
        }
    }
}

fn state_name(s: i32) -> String {
    pb::TaskState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| s.to_string())
}

/// Samples until `stop` is set; returns what it saw.
pub async fn sample(
    shared: Arc<Shared>,
    managers: Vec<(String, PathBuf)>,
    tag: Arc<Mutex<FaultTag>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Observations {
    let mut obs = Observations::default();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut rng = rand::rngs::StdRng::from_entropy();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(SAMPLE_PERIOD).await;
        let Some((_, sock)) = managers.choose(&mut rng).cloned() else {
            break;
        };
        let tasks = async {
            let mut c = control(&sock).await.ok()?;
            // One read, so the invariants are checked on one state: a sample whose tasks
            // take more than a page is not taken.
            let req = pb::ListTasksRequest {
                page_size: u32::MAX,
                ..Default::default()
            };
            let r = tokio::time::timeout(CALL_TIMEOUT, c.list_tasks(req))
                .await
                .ok()?
                .ok()?
                .into_inner();
            r.next_page_token.is_empty().then_some(r.tasks)
        }
        .await;
        let Some(tasks) = tasks else {
            obs.failed_samples += 1;
            continue;
        };
        obs.samples += 1;
        let now_ms = shared.now_us() / 1000;
        let fault = tag.lock().unwrap_or_else(|e| e.into_inner()).tag(now_ms);
        // Never two holders of one address on one network (IPAM at apply, across leaders).
        let mut holders: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for t in &tasks {
            for a in t.networks.iter().filter(|a| !a.address.is_empty()) {
                obs.attachments_seen += 1;
                let id = t.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
                holders
                    .entry((a.network_name.clone(), a.address.clone()))
                    .or_default()
                    .push(id);
            }
        }
        for ((net, addr), ids) in holders.into_iter().filter(|(_, v)| v.len() > 1) {
            obs.address_conflict_count += 1;
            if obs.address_conflicts.len() < MAX_RECORDED {
                obs.address_conflicts
                    .push(format!("t={now_ms} ms {net} {addr}: tasks {ids:?}"));
            }
        }
        let mut store: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        let mut live: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
        for t in &tasks {
            let id = t.meta.as_ref().map(|m| m.id.clone()).unwrap_or_default();
            seen.insert(id.clone());
            names.insert(t.service_id.clone(), t.service_name.clone());
            if t.slot == 0 {
                continue;
            }
            let state = t.status.as_ref().map(|s| s.state).unwrap_or_default();
            let node = t.node_id.get(..6).unwrap_or(&t.node_id);
            let desc = format!(
                "{id} on {node} (desired {}, observed {})",
                state_name(t.desired_state),
                state_name(state)
            );
            let key = (t.service_id.clone(), t.slot);
            if t.desired_state <= pb::TaskState::Running as i32 {
                store.entry(key.clone()).or_default().push(desc.clone());
            }
            let cid = t
                .status
                .as_ref()
                .map(|s| s.container_id.clone())
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| id.clone());
            // Whatever the store says: a container with live processes runs.
            if container_live(&cid) {
                live.entry(key).or_default().push(desc);
            }
        }
        let overlap = |((svc, slot), ids): ((String, u64), Vec<String>)| Overlap {
            at_ms: now_ms,
            service: names.get(&svc).cloned().unwrap_or(svc),
            slot,
            tasks: ids,
            during_fault: fault.clone(),
        };
        for (k, ids) in store.into_iter().filter(|(_, v)| v.len() > 1) {
            obs.store_overlap_count += 1;
            if obs.store_overlaps.len() < MAX_RECORDED {
                obs.store_overlaps.push(overlap((k, ids)));
            }
        }
        for (k, ids) in live.into_iter().filter(|(_, v)| v.len() > 1) {
            obs.live_overlap_count += 1;
            if obs.live_overlaps.len() < MAX_RECORDED {
                obs.live_overlaps.push(overlap((k, ids)));
            }
        }
    }
    obs.tasks_seen = seen.len();
    obs
}
