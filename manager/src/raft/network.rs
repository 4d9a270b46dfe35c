//! The Raft transport: openraft's `RaftNetworkFactory`/`RaftNetwork` over gRPC with mutual
//! TLS, and the `Raft` gRPC service that hands peers' requests to the local node.
//!
//! openraft's request and response structs travel as bincode inside `RaftMessage.data`; a
//! response is the whole `Result<Resp, RaftError>`, so a remote Raft error reaches openraft
//! as `RemoteError`. Transport failures become `Unreachable` (openraft backs off) and
//! deadline misses `Timeout`; nothing is retried here — openraft owns retries.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_proto::v1::raft_client::RaftClient;
use shoal_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use shoal_proto::v1::{LeaderPingRequest, LeaderPingResponse, RaftMessage};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::elect::LeaderContact;
use super::epoch::{judge, Epoch, EpochCell, Superseded, Verdict, EPOCH_HEADER};
use super::typ::rpc::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use super::typ::{Node, NodeId, Raft, TypeConfig};
use crate::ca::Role;
use crate::tls::{Authorizer, NodeTls};

/// Largest Raft message (request or response, encoded) either side sends or accepts.
/// openraft splits snapshots into `snapshot_max_chunk_size` chunks (3 MiB by default) and is
/// told to send fewer entries when an append would be larger.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// TCP connect plus TLS handshake to a peer manager (LAN).
pub const RAFT_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Peer channels kept; a cluster has a handful of managers, so this is never reached in
/// practice, but a membership churning through addresses must not grow the map forever.
const MAX_CACHED_PEER_CHANNELS: usize = 64;
/// Backoff after a peer was unreachable: doubling from the first to the last step, then the
/// last step for as long as it stays unreachable.
const UNREACHABLE_BACKOFF_MS: [u64; 4] = [100, 200, 400, 800];

/// Errors of encoding, decoding or sending one Raft message.
#[derive(Debug, thiserror::Error)]
pub enum RaftNetError {
    #[error("encoding raft message: {0}")]
    Encode(bincode::Error),
    #[error("decoding raft message: {0}")]
    Decode(bincode::Error),
    #[error("raft message of {0} bytes exceeds the limit of {MAX_RAFT_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("peer address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("{0}")]
    Status(Status),
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, RaftNetError> {
    let data = bincode::serialize(v).map_err(RaftNetError::Encode)?;
    if data.len() > MAX_RAFT_MESSAGE_BYTES {
        return Err(RaftNetError::TooLarge(data.len()));
    }
    Ok(data)
}

fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, RaftNetError> {
    if data.len() > MAX_RAFT_MESSAGE_BYTES {
        return Err(RaftNetError::TooLarge(data.len()));
    }
    bincode::deserialize(data).map_err(RaftNetError::Decode)
}

/// openraft's network factory: one client per peer, sharing one cached channel per address.
#[derive(Clone)]
pub struct Network {
    self_id: NodeId,
    tls: NodeTls,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    contact: Option<LeaderContact>,
    epoch: Option<EpochCell>,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network")
            .field("self_id", &self.self_id)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// The network of Raft node `self_id`, connecting with this node's TLS material (its
    /// certificate must be a manager's for peers to accept it).
    pub fn new(self_id: NodeId, tls: NodeTls) -> Network {
        Network {
            self_id,
            tls,
            channels: Arc::new(Mutex::new(HashMap::new())),
            contact: None,
            epoch: None,
        }
    }

    /// Stamps every request with the raft group's epoch in `epoch`, and records there a
    /// refusal by a manager of a later one (see `epoch.rs`). Without it requests carry epoch 0.
    pub fn with_epoch(mut self, epoch: EpochCell) -> Network {
        self.epoch = Some(epoch);
        self
    }

    fn stamp(&self) -> Epoch {
        self.epoch.as_ref().map(EpochCell::get).unwrap_or_default()
    }

