//! Group commit of control API writes: proposals that arrive while earlier ones are still
//! being replicated travel together as one Raft entry (`Mutation::Group`).
//!
//! openraft 0.9 appends (and flushes) each `client_write` on its own, one after the other, so
//! without grouping 64 concurrent updates cost 64 log flushes on every manager. A lone
//! proposal is written as it is, with no wait: grouping only ever takes what is already
//! queued while `MAX_INFLIGHT_GROUPS` entries are in flight.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

use crate::raft::{ProposeRefused, Raft, MAX_ENTRY_BYTES};
use crate::store::{Command, Mutation, Response};

/// Proposals queued for the group-commit loop; when full, proposers wait for room.
pub const PROPOSAL_QUEUE: usize = 1024;
/// Most commands carried in one Raft entry.
pub const MAX_GROUP_COMMANDS: usize = 256;
/// Raft entries of grouped proposals in flight at once; later proposals queue and are grouped.
pub const MAX_INFLIGHT_GROUPS: usize = 2;
/// What a group adds around its commands in the entry: the outer command's time and length,
/// the `Group` tag and its length.
const GROUP_FRAME_BYTES: usize = 8 + 8 + 4 + 8;
/// Bytes of commands one group may hold: a group closes before it would exceed this, so a
/// grouped entry is never larger than a Raft entry may be.
pub const MAX_GROUP_BYTES: usize = MAX_ENTRY_BYTES - GROUP_FRAME_BYTES;

/// One proposal and where its answer goes.
struct Pending {
    cmd: Command,
    /// `cmd.encoded_bytes()`, computed once by the proposer.
    bytes: usize,
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
        let bytes = cmd.encoded_bytes();
        if bytes > MAX_ENTRY_BYTES {
            return Err(Status::invalid_argument(
                ProposeRefused::TooLarge { bytes }.to_string(),
            ));
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { cmd, bytes, reply })
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
    // A proposal that did not fit the last group: it opens the next one.
    let mut held: Option<Pending> = None;
    loop {
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Never closed, so acquiring only waits.
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let (group, rest) = gather(first, || rx.try_recv().ok(), |p| p.bytes);
        held = rest;
        let raft = raft.clone();
        tokio::spawn(async move {
            write_group(&raft, group).await;
            drop(permit);
        });
    }
}

/// A group opened by `first` with what `next` yields while it fits: at most
/// [`MAX_GROUP_COMMANDS`] commands of [`MAX_GROUP_BYTES`] together (`bytes` of each). The first
/// one that does not fit comes back to open the next group; `first` always goes (alone it
/// is one entry, bounded by [`MAX_ENTRY_BYTES`] when proposed).
fn gather<T>(
    first: T,
    mut next: impl FnMut() -> Option<T>,
    bytes: impl Fn(&T) -> usize,
) -> (Vec<T>, Option<T>) {
    let mut total = bytes(&first);
    let mut group = vec![first];
    while group.len() < MAX_GROUP_COMMANDS {
        let Some(p) = next() else {
            break;
        };
        let b = bytes(&p);
        if total + b > MAX_GROUP_BYTES {
            return (group, Some(p));
        }
        total += b;
        group.push(p);
    }
    (group, None)
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
    crate::raft::propose(raft, cmd).await.map_err(|e| match e {
        e @ ProposeRefused::TooLarge { .. } => Status::invalid_argument(e.to_string()),
        ProposeRefused::NotLeader => {
            Status::unavailable("this manager lost leadership; retry the request")
        }
        // The control API gives a stopped Raft's cause (`ControlApi::unavailable`).
        e @ ProposeRefused::Raft(_) => Status::unavailable(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Mutation, Object};
    use shoal_proto::v1::{Meta, Service, ServiceSpec};

    /// A service create of about `bytes` bytes.
    fn create(id: &str, bytes: usize) -> Command {
        let mut spec = ServiceSpec {
            name: id.into(),
            ..Default::default()
        };
        spec.labels.insert("blob".into(), "x".repeat(bytes));
        Command {
            now_ms: 1,
            mutations: vec![Mutation::Create(Object::Service(Service {
                meta: Some(Meta {
                    id: id.into(),
                    ..Default::default()
                }),
                spec: Some(spec),
                ..Default::default()
            }))],
        }
    }

    /// The entry the group commit writes for `group`.
    fn entry(group: Vec<Command>) -> Command {
        if group.len() == 1 {
            return group.into_iter().next().unwrap();
        }
        Command {
            now_ms: 1,
            mutations: vec![Mutation::Group(group)],
        }
    }

    #[test]
    fn two_large_concurrent_writes_are_grouped_within_the_entry_bound() {
        // Two writes of 60 % of an entry each, queued together: two entries, each in bounds.
        let big = MAX_ENTRY_BYTES * 6 / 10;
        let mut queue = vec![create("b", big)].into_iter();
        let (group, rest) = gather(create("a", big), || queue.next(), Command::encoded_bytes);
        assert_eq!(group.len(), 1);
        let rest = rest.expect("the second write waits for the next group");
        assert!(entry(group).encoded_bytes() <= MAX_ENTRY_BYTES);
        let (next, none) = gather(rest, || queue.next(), Command::encoded_bytes);
        assert!(none.is_none());
        assert_eq!(next.len(), 1);
        assert!(entry(next).encoded_bytes() <= MAX_ENTRY_BYTES);

        // Small ones still travel together, up to the byte budget exactly.
        let small = MAX_ENTRY_BYTES / 5;
        let mut queue: std::vec::IntoIter<Command> = (0..9)
            .map(|i| create(&format!("s{i}"), small))
            .collect::<Vec<_>>()
            .into_iter();
        let first = create("s", small);
        let (group, rest) = gather(first, || queue.next(), Command::encoded_bytes);
        assert_eq!(
            group.len(),
            4,
            "four fifths of an entry fit, a fifth does not"
        );
        assert!(rest.is_some());
        let e = entry(group);
        assert!(
            e.encoded_bytes() <= MAX_ENTRY_BYTES,
            "{}",
            e.encoded_bytes()
        );
        assert_eq!(
            e.encoded_bytes(),
            bincode::serialized_size(&e).unwrap() as usize
        );
    }

    #[test]
    fn the_group_budget_includes_the_group_frame() {
        // Commands that fill the budget exactly make an entry of exactly the bound.
        let cmds: Vec<Command> = (0..2)
            .map(|i| Command {
                now_ms: 1,
                mutations: vec![Mutation::Delete {
                    kind: crate::store::Kind::Task,
                    id: format!("{i}"),
                    expect_version: None,
                }],
            })
            .collect();
        let inner: usize = cmds.iter().map(Command::encoded_bytes).sum();
        assert_eq!(entry(cmds).encoded_bytes(), inner + GROUP_FRAME_BYTES);
    }
}
