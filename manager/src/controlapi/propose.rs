//! Group commit of control API writes: proposals that arrive while earlier ones are still
//! being replicated travel together as one Raft entry (`Mutation::Group`).
//!
//! openraft 0.9 appends (and flushes) each `client_write` on its own, one after the other, so
//! without grouping 64 concurrent updates cost 64 log flushes on every manager. A lone
//! proposal is written as it is, with no wait: grouping only ever takes what is already
//! queued while `MAX_INFLIGHT_GROUPS` entries are in flight.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

use crate::raft::Raft;
use crate::store::{Command, Mutation, Response};

/// Proposals queued for the group-commit loop; when full, proposers wait for room.
pub const PROPOSAL_QUEUE: usize = 1024;
/// Most commands carried in one Raft entry.
pub const MAX_GROUP_COMMANDS: usize = 256;
/// Raft entries of grouped proposals in flight at once; later proposals queue and are grouped.
pub const MAX_INFLIGHT_GROUPS: usize = 2;

/// One proposal and where its answer goes.
struct Pending {
    cmd: Command,
    reply: oneshot::Sender<Result<Response, Status>>,
}

/// The sending side of the group-commit loop; the loop ends when this is dropped.
pub(crate) struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the loop on the current tokio runtime.
    pub(crate) fn start(raft: Raft) -> Proposer {
        let (tx, rx) = mpsc::channel(PROPOSAL_QUEUE);
        tokio::spawn(run(raft, rx));
        Proposer { tx }
    }

    /// Proposes `cmd` (possibly grouped with others) and waits until it is applied.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<Response, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { cmd, reply })
            .await
            .map_err(|_| Status::unavailable("this manager is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("this manager is shutting down"))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Pending>) {
    // One permit per Raft entry in flight; while none is free, proposals queue up.
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_GROUPS));
    while let Some(first) = rx.recv().await {
        // Never closed, so acquiring only waits.
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP_COMMANDS {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write_group(&raft, group).await;
            drop(permit);
        });
    }
}

/// Writes the group as one entry (a lone command as itself) and answers each proposer.
async fn write_group(raft: &Raft, mut group: Vec<Pending>) {
    if group.len() == 1 {
        if let Some(p) = group.pop() {
            let _ = p.reply.send(write(raft, p.cmd).await);
        }
        return;
    }
    let (cmds, replies): (Vec<Command>, Vec<_>) =
        group.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let now_ms = cmds.iter().map(|c| c.now_ms).max().unwrap_or(0);
    let n = cmds.len();
    let grouped = Command {
        now_ms,
        mutations: vec![Mutation::Group(cmds)],
    };
    match write(raft, grouped).await {
        Ok(resp) if resp.each.len() == n => {
            for (reply, r) in replies.into_iter().zip(resp.each) {
                let _ = reply.send(Ok(r));
            }
        }
        Ok(resp) => {
            // Only a store refusing the group itself gets here (it has no `each`).
            let why = match resp.result {
                Err(e) => Status::internal(format!("group write refused: {e}")),
                Ok(_) => Status::internal(format!(
                    "group write answered {} of {n} commands",
                    resp.each.len()
                )),
            };
            for reply in replies {
                let _ = reply.send(Err(why.clone()));
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

async fn write(raft: &Raft, cmd: Command) -> Result<Response, Status> {
    match raft.client_write(cmd).await {
        Ok(resp) => Ok(resp.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(Status::unavailable(
            "this manager lost leadership; retry the request",
        )),
        Err(other) => Err(Status::unavailable(
            super::stopped_because(raft).unwrap_or_else(|| format!("raft: {other}")),
        )),
    }
}
