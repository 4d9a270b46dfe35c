//! The agent's side of the dispatcher session: connect to a manager (mTLS with the node's
//! certificate), follow redirects to the leader, heartbeat, hand assignments to the agent, and
//! reconnect with bounded exponential backoff and jitter to any known manager.
//!
//! Reconnecting is raced against the dispatcher's grace: a new leader marks every node DOWN
//! that has not opened a session with it within `missed_heartbeats_down` heartbeat periods
//! (3 s by default), and its tasks are then replaced elsewhere. So ([`Reconnect`]) a leader
//! named by a redirect is tried at once (after a backoff when the last attempt already
//! followed one: two managers naming each other while an election settles),
//! and the backoff never grows beyond one heartbeat period (the last one a dispatcher gave, 1 s
//! before any), so a node that can reach the new leader gets there within its grace.

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A follower named the leader (empty while none is known).
    Redirect(String),
    /// A session ran (with this heartbeat period) and then broke.
    Ended(Duration),
    /// No session could be opened.
    Failed(String),
}

/// The delay before reconnect attempt `attempt` (1-based): exponential, capped, with jitter
/// over its upper half so that a manager's nodes do not all come back at once.
pub fn backoff(attempt: u32) -> Duration {
    backoff_capped(attempt, RECONNECT_MAX)
}

/// [`backoff`] with a lower cap.
pub fn backoff_capped(attempt: u32, cap: Duration) -> Duration {
    let exp = RECONNECT_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let d = exp.min(RECONNECT_MAX).min(cap);
    let half = d / 2;
    half + Duration::from_millis(rand::thread_rng().gen_range(0..=half.as_millis() as u64))
}

/// Where the next session attempt goes and how long to wait before it (see the module doc).
#[derive(Debug)]
pub(crate) struct Reconnect {
    /// Failed attempts since the last session that ran.
    attempt: u32,
    /// The last attempt went to a leader named by a redirect.
    followed: bool,
    /// Longest wait: the last heartbeat period a dispatcher gave (capped by RECONNECT_MAX).
    cap: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            attempt: 0,
            followed: false,
            cap: shoal_manager::dispatcher::DEFAULT_HEARTBEAT_PERIOD.min(RECONNECT_MAX),
        }
    }
}

impl Reconnect {
    /// After an attempt at `addr` ended with `outcome`: the address to try next (`None`: the
    /// next known manager in turn) and the wait before it.
    pub(crate) fn after(&mut self, addr: &str, outcome: &Outcome) -> (Option<String>, Duration) {
        match outcome {
            Outcome::Ended(period) => {
                self.attempt = 0;
                self.followed = false;
                if !period.is_zero() {
                    self.cap = (*period).min(RECONNECT_MAX);
                }
                (None, Duration::ZERO)
            }
            Outcome::Redirect(leader) if !leader.is_empty() && leader != addr => {
                self.attempt = self.attempt.saturating_add(1);
                // Straight there, unless the last attempt already followed a redirect (two
                // managers that name each other while an election settles).
                let wait = if self.followed {
                    backoff_capped(self.attempt, self.cap)
                } else {
                    Duration::ZERO
                };
                self.followed = true;
                (Some(leader.clone()), wait)
            }
            Outcome::Redirect(_) | Outcome::Failed(_) => {
                self.attempt = self.attempt.saturating_add(1);
                self.followed = false;
                (None, backoff_capped(self.attempt, self.cap))
            }
        }
    }
}

/// Keeps a session open for the agent's lifetime.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut policy = Reconnect::default();
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
        let outcome = session(&shared, &addr).await;
        match &outcome {
            Outcome::Ended(_) => {}
            Outcome::Redirect(leader) => {
                tracing::debug!(%addr, %leader, "redirected to the leader")
            }
            Outcome::Failed(e) => tracing::debug!(%addr, "session failed: {e}"),
        }
        shared.link.send_replace(None);
        let (to, wait) = policy.after(&addr, &outcome);
        next = to;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
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
                Ok(Some(pb::SessionMessage { kind: Some(Kind::Logs(sub)) })) => crate::logs::start(
                    shared,
                    client.clone(),
                    started.session_id.clone(),
                    sub,
                ),
                Ok(Some(_)) => {}
                Ok(None) => return Outcome::Ended(period),
                Err(e) => {
                    tracing::debug!("session stream broke: {}", e.message());
                    return Outcome::Ended(period);
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
                        return Outcome::Ended(period);
                    }
                    Err(_) => return Outcome::Ended(period),
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

#[cfg(test)]
mod tests {
    use super::*;

    const M1: &str = "10.0.0.1:4242";
    const M2: &str = "10.0.0.2:4242";

    fn failed() -> Outcome {
        Outcome::Failed("Connection refused".into())
    }

    #[test]
    fn a_named_leader_is_tried_at_once_after_any_number_of_failures() {
        let mut p = Reconnect::default();
        for _ in 0..10 {
            let (to, wait) = p.after(M1, &failed());
            assert_eq!(to, None);
            assert!(wait > Duration::ZERO);
        }
        let (to, wait) = p.after(M1, &Outcome::Redirect(M2.into()));
        assert_eq!(to.as_deref(), Some(M2));
        assert_eq!(wait, Duration::ZERO);
    }

    #[test]
    fn redirects_in_a_row_back_off_but_keep_the_named_leader() {
        let mut p = Reconnect::default();
        assert_eq!(
            p.after(M1, &Outcome::Redirect(M2.into())),
            (Some(M2.to_string()), Duration::ZERO)
        );
        let (to, wait) = p.after(M2, &Outcome::Redirect(M1.into()));
        assert_eq!(to.as_deref(), Some(M1));
        assert!(wait > Duration::ZERO);
        // A failure in between: the next named leader is tried at once again.
        p.after(M1, &failed());
        assert_eq!(
            p.after(M1, &Outcome::Redirect(M2.into())),
            (Some(M2.to_string()), Duration::ZERO)
        );
    }

    #[test]
    fn a_redirect_naming_no_leader_or_itself_waits_and_moves_on() {
        let mut p = Reconnect::default();
        let (to, wait) = p.after(M1, &Outcome::Redirect(String::new()));
        assert_eq!(to, None);
        assert!(wait > Duration::ZERO);
        let (to, wait) = p.after(M1, &Outcome::Redirect(M1.into()));
        assert_eq!(to, None);
        assert!(wait > Duration::ZERO);
    }

    #[test]
    fn the_wait_never_exceeds_the_last_heartbeat_period() {
        let mut p = Reconnect::default();
        // Before any session: the default period.
        for _ in 0..20 {
            let (_, wait) = p.after(M1, &failed());
            assert!(wait <= shoal_manager::dispatcher::DEFAULT_HEARTBEAT_PERIOD);
        }
        // A session that ran with a 200 ms period: reconnect at once, then waits ≤ 200 ms.
        assert_eq!(
            p.after(M1, &Outcome::Ended(Duration::from_millis(200))),
            (None, Duration::ZERO)
        );
        let mut longest = Duration::ZERO;
        for _ in 0..20 {
            let (_, wait) = p.after(M1, &failed());
            longest = longest.max(wait);
        }
        assert!(longest <= Duration::from_millis(200), "{longest:?}");
        assert!(longest >= Duration::from_millis(100), "{longest:?}");
        // A long period never lifts the cap above RECONNECT_MAX.
        p.after(M1, &Outcome::Ended(Duration::from_secs(60)));
        for _ in 0..20 {
            let (_, wait) = p.after(M1, &failed());
            assert!(wait <= RECONNECT_MAX);
        }
    }
}
