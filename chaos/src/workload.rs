//! Concurrent clients that create, update, scale, remove and read services with unique
//! names through the managers' sockets, recording every call (start, end, outcome).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_chaos::history::{Call, Kind, Outcome};
use shoal_chaos::lincheck::SpecValue;
use shoal_proto::v1 as pb;
use shoal_proto::v1::service_spec::Mode;
use tonic::Code;

use crate::cluster::{control, IMAGE};

/// How long one recorded call may take before it counts as unanswered.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between one client's calls.
pub const THINK_TIME: Duration = Duration::from_millis(300);
/// Services the workload keeps alive at most (each client adds while below).
pub const MAX_LIVE_SERVICES: usize = 6;
/// Replicas a service is given at most.
pub const MAX_REPLICAS: u64 = 2;
/// The label holding the write token.
pub const TOKEN_LABEL: &str = "chaos.token";
/// Calls recorded at most (a bound on memory; the run stops recording beyond it).
pub const MAX_CALLS: usize = 200_000;

/// State shared by the clients and the harness.
pub struct Shared {
    pub epoch: Instant,
    pub run_id: String,
    pub calls: Mutex<Vec<Call>>,
    /// Names that may exist (created and not known removed).
    pub pool: Mutex<Vec<String>>,
    /// Every name ever used.
    pub names: Mutex<Vec<String>>,
    pub stop: AtomicBool,
    next_token: AtomicU64,
    next_call: AtomicU64,
    next_name: AtomicU64,
    /// Sockets of the managers' hosts (name, path).
    pub managers: Vec<(String, PathBuf)>,
    /// The cluster network every service joins (its id).
    pub network: String,
}

impl Shared {
    pub fn new(run_id: String, managers: Vec<(String, PathBuf)>, network: String) -> Shared {
        Shared {
            epoch: Instant::now(),
            run_id,
            calls: Mutex::new(Vec::new()),
            pool: Mutex::new(Vec::new()),
            names: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            next_token: AtomicU64::new(1),
            next_call: AtomicU64::new(1),
            next_name: AtomicU64::new(1),
            managers,
            network,
        }
    }

    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    fn record(&self, c: Call) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if calls.len() < MAX_CALLS {
            calls.push(c);
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The value a service's spec holds for the register model.
pub fn value_of(s: &pb::Service) -> Option<SpecValue> {
    let spec = s.spec.as_ref()?;
    let token = spec.labels.get(TOKEN_LABEL)?.parse().ok()?;
    let replicas = match &spec.mode {
        Some(Mode::Replicated(r)) => r.replicas,
        _ => return None,
    };
    Some(SpecValue { token, replicas })
}

fn new_spec(name: &str, v: SpecValue, network: &str) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: name.to_string(),
        labels: HashMap::from([(TOKEN_LABEL.to_string(), v.token.to_string())]),
        task: Some(pb::TaskSpec {
            container: Some(pb::ContainerSpec {
                image: IMAGE.to_string(),
                command: vec!["sleep".into(), "3600".into()],
                stop_grace_period_ms: 1000,
                ..Default::default()
            }),
            restart: Some(pb::RestartPolicy {
                condition: pb::RestartCondition::Any as i32,
                delay_ms: 1000,
                max_attempts: 0,
                window_ms: 0,
            }),
            networks: vec![network.to_string()],
            ..Default::default()
        }),
        mode: Some(Mode::Replicated(pb::ReplicatedService {
            replicas: v.replicas,
        })),
        ..Default::default()
    }
}

fn with_value(mut spec: pb::ServiceSpec, v: SpecValue) -> pb::ServiceSpec {
    spec.labels
        .insert(TOKEN_LABEL.to_string(), v.token.to_string());
    spec.mode = Some(Mode::Replicated(pb::ReplicatedService {
        replicas: v.replicas,
    }));
    spec
}

/// How a failed call ended: which codes say the call had no effect, which say what the state
/// was, and which leave it open.
fn classify(kind: Kind, st: &tonic::Status) -> Outcome {
    let msg = format!("{:?}: {}", st.code(), st.message());
    match st.code() {
        Code::AlreadyExists if kind == Kind::Create => Outcome::Exists,
        Code::NotFound if kind != Kind::Create => Outcome::Missing,
        Code::FailedPrecondition | Code::InvalidArgument => Outcome::Refused(msg),
        _ => Outcome::Unknown(msg),
    }
}

enum Answer<T> {
    Ok(T),
    Failed(Outcome),
}

