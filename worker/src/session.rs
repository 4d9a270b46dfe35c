//! The agent's side of the dispatcher session: connect to a manager (mTLS with the node's
//! certificate), follow redirects to the leader, heartbeat, hand assignments to the agent, and
//! reconnect with bounded exponential backoff and jitter to any known manager.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use shoal_proto::v1 as pb;
use shoal_proto::v1::dispatcher_client::DispatcherClient;
use shoal_proto::v1::session_message::Kind;

use crate::agent::{lock, Link, Shared};

/// First reconnect delay; doubled per failed attempt.
pub const RECONNECT_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long connecting and receiving the session's first message may take.
pub const SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message accepted from the dispatcher (a full set of a node's tasks).
pub const MAX_SESSION_MESSAGE_BYTES: usize =
    shoal_manager::dispatcher::MAX_DISPATCHER_MESSAGE_BYTES;

/// How a session attempt ended.
enum Outcome {
    /// A follower named the leader (empty while none is known).
    Redirect(String),
    /// A session ran and then broke.
    Ended,
    /// No session could be opened.
    Failed(String),
}

/// The delay before reconnect attempt `attempt` (1-based): exponential, capped, with jitter
/// over its upper half so that a manager's nodes do not all come back at once.
pub fn backoff(attempt: u32) -> Duration {
    let exp = RECONNECT_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let d = exp.min(RECONNECT_MAX);
    let half = d / 2;
    half + Duration::from_millis(rand::thread_rng().gen_range(0..=half.as_millis() as u64))
}

/// Keeps a session open for the agent's lifetime.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut attempt: u32 = 0;
    let mut next: Option<String> = None;
    let mut round_robin = 0usize;
    loop {
        let addr = match next.take() {
            Some(a) => a,
            None => {
                let m = lock(&shared.managers).clone();
                if m.is_empty() {
                    tracing::error!("no manager address known");
                    return;
                }
                round_robin = round_robin.wrapping_add(1);
                m[round_robin % m.len()].clone()
            }
        };
        match session(&shared, &addr).await {
            Outcome::Ended => attempt = 0,
            Outcome::Redirect(leader) => {
                tracing::debug!(%addr, %leader, "redirected to the leader");
                if !leader.is_empty() && leader != addr {
                    next = Some(leader);
                }
                attempt = attempt.saturating_add(1);
            }
            Outcome::Failed(e) => {
                tracing::debug!(%addr, "session failed: {e}");
                attempt = attempt.saturating_add(1);
            }
        }
        shared.link.send_replace(None);
        if attempt > 0 {
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
}

async fn session(shared: &Arc<Shared>, addr: &str) -> Outcome {
    let channel = match shared.tls.channel(addr) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let mut client = DispatcherClient::new(channel)
        .max_decoding_message_size(MAX_SESSION_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_SESSION_MESSAGE_BYTES);
    let open = async {
        let mut stream = client
            .session(pb::SessionRequest {
                description: Some(shared.description.clone()),
            })
            .await?
            .into_inner();
        let first = stream.message().await?;
        Ok::<_, tonic::Status>((stream, first))
    };
    let (mut stream, first) = match tokio::time::timeout(SESSION_OPEN_TIMEOUT, open).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Outcome::Failed(format!("{}: {}", e.code(), e.message())),
        Err(_) => return Outcome::Failed("timed out opening the session".into()),
    };
    let started = match first.and_then(|m| m.kind) {
        Some(Kind::Started(s)) => s,
        Some(Kind::Redirect(r)) => {
            learn_managers(shared, addr, r.managers);
            return Outcome::Redirect(r.leader_addr);
        }
        _ => return Outcome::Failed("the session did not start".into()),
    };
    learn_managers(shared, addr, started.managers.clone());
    tracing::info!(%addr, node_id = %started.node_id, "session started");
    tell_desired_role(shared, started.desired_role);
    shared.link.send_replace(Some(Link {
        client: client.clone(),
        session_id: started.session_id.clone(),
    }));
    shared.resend_all();

    let mut period = Duration::from_millis(started.heartbeat_period_ms.max(1));
    let mut next_beat = tokio::time::Instant::now() + period;
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(pb::SessionMessage { kind: Some(Kind::Assignments(a)) })) => shared.apply(a),
                Ok(Some(_)) => {}
                Ok(None) => return Outcome::Ended,
                Err(e) => {
                    tracing::debug!("session stream broke: {}", e.message());
                    return Outcome::Ended;
                }
            },
            _ = tokio::time::sleep_until(next_beat) => {
                let req = pb::HeartbeatRequest { session_id: started.session_id.clone() };
                match tokio::time::timeout(period, client.heartbeat(req)).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        tell_desired_role(shared, r.desired_role);
                        period = Duration::from_millis(r.heartbeat_period_ms.max(1));
                        next_beat = tokio::time::Instant::now() + period;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!("heartbeat refused: {}", e.message());
                        return Outcome::Ended;
                    }
                    Err(_) => return Outcome::Ended,
                }
            }
        }
    }
}

/// Remembers the managers a dispatcher named, keeping the one that answered.
fn learn_managers(shared: &Shared, addr: &str, mut managers: Vec<String>) {
    if managers.is_empty() {
        return;
    }
    if !managers.iter().any(|m| m == addr) {
        managers.push(addr.to_string());
    }
    *lock(&shared.managers) = managers;
}

/// Passes the role the dispatcher says the node should hold to whoever asked for it.
fn tell_desired_role(shared: &Shared, role: Option<i32>) {
    let (Some(hook), Some(role)) = (&shared.on_desired_role, role) else {
        return;
    };
    match pb::NodeRole::try_from(role) {
        Ok(r) => {
            let managers = lock(&shared.managers).clone();
            hook(r, &managers);
        }
        Err(_) => tracing::warn!(role, "the dispatcher named an unknown role"),
    }
}