    /// Tells the election driver through `contact` when a voter refuses this node's vote
    /// request because its log is longer (this node cannot win that round).
    pub fn with_contact(mut self, contact: LeaderContact) -> Network {
        self.contact = Some(contact);
        self
    }

    /// The cached channel to `addr`, made (lazily connecting) if there is none.
    fn channel(&self, addr: &str) -> Result<Channel, RaftNetError> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = self
            .tls
            .channel_with_timeout(addr, RAFT_CONNECT_TIMEOUT)
            .map_err(|e| RaftNetError::Address {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        if channels.len() >= MAX_CACHED_PEER_CHANNELS {
            channels.clear();
        }
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Tells the manager at `addr` that this node leads in `term` (the election driver's
    /// beacon, see `elect.rs`); answers the receiver's term.
    pub async fn ping_leadership(
        &self,
        addr: &str,
        term: u64,
        ttl: Duration,
    ) -> Result<u64, RaftNetError> {
        let mut client = RaftClient::new(self.channel(addr)?);
        let epoch = self.stamp();
        let mut request = Request::new(LeaderPingRequest {
            leader_id: self.self_id,
            term,
            epoch: epoch.number,
            epoch_id: epoch.id,
        });
        request.set_timeout(ttl);
        let resp = client.leader_ping(request).await.map_err(|status| {
            note_refusal(self.epoch.as_ref(), addr, &status);
            RaftNetError::Status(status)
        })?;
        Ok(resp.into_inner().term)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            self_id: self.self_id,
            target,
            node: node.clone(),
            channel: self.channel(&node.addr),
            contact: self.contact.clone(),
            epoch: self.epoch.clone(),
        }
    }
}

/// Tells `cell` when `status` is a refusal by a manager of a later raft group epoch than
/// ours (at `addr`): our group was started over without us. True for any epoch refusal.
fn note_refusal(cell: Option<&EpochCell>, addr: &str, status: &Status) -> bool {
    let Some(cell) = cell else {
        return false;
    };
    if status.code() != Code::FailedPrecondition {
        return false;
    }
    let Some(theirs) = status
        .metadata()
        .get(EPOCH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(Epoch::from_header)
    else {
        return false;
    };
    if theirs.number > cell.get().number {
        cell.set_superseded(Superseded {
            by: theirs,
            addr: addr.to_string(),
        });
    }
    true
}

/// openraft's client to one peer.
pub struct PeerClient {
    self_id: NodeId,
    target: NodeId,
    node: Node,
    /// An address that does not parse stays an error for this client's life: every RPC
    /// reports the peer unreachable.
    channel: Result<Channel, RaftNetError>,
    contact: Option<LeaderContact>,
    epoch: Option<EpochCell>,
}

impl fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerClient")
            .field("target", &self.target)
            .field("addr", &self.node.addr)
            .finish_non_exhaustive()
    }
}

/// Which RPC of the `Raft` service.
#[derive(Clone, Copy)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl Method {
    fn rpc_type(self) -> RPCTypes {
        match self {
            Method::AppendEntries => RPCTypes::AppendEntries,
            Method::Vote => RPCTypes::Vote,
            Method::InstallSnapshot => RPCTypes::InstallSnapshot,
        }
    }
}

/// Why one call failed before a Raft answer came back.
enum CallError {
    /// This side refused to send it: the encoded request exceeds the limit.
    TooLarge(RaftNetError),
    /// No answer within the deadline.
    Timeout,
    /// The peer cannot be reached or refuses us; back off.
    Unreachable(RaftNetError),
    /// Anything else on the wire.
    Network(RaftNetError),
}

impl PeerClient {
    /// Sends one encoded request and decodes the peer's `Result<Resp, RaftError<E>>`.
    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        req: &Req,
        ttl: Duration,
    ) -> Result<Result<Resp, RaftError<NodeId, E>>, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(CallError::Unreachable(RaftNetError::Address {
                    addr: self.node.addr.clone(),
                    reason: e.to_string(),
                }))
            }
        };
        let data = encode(req).map_err(|e| match e {
            RaftNetError::TooLarge(_) => CallError::TooLarge(e),
            e => CallError::Network(e),
        })?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        let epoch = self.epoch.as_ref().map(EpochCell::get).unwrap_or_default();
        let mut request = Request::new(RaftMessage {
            data,
            epoch: epoch.number,
            epoch_id: epoch.id,
        });
        request.set_timeout(ttl);
        let fut = async {
            match method {
                Method::AppendEntries => client.append_entries(request).await,
                Method::Vote => client.vote(request).await,
                Method::InstallSnapshot => client.install_snapshot(request).await,
            }
        };
        let resp = match tokio::time::timeout(ttl, fut).await {
            Err(_) => return Err(CallError::Timeout),
            Ok(Err(status)) => {
                // Refused for another raft group epoch: back off (a later one also marks this
                // manager as superseded, and its daemon stops it being a manager).
                if note_refusal(self.epoch.as_ref(), &self.node.addr, &status) {
                    return Err(CallError::Unreachable(RaftNetError::Status(status)));
                }
                return Err(match status.code() {
                    Code::DeadlineExceeded | Code::Cancelled => CallError::Timeout,
                    // Transport down, peer refusing us (removed, no longer a manager), peer
                    // overloaded or refusing the size: back off rather than hammer it.
                    Code::Unavailable
                    | Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::ResourceExhausted
                    | Code::Unknown => CallError::Unreachable(RaftNetError::Status(status)),
                    _ => CallError::Network(RaftNetError::Status(status)),
                });
            }
            Ok(Ok(resp)) => resp.into_inner(),
        };
        decode(&resp.data).map_err(CallError::Network)
    }

    /// openraft's view of a call's outcome.
    // The error type is openraft's, returned as the trait requires.
    #[allow(clippy::result_large_err)]
    fn finish<Resp, E: std::error::Error>(
        &self,
        method: Method,
        ttl: Duration,
        outcome: Result<Result<Resp, RaftError<NodeId, E>>, CallError>,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>> {
        match outcome {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))),
            Err(CallError::Timeout) => Err(RPCError::Timeout(Timeout {
                action: method.rpc_type(),
                id: self.self_id,
                target: self.target,
                timeout: ttl,
            })),
            // Too large and not splittable here (a single huge entry, an oversized snapshot
            // chunk) can never be sent: report the peer unreachable so openraft backs off
            // instead of retrying at once.
            Err(CallError::TooLarge(e)) => {
                tracing::warn!(target = self.target, "{e}");
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(CallError::Unreachable(e)) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(CallError::Network(e)) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let entries = rpc.entries.len() as u64;
        let ttl = option.hard_ttl();
        match self.call(Method::AppendEntries, &rpc, ttl).await {
            Err(CallError::TooLarge(e)) if entries > 1 => {
                // openraft resends with at most this many entries.
                Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(entries / 2).with_source_error(&e),
                ))
            }
            // openraft resends a timed-out append whole, so a follower that cannot take that
            // many entries within the deadline (a loaded host) would never catch up: it gets
            // half as many at once instead (openraft keeps the hint for its next 10 appends).
            Err(CallError::Timeout) if entries > 1 => Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(entries / 2),
            )),
            outcome => self.finish(Method::AppendEntries, ttl, outcome),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let ttl = option.hard_ttl();
        let outcome = self.call(Method::InstallSnapshot, &rpc, ttl).await;
        self.finish(Method::InstallSnapshot, ttl, outcome)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        let outcome = self
            .call::<_, VoteResponse, openraft::error::Infallible>(Method::Vote, &rpc, ttl)
            .await;
        if let (Some(c), Ok(Ok(resp))) = (&self.contact, &outcome) {
            if !resp.vote_granted && resp.last_log_id > rpc.last_log_id {
                c.saw_longer_log();
            }
        }
        self.finish(Method::Vote, ttl, outcome)
    }

    fn backoff(&self) -> Backoff {
        let last = UNREACHABLE_BACKOFF_MS[UNREACHABLE_BACKOFF_MS.len() - 1];
        Backoff::new(
            UNREACHABLE_BACKOFF_MS
                .into_iter()
                .chain(std::iter::repeat(last))
                .map(Duration::from_millis),
        )
    }
}