/// Makes one call through `sock` with the bounds above.
async fn call<T, F, Fut>(kind: Kind, sock: &std::path::Path, f: F) -> Answer<T>
where
    F: FnOnce(pb::control_client::ControlClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let c = match control(sock).await {
        Ok(c) => c,
        Err(e) => return Answer::Failed(Outcome::Refused(format!("not sent: {e}"))),
    };
    match tokio::time::timeout(OP_TIMEOUT, f(c)).await {
        Ok(Ok(r)) => Answer::Ok(r.into_inner()),
        Ok(Err(st)) => Answer::Failed(classify(kind, &st)),
        Err(_) => Answer::Failed(Outcome::Unknown(format!(
            "no answer in {} s",
            OP_TIMEOUT.as_secs()
        ))),
    }
}

struct Client {
    id: usize,
    shared: Arc<Shared>,
    rng: rand::rngs::StdRng,
}

impl Client {
    fn via(&mut self) -> (String, PathBuf) {
        self.shared
            .managers
            .choose(&mut self.rng)
            .cloned()
            .unwrap_or_default()
    }

    fn begin(&self, service: &str, kind: Kind, via: &str) -> Call {
        Call {
            id: self.shared.next_call.fetch_add(1, Ordering::Relaxed),
            client: self.id,
            service: service.to_string(),
            kind,
            via: via.to_string(),
            start_us: self.shared.now_us(),
            end_us: 0,
            value: None,
            old: None,
            outcome: Outcome::Unknown(String::new()),
        }
    }

    fn finish(&self, mut c: Call, outcome: Outcome) -> Outcome {
        c.end_us = self.shared.now_us();
        c.outcome = outcome.clone();
        self.shared.record(c);
        outcome
    }

    async fn create(&mut self) {
        let n = self.shared.next_name.fetch_add(1, Ordering::Relaxed);
        let name = format!("chaos-{}-{n}", self.shared.run_id);
        let v = SpecValue {
            token: self.shared.token(),
            replicas: self.rng.gen_range(0..=MAX_REPLICAS),
        };
        self.shared
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        // In the pool before the call: a create without answer may exist.
        self.shared.pool().push(name.clone());
        let (host, sock) = self.via();
        let mut c = self.begin(&name, Kind::Create, &host);
        c.value = Some(v);
        let spec = new_spec(&name, v, &self.shared.network);
        let out = match call(Kind::Create, &sock, |mut cl| async move {
            cl.create_service(pb::CreateServiceRequest {
                spec: Some(spec),
                ..Default::default()
            })
            .await
        })
        .await
        {
            Answer::Ok(_) => Outcome::Ok,
            Answer::Failed(o) => o,
        };
        if let Outcome::Refused(_) = self.finish(c, out) {
            self.shared.pool().retain(|n| *n != name);
        }
    }

    /// Reads `name`; records the read. Returns the service if found.
    async fn read(&mut self, name: &str) -> Option<pb::Service> {
        self.read_full(name).await.1
    }

    /// Reads `name`; records the read. Returns how it ended and the service if found.
    async fn read_full(&mut self, name: &str) -> (Outcome, Option<pb::Service>) {
        let (host, sock) = self.via();
        let c = self.begin(name, Kind::Read, &host);
        let req = pb::GetServiceRequest {
            service: name.to_string(),
        };
        let (out, svc) = match call(Kind::Read, &sock, |mut cl| async move {
            cl.get_service(req).await
        })
        .await
        {
            Answer::Ok(r) => {
                let s = r.service;
                (Outcome::Read(s.as_ref().and_then(value_of)), s)
            }
            Answer::Failed(Outcome::Missing) => (Outcome::Read(None), None),
            Answer::Failed(o) => (o, None),
        };
        (self.finish(c, out), svc)
    }

    /// Reads, then writes a new value naming the version read (an update changes the token,
    /// a scale the replicas).
    async fn update(&mut self, name: &str, kind: Kind) {
        let Some(s) = self.read(name).await else {
            return;
        };
        let (Some(old), Some(spec), Some(meta)) = (value_of(&s), s.spec.clone(), s.meta.clone())
        else {
            return;
        };
        let new = match kind {
            Kind::Scale => {
                let r = (old.replicas + self.rng.gen_range(1..=MAX_REPLICAS)) % (MAX_REPLICAS + 1);
                SpecValue {
                    token: old.token,
                    replicas: r,
                }
            }
            _ => SpecValue {
                token: self.shared.token(),
                replicas: old.replicas,
            },
        };
        let (host, sock) = self.via();
        let mut c = self.begin(name, kind, &host);
        c.value = Some(new);
        c.old = Some(old);
        let req = pb::UpdateServiceRequest {
            service: name.to_string(),
            version: meta.version,
            spec: Some(with_value(spec, new)),
            ..Default::default()
        };
        let out = match call(
            kind,
            &sock,
            |mut cl| async move { cl.update_service(req).await },
        )
        .await
        {
            Answer::Ok(_) => Outcome::Ok,
            Answer::Failed(o) => o,
        };
        self.finish(c, out);
    }

