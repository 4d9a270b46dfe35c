//! Heartbeat deadlines: nodes that stop heartbeating are marked DOWN; node status writes.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use shoal_proto::v1::{Node, NodeState, NodeStatus};
use tokio::time::Instant;

use super::{
    lock, Backend, DispatcherError, Inner, Leadership, Timers, HEARTBEAT_JITTER_DIVISOR,
    NODE_WRITE_RETRIES,
};
use crate::controlapi::now_ms;
use crate::store::{Command, Mutation, Object, StoreError};

/// The deadline checker runs this many times per heartbeat period.
const CHECKS_PER_PERIOD: u32 = 4;
/// Status message of a node marked down by the dispatcher.
pub const DOWN_MESSAGE: &str = "heartbeat failure";

/// A heartbeat period with jitter: uniformly in [period − period/10, period], so that a
/// thousand agents started together spread out.
pub(super) fn jittered(period: Duration) -> Duration {
    let jitter = period / HEARTBEAT_JITTER_DIVISOR;
    let ms = jitter.as_millis() as u64;
    if ms == 0 {
        return period;
    }
    period - Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// Watches leadership and heartbeat deadlines.
pub(super) async fn monitor<B: Backend>(inner: Arc<Inner<B>>) {
    let mut was_leader = false;
    loop {
        let timers = Timers::of(&inner.store);
        tokio::time::sleep(timers.heartbeat_period / CHECKS_PER_PERIOD).await;
        let leader = inner.backend.leadership() == Leadership::Leader;
        if !leader {
            if was_leader {
                // Sessions end (agents get redirected on reconnect); deadlines are the new
                // leader's business now.
                lock(&inner.sessions).clear();
                lock(&inner.deadlines).clear();
            }
            was_leader = false;
            continue;
        }
        if !was_leader {
            grant_grace(&inner, &timers);
            was_leader = true;
        }
        let now = Instant::now();
        let expired: Vec<String> = {
            let mut d = lock(&inner.deadlines);
            let ids: Vec<String> = d
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                d.remove(id);
            }
            ids
        };
        if expired.is_empty() {
            continue;
        }
        {
            let mut s = lock(&inner.sessions);
            for id in &expired {
                s.remove(id);
            }
        }
        for id in &expired {
            tracing::info!(node_id = %id, "node missed its heartbeats: marking it down");
        }
        crate::metrics::get()
            .heartbeats_missed
            .inc_by(expired.len() as u64);
        if let Err(e) = mark_down(&inner, &expired).await {
            tracing::warn!("marking nodes down: {e}");
            // Try again next round: the nodes are still silent.
            let mut d = lock(&inner.deadlines);
            for id in expired {
                d.entry(id).or_insert(now);
            }
        }
    }
}

/// A new leader gives every READY node one grace period to open a session with it.
fn grant_grace<B: Backend>(inner: &Inner<B>, timers: &Timers) {
    let at = Instant::now() + timers.grace(timers.heartbeat_period);
    let nodes = inner.store.list_nodes().unwrap_or_default();
    let mut d = lock(&inner.deadlines);
    for n in nodes {
        let ready = n.status.as_ref().map(|s| s.state) == Some(NodeState::Ready as i32);
        if ready {
            if let Some(m) = &n.meta {
                d.entry(m.id.clone()).or_insert(at);
            }
        }
    }
}

async fn mark_down<B: Backend>(inner: &Inner<B>, ids: &[String]) -> Result<(), DispatcherError> {
    let ids = ids.to_vec();
    write_nodes(inner, move |store| {
        let mut muts = Vec::new();
        for id in &ids {
            let Some(mut n) = store.get_node(id)? else {
                continue;
            };
            let status = n.status.get_or_insert_with(NodeStatus::default);
            if status.state == NodeState::Down as i32 {
                continue;
            }
            status.state = NodeState::Down as i32;
            status.message = DOWN_MESSAGE.to_string();
            muts.push(update(n));
        }
        Ok(muts)
    })
    .await
}

/// `Update` of a node, conditional on the version it was read at.
pub(super) fn update(n: Node) -> Mutation {
    let version = n.meta.as_ref().map_or(0, |m| m.version);
    Mutation::Update {
        object: Object::Node(n),
        expect_version: Some(version),
    }
}

/// Builds node mutations from a fresh read and proposes them, again on a version conflict.
pub(super) async fn write_nodes<B: Backend, F>(
    inner: &Inner<B>,
    build: F,
) -> Result<(), DispatcherError>
where
    F: Fn(&crate::store::Store) -> Result<Vec<Mutation>, StoreError>,
{
    let mut last = String::new();
    for _ in 0..NODE_WRITE_RETRIES {
        let mutations = build(&inner.store)?;
        if mutations.is_empty() {
            return Ok(());
        }
        let resp = inner
            .backend
            .propose(Command {
                now_ms: now_ms(),
                mutations,
            })
            .await?;
        match resp.result {
            Ok(_) => return Ok(()),
            Err(e @ StoreError::VersionConflict { .. }) => last = e.to_string(),
            Err(e) => return Err(DispatcherError::Refused(e.to_string())),
        }
    }
    Err(DispatcherError::Refused(last))
}