/// The `Raft` gRPC service: hands peers' requests to the local Raft node. Every method
/// needs a manager certificate of this cluster whose node has not been removed.
pub struct RaftService {
    raft: Raft,
    authorizer: Authorizer,
    contact: Option<LeaderContact>,
    epoch: Option<EpochCell>,
}

impl RaftService {
    /// Serves `raft`, admitting peers through `authorizer`.
    pub fn new(raft: Raft, authorizer: Authorizer) -> RaftService {
        RaftService {
            raft,
            authorizer,
            contact: None,
            epoch: None,
        }
    }

    /// Serves only requests of the raft group epoch in `epoch` (a manager with no Raft state
    /// yet takes the first one it hears); see `epoch.rs`. Without it every epoch is served.
    pub fn with_epoch(mut self, epoch: EpochCell) -> RaftService {
        self.epoch = Some(epoch);
        self
    }

    /// Admits a request of epoch `(number, id)`, or refuses it with our epoch in
    /// [`EPOCH_HEADER`].
    async fn check_epoch(&self, number: u64, id: u64) -> Result<(), Status> {
        let Some(cell) = &self.epoch else {
            return Ok(());
        };
        let theirs = Epoch { number, id };
        let mine = cell.get();
        let fresh = !cell.recorded() && {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.last_log_index.is_none() && m.last_applied.is_none()
        };
        let why = match judge(mine, fresh, theirs) {
            Verdict::Accept => return Ok(()),
            Verdict::Adopt => {
                return cell.adopt(theirs).await.map_err(|e| {
                    Status::unavailable(format!("recording the raft group epoch: {e}"))
                })
            }
            Verdict::SenderStale => stale_text(theirs, mine),
            Verdict::ReceiverStale => {
                tracing::warn!(%mine, %theirs, "refused a raft request of a later group epoch");
                format!(
                    "this manager is of raft group epoch {mine}, older than the sender's {theirs}"
                )
            }
            Verdict::Diverged => {
                tracing::error!(%mine, %theirs, "refused a raft request of another start-over of this group");
                format!("raft group epoch {theirs} is another start-over of this group than this manager's {mine}")
            }
        };
        Err(epoch_refusal(mine, why))
    }