    async fn remove(&mut self, name: &str) {
        let (host, sock) = self.via();
        let c = self.begin(name, Kind::Remove, &host);
        let req = pb::RemoveServiceRequest {
            service: name.to_string(),
        };
        let out = match call(Kind::Remove, &sock, |mut cl| async move {
            cl.remove_service(req).await
        })
        .await
        {
            Answer::Ok(_) => Outcome::Ok,
            Answer::Failed(o) => o,
        };
        if matches!(self.finish(c, out), Outcome::Ok | Outcome::Missing) {
            self.shared.pool().retain(|n| n != name);
        }
    }

    async fn run(mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            let pool: Vec<String> = self.shared.pool().clone();
            let roll = self.rng.gen_range(0..100);
            let pick = pool.choose(&mut self.rng).cloned();
            match (roll, pick) {
                (_, None) => self.create().await,
                (0..=14, _) if pool.len() < MAX_LIVE_SERVICES => self.create().await,
                (0..=14, Some(n)) | (85..=99, Some(n)) => {
                    // Removing only once there are enough: keeps the pool busy.
                    if pool.len() > MAX_LIVE_SERVICES / 2 {
                        self.remove(&n).await
                    } else {
                        self.read(&n).await.map(drop).unwrap_or(())
                    }
                }
                (15..=44, Some(n)) => self.update(&n, Kind::Update).await,
                (45..=59, Some(n)) => self.update(&n, Kind::Scale).await,
                (_, Some(n)) => self.read(&n).await.map(drop).unwrap_or(()),
            }
            tokio::time::sleep(THINK_TIME).await;
        }
    }
}

/// Starts `n` clients; they run until `shared.stop` is set.
pub fn spawn_clients(
    rt: &tokio::runtime::Handle,
    shared: &Arc<Shared>,
    n: usize,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|id| {
            let c = Client {
                id,
                shared: shared.clone(),
                rng: rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(id as u64)),
            };
            rt.spawn(c.run())
        })
        .collect()
}

/// Reads every name ever used with one linearizable `ListServices` (through any manager that
/// answers, retrying up to `timeout`) and records it as a read of each name (same start and
/// end: one store state); returns each one's value, and the names left unread.
pub async fn final_reads(
    shared: &Arc<Shared>,
    timeout: Duration,
) -> (
    std::collections::BTreeMap<String, Option<SpecValue>>,
    Vec<String>,
) {
    let names = shared
        .names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let deadline = Instant::now() + timeout;
    let prefix = format!("chaos-{}-", shared.run_id);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    while Instant::now() < deadline {
        let Some((host, sock)) = shared.managers.choose(&mut rng).cloned() else {
            break;
        };
        let start_us = shared.now_us();
        let req = pb::ListServicesRequest {
            name_prefix: prefix.clone(),
            ..Default::default()
        };
        let Answer::Ok(list) = call(Kind::Read, &sock, |mut cl| async move {
            cl.list_services(req).await
        })
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let end_us = shared.now_us();
        let found: std::collections::HashMap<String, Option<SpecValue>> = list
            .services
            .iter()
            .filter_map(|sum| sum.service.as_ref())
            .filter_map(|s| Some((s.spec.as_ref()?.name.clone(), value_of(s))))
            .collect();
        let mut finals = std::collections::BTreeMap::new();
        for name in names {
            let v = found.get(&name).copied().flatten();
            shared.record(Call {
                id: shared.next_call.fetch_add(1, Ordering::Relaxed),
                client: usize::MAX,
                service: name.clone(),
                kind: Kind::Read,
                via: host.clone(),
                start_us,
                end_us,
                value: None,
                old: None,
                outcome: Outcome::Read(v),
            });
            finals.insert(name, v);
        }
        return (finals, Vec::new());
    }
    (std::collections::BTreeMap::new(), names)
}