    /// Stamps `contact` for the election driver whenever a leader's append or snapshot is
    /// accepted, or a vote request comes from a candidate whose log is at least as complete as
    /// ours (it can win: give it a round before competing, as Raft resets its timer on a vote).
    pub fn with_contact(mut self, contact: LeaderContact) -> RaftService {
        self.contact = Some(contact);
        self
    }

    fn heard(&self) {
        if let Some(c) = &self.contact {
            c.touch();
        }
    }

    /// The tonic service, with messages bounded by [`MAX_RAFT_MESSAGE_BYTES`] both ways.
    pub fn into_server(self) -> RaftServer<RaftService> {
        RaftServer::new(self)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
    }

    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.authorizer.authorize(req, &[Role::Manager]).map(|_| ())
    }

    /// [`RaftService::admit`], then [`RaftService::check_epoch`]. A caller refused by the
    /// first (a manager of a replaced group whose node was since removed, say) is still told
    /// when its epoch is older than ours, so that it stops being a manager.
    async fn admit_epoch<T>(&self, req: &Request<T>, number: u64, id: u64) -> Result<(), Status> {
        if let Err(refused) = self.admit(req) {
            if let Some(cell) = &self.epoch {
                let mine = cell.get();
                if judge(mine, false, Epoch { number, id }) == Verdict::SenderStale {
                    return Err(epoch_refusal(mine, stale_text(Epoch { number, id }, mine)));
                }
            }
            return Err(refused);
        }
        self.check_epoch(number, id).await
    }
}

fn stale_text(theirs: Epoch, mine: Epoch) -> String {
    format!(
        "raft group epoch {theirs} was replaced by {mine} (cluster init --force-new-cluster or cluster restore): the sender is no longer a manager of this cluster"
    )
}

/// A refusal for another epoch, carrying ours in [`EPOCH_HEADER`].
fn epoch_refusal(mine: Epoch, why: String) -> Status {
    let mut status = Status::failed_precondition(why);
    if let Ok(v) = mine.to_header().parse() {
        status.metadata_mut().insert(EPOCH_HEADER, v);
    }
    status
}

fn bad_request(e: RaftNetError) -> Status {
    Status::invalid_argument(format!("malformed raft message: {e}"))
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftMessage>, Status> {
    let data = encode(result).map_err(|e| Status::resource_exhausted(e.to_string()))?;
    Ok(Response::new(RaftMessage {
        data,
        ..Default::default()
    }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let m = req.get_ref();
        self.admit_epoch(&req, m.epoch, m.epoch_id).await?;
        let rpc: AppendEntriesRequest = decode(&m.data).map_err(bad_request)?;
        let result = self.raft.append_entries(rpc).await;
        // A deposed leader's appends are refused with our higher vote: not a leader heard.
        if matches!(&result, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.heard();
        }
        reply(&result)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = req.get_ref();
        self.admit_epoch(&req, m.epoch, m.epoch_id).await?;
        let rpc: VoteRequest = decode(&m.data).map_err(bad_request)?;
        let candidate_log = rpc.last_log_id;
        let result = self.raft.vote(rpc).await;
        // A candidate behind us cannot win (we refuse it, and so will others as complete as
        // us): competing with it is not delayed.
        if matches!(&result, Ok(r) if r.vote_granted || candidate_log >= r.last_log_id) {
            self.heard();
        }
        reply(&result)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let m = req.get_ref();
        self.admit_epoch(&req, m.epoch, m.epoch_id).await?;
        let rpc: InstallSnapshotRequest = decode(&m.data).map_err(bad_request)?;
        let leader_vote = rpc.vote;
        let result = self.raft.install_snapshot(rpc).await;
        if matches!(&result, Ok(r) if r.vote <= leader_vote) {
            self.heard();
        }
        reply(&result)
    }

    async fn leader_ping(
        &self,
        req: Request<LeaderPingRequest>,
    ) -> Result<Response<LeaderPingResponse>, Status> {
        self.admit_epoch(&req, req.get_ref().epoch, req.get_ref().epoch_id)
            .await?;
        let ping = req.into_inner();
        let (term, leader) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.current_term, m.current_leader)
        };
        // Only the leader this node knows for its term, or one of a later term it has not
        // heard of yet, keeps its elections off; a deposed leader's beacon counts for nothing.
        if ping.term > term || (ping.term == term && leader == Some(ping.leader_id)) {
            self.heard();
        }
        Ok(Response::new(LeaderPingResponse { term }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::typ::Entry;
    use crate::store::{Command, Mutation, Object};

    #[test]
    fn requests_and_responses_survive_the_wire_encoding() {
        let service = shoal_proto::v1::Service {
            meta: Some(shoal_proto::v1::Meta {
                id: "s1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let entry = Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 7),
            payload: openraft::EntryPayload::Normal(Command {
                now_ms: 5,
                mutations: vec![Mutation::Create(Object::Service(service))],
            }),
        };
        let req = AppendEntriesRequest {
            vote: openraft::Vote::new_committed(3, 1),
            prev_log_id: None,
            entries: vec![entry],
            leader_commit: None,
        };
        let back: AppendEntriesRequest = decode(&encode(&req).unwrap()).unwrap();
        assert_eq!(back.entries.len(), 1);
        assert_eq!(format!("{back:?}"), format!("{req:?}"));

        let resp: Result<AppendEntriesResponse, RaftError<NodeId>> =
            Ok(AppendEntriesResponse::Success);
        let back: Result<AppendEntriesResponse, RaftError<NodeId>> =
            decode(&encode(&resp).unwrap()).unwrap();
        assert_eq!(back, resp);
    }
}
