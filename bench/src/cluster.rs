//! Cluster benchmarks of issue 3, each side by side with a 3-member etcd in the same run:
//! the control API's write path, leader failover, and a manager's memory. shoal runs as 3
//! `shoal agent` processes on 127.0.0.1 (init on one, the others join with the manager token);
//! clients talk gRPC to a daemon's local Unix socket, as the CLI does, and to one etcd
//! member's client port, as etcd's client does. Every process is started here and killed by
//! pid (when its handle is dropped, so on errors too); all traffic stays on 127.0.0.1.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

use shoal_tests::cluster::{ClusterBuilder, Launch, Loopback, Member};

use crate::etcd::Etcd;
use crate::stats::{ms, percentile};

/// How long starting a cluster (or one member) may take.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a restarted member may take to rejoin and the cluster to be whole again.
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one request may take before the client gives it up.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one write may take during a failover before the client tries again: short, so
/// that the measured time is not a multiple of a long client timeout (both sides alike).
pub const FAILOVER_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);
/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed request before the next one (both sides alike).
pub const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// How long a failover may take before the trial is declared failed.
pub const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
/// Pause after a rejoin before the next trial, so that a follower that just came back has
/// caught up (both sides alike).
pub const REJOIN_SETTLE: Duration = Duration::from_secs(1);
/// Pause before memory is read, so that start-up or load work has finished.
pub const MEMORY_SETTLE: Duration = Duration::from_secs(3);
/// Most concurrent clients.
pub const MAX_CLIENTS: usize = 256;
/// Longest load phase.
pub const MAX_PHASE: Duration = Duration::from_secs(120);
/// Latency samples kept per client (a phase ends early past it).
pub const MAX_SAMPLES_PER_CLIENT: usize = 1_000_000;
/// Failed requests a client tolerates in a load phase before it stops.
pub const MAX_ERRORS_PER_CLIENT: u64 = 1_000;
/// Version conflicts one update tolerates (re-reading each time) before giving up.
pub const MAX_CONFLICT_RETRIES: usize = 100;
/// Most failover trials per side.
pub const MAX_TRIALS: usize = 200;
/// Most objects the memory benchmark creates.
pub const MAX_OBJECTS: usize = 100_000;
/// How long creating the memory benchmark's objects may take, per side.
pub const CREATE_DEADLINE: Duration = Duration::from_secs(600);
/// Largest value written (shoal refuses labels longer than 4096 bytes).
pub const MAX_VALUE_BYTES: usize = 4096;
/// Members of each cluster.
pub const MEMBERS: usize = 3;

/// What every cluster benchmark is given.
#[derive(clap::Args)]
pub struct Common {
    /// The shoal binary (default: `shoal` beside this benchmark's executable).
    #[arg(long)]
    shoal: Option<PathBuf>,
    /// The etcd server binary (Debian's etcd-server).
    #[arg(long, default_value = "etcd")]
    etcd: String,
    /// Where both clusters keep their data (a fresh directory is made inside; same disk for both).
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
    /// Size of the value each write carries (a service label / an etcd value).
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Raft timers for both sides instead of their defaults, in ms: HEARTBEAT,MIN,MAX
    /// (shoal: election timeout MIN..MAX; etcd: --election-timeout MIN, which it
    /// randomises over MIN..2*MIN).
    #[arg(long, value_delimiter = ',')]
    raft_timers: Option<Vec<u64>>,
}

/// Raft timers in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Timers {
    pub heartbeat: u64,
    pub election_min: u64,
    pub election_max: u64,
}

impl Common {
    fn timers(&self) -> Result<Option<Timers>> {
        match self.raft_timers.as_deref() {
            None => Ok(None),
            Some(&[heartbeat, election_min, election_max])
                if heartbeat > 0 && heartbeat < election_min && election_min <= election_max =>
            {
                Ok(Some(Timers {
                    heartbeat,
                    election_min,
                    election_max,
                }))
            }
            Some(_) => {
                bail!("--raft-timers: expected HEARTBEAT,MIN,MAX with 0 < HEARTBEAT < MIN <= MAX")
            }
        }
    }
}

#[derive(clap::Args)]
pub struct WriteArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent clients, one phase per count (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Length of each phase in seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
}

#[derive(clap::Args)]
pub struct FailoverArgs {
    #[command(flatten)]
    common: Common,
    /// Trials per side (interleaved).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Steady writes to the leader before it is killed, in milliseconds.
    #[arg(long, default_value_t = 500)]
    load_ms: u64,
    /// Print every failed write after a kill (when, and the error).
    #[arg(long)]
    verbose: bool,
}

#[derive(clap::Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    common: Common,
    /// Services (etcd: keys of the same encoded size) to create.
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Concurrent clients creating them.
    #[arg(long, default_value_t = 64)]
    clients: usize,
}

// ---- processes ----

/// A child process, killed by pid (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Starts `cmd`.
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Proc {
            child,
            what: what.to_string(),
        })
    }

    /// Takes charge of a started `child`.
    pub fn adopt(child: Child, what: &str) -> Proc {
        Proc {
            child,
            what: what.to_string(),
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its piped stdout, once.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// `Some(reason)` once it has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!("{} exited: {st}", self.what)),
            Ok(None) => None,
            Err(e) => Some(format!("{}: {e}", self.what)),
        }
    }

    /// SIGKILL by pid, then reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; nothing else here races for it).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Resident, proportional and private memory of a process, in KiB.
#[derive(Default, Clone, Copy, Debug)]
pub struct Mem {
    pub rss: u64,
    pub pss: u64,
    pub private: u64,
}

/// Reads `/proc/PID/smaps_rollup`.
pub fn mem_of(pid: u32) -> Result<Mem> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut m = Mem::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "Rss:" => m.rss = v,
            "Pss:" => m.pss = v,
            "Private_Clean:" | "Private_Dirty:" => m.private += v,
            _ => {}
        }
    }
    Ok(m)
}

/// Bytes of the files under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The value of `bytes` bytes a write carries: a sequence number, then padding.
pub fn value(bytes: usize, seq: u64) -> String {
    let mut v = format!("{seq:016x}");
    v.truncate(bytes);
    while v.len() < bytes {
        v.push('v');
    }
    v
}

// ---- the two sides ----

/// One client writing one object of its own again and again.
pub(crate) trait Writer: Send + 'static {
    /// One write, retried only on a version conflict (counted).
    fn write(&mut self) -> impl Future<Output = Result<(), Status>> + Send;
    /// Sends the next writes through another member.
    fn set_channel(&mut self, ch: Channel);
    /// How long each request may take from now on.
    fn set_timeout(&mut self, timeout: Duration);
    /// Version conflicts met so far.
    fn conflicts(&self) -> u64;
}

/// A 3-member cluster under test: shoal or etcd.
pub(crate) trait Side {
    type W: Writer;
    fn name(&self) -> &'static str;
    /// The index of the member that leads now.
    async fn leader(&self) -> Result<usize>;
    /// A new connection to a member, as a client would open it.
    async fn channel(&self, member: usize) -> Result<Channel>;
    /// A writer of client number `client`'s own object, through `member`.
    async fn writer(&self, member: usize, client: usize, value_bytes: usize) -> Result<Self::W>;
    /// kill -9 of a member.
    fn kill(&mut self, member: usize);
    /// Starts a killed member again on its data.
    async fn restart(&mut self, member: usize) -> Result<()>;
    /// Waits until every member runs and agrees on a leader.
    async fn wait_healthy(&self, timeout: Duration) -> Result<()>;
    fn pid(&self, member: usize) -> Option<u32>;
    /// Creates object number `i` of the memory benchmark (`AlreadyExists` counts as done).
    fn create(
        ch: Channel,
        i: usize,
        value_bytes: usize,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'static;
    /// Where the member keeps its data.
    fn data_dir(&self, member: usize) -> PathBuf;
}

/// One `shoal agent` process and where it keeps things.
struct Agent {
    host: String,
    addr: String,
    dir: PathBuf,
    socket: PathBuf,
    proc: Option<Proc>,
}

/// Three `shoal agent` managers on 127.0.0.1.
pub struct Shoal {
    bin: PathBuf,
    agents: Vec<Agent>,
}

async fn connect_unix(path: &Path) -> Result<Channel> {
    let p = path.to_path_buf();
    // The URI is required by tonic but unused: the connector ignores it.
    Endpoint::try_from("http://[::1]:1")?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .with_context(|| format!("connecting to {}", path.display()))
}

fn timed<T>(req: Request<T>) -> Request<T> {
    timed_by(req, ATTEMPT_TIMEOUT)
}

fn timed_by<T>(mut req: Request<T>, timeout: Duration) -> Request<T> {
    req.set_timeout(timeout);
    req
}

/// The spec every benchmark service has: no replicas (a pure store write: nothing to
/// schedule), one label carrying the value.
fn service_spec(name: &str, label: String) -> pb::ServiceSpec {
    pb::ServiceSpec {
        name: name.to_string(),
        labels: [("bench".to_string(), label)].into_iter().collect(),
        task: Some(pb::TaskSpec {
            container: Some(pb::ContainerSpec {
                image: "busybox:1.36".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(pb::service_spec::Mode::Replicated(pb::ReplicatedService {
            replicas: 0,
        })),
        ..Default::default()
    }
}

impl Shoal {
    /// Starts 3 agents under `root`, makes the first one a cluster and joins the others as
    /// managers; returns once all three are managers with one leader.
    pub async fn start(bin: &Path, root: &Path) -> Result<Shoal> {
        let mut s = Shoal {
            bin: bin.to_path_buf(),
            agents: Vec::new(),
        };
        for i in 1..=MEMBERS {
            let dir = root.join(format!("shoal{i}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            s.agents.push(Agent {
                host: format!("bench-m{i}"),
                addr: format!("127.0.0.1:{}", free_port()?),
                socket: dir.join("shoal.sock"),
                dir,
                proc: None,
            });
        }
        for i in 0..MEMBERS {
            s.spawn(i).await?;
        }
        let members: Vec<Loopback> = s
            .agents
            .iter()
            .map(|a| Loopback {
                bin: s.bin.clone(),
                host: a.host.clone(),
                addr: a.addr.clone(),
                socket: a.socket.clone(),
            })
            .collect();
        let members: Vec<&dyn Member> = members.iter().map(|m| m as &dyn Member).collect();
        ClusterBuilder::new()
            .managers(MEMBERS)
            .form(&members)
            .context("forming the shoal cluster")?;
        s.wait_healthy(STARTUP_TIMEOUT)
            .await
            .context("the shoal managers did not come up")?;
        Ok(s)
    }

    /// Sets the cluster's Raft timers, then restarts each manager in turn so that it runs
    /// with them (a manager takes its timers from the stored cluster spec when it starts).
    pub async fn set_timers(&mut self, t: Timers) -> Result<()> {
        let (hb, min, max) = (
            format!("{}ms", t.heartbeat),
            format!("{}ms", t.election_min),
            format!("{}ms", t.election_max),
        );
        self.cli(
            0,
            &[
                "cluster",
                "update",
                "--heartbeat-interval",
                &hb,
                "--election-timeout-min",
                &min,
                "--election-timeout-max",
                &max,
            ],
        )?;
        for i in 0..self.agents.len() {
            self.wait_healthy(REJOIN_TIMEOUT).await?;
            Side::kill(self, i);
            self.spawn(i).await?;
        }
        self.wait_healthy(REJOIN_TIMEOUT).await
    }

    async fn spawn(&mut self, i: usize) -> Result<()> {
        let a = &self.agents[i];
        let child = Launch {
            bin: &self.bin,
            hostname: &a.host,
            listen: &a.addr,
            dir: &a.dir,
            args: &[],
        }
        .spawn()?;
        self.agents[i].proc = Some(Proc::adopt(child, &format!("shoal agent {}", a.host)));
        Ok(())
    }

    /// Agent `i`'s hostname.
    pub fn host(&self, i: usize) -> String {
        self.agents[i].host.clone()
    }

    /// Agent `i`'s gRPC address (host:port).
    pub fn addr(&self, i: usize) -> String {
        self.agents[i].addr.clone()
    }

    /// Runs `shoal ARGS` against agent `i`; its stdout, or its stderr as the error.
    pub(crate) fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("SHOAL_SOCKET", &self.agents[i].socket)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running shoal {args:?}"))?;
        if !out.status.success() {
            bail!(
                "shoal {} on {}: {}",
                args.join(" "),
                self.agents[i].host,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn client(&self, i: usize) -> Result<ControlClient<Channel>> {
        Ok(ControlClient::new(self.channel(i).await?))
    }

    async fn nodes(&self, i: usize) -> Result<Vec<pb::Node>> {
        let mut c = self.client(i).await?;
        Ok(
            c.list_nodes(timed(Request::new(pb::ListNodesRequest::default())))
                .await
                .map_err(|s| anyhow::anyhow!("node ls: {}", s.message()))?
                .into_inner()
                .nodes,
        )
    }
}

impl Side for Shoal {
    type W = ShoalWriter;

    fn name(&self) -> &'static str {
        "shoal"
    }

    async fn leader(&self) -> Result<usize> {
        let mut last = anyhow::anyhow!("no agent runs");
        for i in 0..self.agents.len() {
            if self.agents[i].proc.is_none() {
                continue;
            }
            match self.nodes(i).await {
                Ok(nodes) => {
                    let host = nodes
                        .iter()
                        .find(|n| n.manager_status.as_ref().is_some_and(|m| m.leader))
                        .and_then(|n| n.description.as_ref())
                        .map(|d| d.hostname.clone())
                        .context("node ls shows no leader")?;
                    return self
                        .agents
                        .iter()
                        .position(|a| a.host == host)
                        .with_context(|| format!("the leader {host} is not one of ours"));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn channel(&self, member: usize) -> Result<Channel> {
        connect_unix(&self.agents[member].socket).await
    }

    async fn writer(
        &self,
        member: usize,
        client: usize,
        value_bytes: usize,
    ) -> Result<ShoalWriter> {
        let mut c = self.client(member).await?;
        let name = format!("bench-w-{client}");
        let found = c
            .get_service(timed(Request::new(pb::GetServiceRequest {
                service: name.clone(),
            })))
            .await;
        let service = match found {
            Ok(r) => r.into_inner().service,
            Err(s) if s.code() == Code::NotFound => {
                c.create_service(timed(Request::new(pb::CreateServiceRequest {
                    spec: Some(service_spec(&name, value(value_bytes, 0))),
                    // The image is never run: no registry lookup either.
                    no_resolve_image: true,
                })))
                .await
                .map_err(|s| anyhow::anyhow!("creating service {name}: {}", s.message()))?
                .into_inner()
                .service
            }
            Err(s) => bail!("reading service {name}: {}", s.message()),
        }
        .with_context(|| format!("no service {name} in the answer"))?;
        let meta = service.meta.unwrap_or_default();
        Ok(ShoalWriter {
            client: c,
            id: meta.id,
            version: meta.version,
            spec: service.spec.unwrap_or_default(),
            value_bytes,
            seq: 0,
            conflicts: 0,
            timeout: ATTEMPT_TIMEOUT,
        })
    }

    fn kill(&mut self, member: usize) {
        if let Some(mut p) = self.agents[member].proc.take() {
            p.kill();
        }
    }

    async fn restart(&mut self, member: usize) -> Result<()> {
        self.spawn(member).await
    }

    async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut last = None;
            for i in 0..self.agents.len() {
                let why = match self.nodes(i).await {
                    Err(e) => Some(format!("{}: {e:#}", self.agents[i].host)),
                    Ok(nodes) => {
                        let managers: Vec<&pb::ManagerStatus> = nodes
                            .iter()
                            .filter_map(|n| n.manager_status.as_ref())
                            .collect();
                        let leaders = managers.iter().filter(|m| m.leader).count();
                        let reachable = managers.iter().filter(|m| m.reachable).count();
                        if managers.len() == MEMBERS && leaders == 1 && reachable == MEMBERS {
                            None
                        } else {
                            Some(format!(
                                "{} managers, {leaders} leaders, {reachable} reachable",
                                managers.len()
                            ))
                        }
                    }
                };
                if why.is_some() {
                    last = why;
                    break;
                }
            }
            let Some(why) = last else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                bail!("shoal not healthy after {timeout:?}: {why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self, member: usize) -> Option<u32> {
        self.agents[member].proc.as_ref().map(|p| p.pid())
    }

    async fn create(ch: Channel, i: usize, value_bytes: usize) -> Result<(), Status> {
        let spec = service_spec(&format!("mem-{i}"), value(value_bytes, i as u64));
        let r = ControlClient::new(ch)
            .create_service(timed(Request::new(pb::CreateServiceRequest {
                spec: Some(spec),
                // The image is never run: no registry lookup either.
                no_resolve_image: true,
            })))
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(s),
        }
    }

    fn data_dir(&self, member: usize) -> PathBuf {
        self.agents[member].dir.join("data")
    }
}

/// One client updating the labels of its own service, passing the version it read.
pub struct ShoalWriter {
    client: ControlClient<Channel>,
    id: String,
    version: u64,
    spec: pb::ServiceSpec,
    value_bytes: usize,
    seq: u64,
    conflicts: u64,
    timeout: Duration,
}

impl Writer for ShoalWriter {
    async fn write(&mut self) -> Result<(), Status> {
        self.seq += 1;
        self.spec
            .labels
            .insert("bench".into(), value(self.value_bytes, self.seq));
        for _ in 0..MAX_CONFLICT_RETRIES {
            let r = self
                .client
                .update_service(timed_by(
                    Request::new(pb::UpdateServiceRequest {
                        service: self.id.clone(),
                        version: self.version,
                        spec: Some(self.spec.clone()),
                        // The image is never run: no registry lookup either.
                        no_resolve_image: true,
                    }),
                    self.timeout,
                ))
                .await;
            match r {
                Ok(r) => {
                    self.version = r
                        .into_inner()
                        .service
                        .and_then(|s| s.meta)
                        .map(|m| m.version)
                        .unwrap_or(0);
                    return Ok(());
                }
                // Out of sequence: an earlier attempt that timed out may have committed.
                Err(s) if s.code() == Code::FailedPrecondition => {
                    self.conflicts += 1;
                    let cur = self
                        .client
                        .get_service(timed_by(
                            Request::new(pb::GetServiceRequest {
                                service: self.id.clone(),
                            }),
                            self.timeout,
                        ))
                        .await?;
                    self.version = cur
                        .into_inner()
                        .service
                        .and_then(|s| s.meta)
                        .map(|m| m.version)
                        .unwrap_or(0);
                }
                Err(s) => return Err(s),
            }
        }
        Err(Status::aborted("too many version conflicts"))
    }

    fn set_channel(&mut self, ch: Channel) {
        self.client = ControlClient::new(ch);
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn conflicts(&self) -> u64 {
        self.conflicts
    }
}

// ---- both clusters, and the measurements ----

/// Both clusters under one fresh directory; their processes are killed before it is removed.
struct Clusters {
    shoal: Shoal,
    etcd: Etcd,
    _dir: tempfile::TempDir,
}

impl Clusters {
    async fn start(c: &Common) -> Result<Clusters> {
        if c.value_bytes == 0 || c.value_bytes > MAX_VALUE_BYTES {
            bail!("--value-bytes must be 1..={MAX_VALUE_BYTES}");
        }
        let bin = shoal_bin(&c.shoal)?;
        std::fs::create_dir_all(&c.workdir)
            .with_context(|| format!("creating {}", c.workdir.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("shoal-bench-cluster-")
            .tempdir_in(&c.workdir)
            .with_context(|| format!("making a directory in {}", c.workdir.display()))?;
        let timers = c.timers()?;
        let mut shoal = Shoal::start(&bin, dir.path()).await?;
        if let Some(t) = timers {
            shoal.set_timers(t).await?;
        }
        let etcd = Etcd::start(&c.etcd, dir.path(), timers).await?;
        Ok(Clusters {
            shoal,
            etcd,
            _dir: dir,
        })
    }
}

fn shoal_bin(given: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let p = std::env::current_exe()?.with_file_name("shoal");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p shoal) or pass --shoal",
            p.display()
        );
    }
    Ok(p)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// What a load phase measured.
struct Load {
    samples: Vec<Duration>,
    errors: u64,
    conflicts: u64,
    last_error: Option<String>,
    elapsed: Duration,
}

impl Load {
    fn p(&self, q: f64) -> f64 {
        percentile(&self.samples, q).map(ms).unwrap_or(f64::NAN)
    }

    fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs every writer in its own task for `dur`, all starting together.
async fn run_load<W: Writer>(writers: Vec<W>, dur: Duration) -> Result<Load> {
    let barrier = Arc::new(tokio::sync::Barrier::new(writers.len() + 1));
    let mut tasks = Vec::new();
    for mut w in writers {
        let b = barrier.clone();
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let start = Instant::now();
            let mut samples = Vec::new();
            let (mut errors, mut last_error) = (0u64, None);
            while start.elapsed() < dur && samples.len() < MAX_SAMPLES_PER_CLIENT {
                let t = Instant::now();
                match w.write().await {
                    Ok(()) => samples.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        last_error = Some(e.message().to_string());
                        if errors >= MAX_ERRORS_PER_CLIENT {
                            break;
                        }
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
            (samples, errors, w.conflicts(), last_error)
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut load = Load {
        samples: Vec::new(),
        errors: 0,
        conflicts: 0,
        last_error: None,
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (s, e, c, le) = t.await.context("a client task failed")?;
        load.samples.extend(s);
        load.errors += e;
        load.conflicts += c;
        if le.is_some() {
            load.last_error = le;
        }
    }
    load.elapsed = start.elapsed();
    Ok(load)
}

/// One write-path phase on one side: `clients` writers through the leader.
async fn write_phase<S: Side>(
    side: &S,
    clients: usize,
    dur: Duration,
    value_bytes: usize,
) -> Result<Load> {
    let leader = side.leader().await?;
    let mut writers = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut w = side.writer(leader, i, value_bytes).await?;
        // Warms the connection (and the object) up outside the measured phase.
        w.write()
            .await
            .map_err(|s| anyhow::anyhow!("{}: first write: {}", side.name(), s.message()))?;
        writers.push(w);
    }
    run_load(writers, dur).await
}

fn print_load(name: &str, l: &Load) {
    println!(
        "  {name:5}: p50 {:8.3} ms  p99 {:8.3} ms  {:8.1} writes/s  ({} writes, {} errors, {} conflicts)",
        l.p(0.5),
        l.p(0.99),
        l.rate(),
        l.samples.len(),
        l.errors,
        l.conflicts
    );
    if let Some(e) = &l.last_error {
        println!("         last error: {e}");
    }
}

/// Write path: service label updates through the control API vs etcd puts.
pub fn write_path(a: &WriteArgs) -> Result<()> {
    if a.clients.is_empty() || a.clients.iter().any(|&c| c == 0 || c > MAX_CLIENTS) {
        bail!("--clients must be 1..={MAX_CLIENTS} each");
    }
    let dur = Duration::from_secs(a.secs);
    if dur.is_zero() || dur > MAX_PHASE {
        bail!("--secs must be 1..={}", MAX_PHASE.as_secs());
    }
    runtime()?.block_on(async {
        let cl = Clusters::start(&a.common).await?;
        let vb = a.common.value_bytes;
        println!(
            "cluster-write: 3 shoal managers vs 3 etcd members on 127.0.0.1, {vb}-byte values, {} s per phase",
            a.secs
        );
        for (k, &c) in a.clients.iter().enumerate() {
            // Alternate who goes first so neither always runs on a warmer machine.
            let (s, e) = if k % 2 == 0 {
                let s = write_phase(&cl.shoal, c, dur, vb).await?;
                let e = write_phase(&cl.etcd, c, dur, vb).await?;
                (s, e)
            } else {
                let e = write_phase(&cl.etcd, c, dur, vb).await?;
                let s = write_phase(&cl.shoal, c, dur, vb).await?;
                (s, e)
            };
            println!("{c} client(s):");
            print_load("shoal", &s);
            print_load("etcd", &e);
            let p50_ratio = s.p(0.5) / e.p(0.5);
            let rate_ratio = s.rate() / e.rate();
            println!(
                "  shoal/etcd: p50 {p50_ratio:.2}x  p99 {:.2}x  throughput {rate_ratio:.2}x",
                s.p(0.99) / e.p(0.99)
            );
            println!(
                "{}",
                serde_json::json!({"bench": "cluster-write", "clients": c, "secs": a.secs,
                    "value_bytes": vb,
                    "shoal_p50_ms": s.p(0.5), "shoal_p99_ms": s.p(0.99),
                    "shoal_writes_per_s": s.rate(), "shoal_errors": s.errors,
                    "shoal_conflicts": s.conflicts,
                    "etcd_p50_ms": e.p(0.5), "etcd_p99_ms": e.p(0.99),
                    "etcd_writes_per_s": e.rate(), "etcd_errors": e.errors,
                    "p50_ratio": p50_ratio, "throughput_ratio": rate_ratio})
            );
        }
        Ok(())
    })
}

/// One failover trial: steady writes to the leader, kill -9 of it, time until a write through
/// a surviving member succeeds; then the killed member is restarted and rejoins.
async fn failover_trial<S: Side>(
    side: &mut S,
    load: Duration,
    value_bytes: usize,
    verbose: bool,
) -> Result<(Duration, u64)> {
    side.wait_healthy(REJOIN_TIMEOUT).await?;
    let leader = side.leader().await?;
    let survivor = (leader + 1) % MEMBERS;
    let mut w = side.writer(leader, 0, value_bytes).await?;
    // The client holds a connection to another member too, as a multi-endpoint client does.
    let spare = side.channel(survivor).await?;
    let until = Instant::now() + load;
    while Instant::now() < until {
        w.write().await.map_err(|s| {
            anyhow::anyhow!("{}: write before the kill: {}", side.name(), s.message())
        })?;
    }
    let t0 = Instant::now();
    side.kill(leader);
    w.set_channel(spare);
    w.set_timeout(FAILOVER_ATTEMPT_TIMEOUT);
    let took = loop {
        match w.write().await {
            Ok(()) => break t0.elapsed(),
            Err(s) => {
                if verbose {
                    eprintln!(
                        "    {} +{:.0} ms: {:?} {}",
                        side.name(),
                        ms(t0.elapsed()),
                        s.code(),
                        s.message()
                    );
                }
                if t0.elapsed() > FAILOVER_DEADLINE {
                    bail!(
                        "{}: no write succeeded {FAILOVER_DEADLINE:?} after the leader was killed: {}",
                        side.name(),
                        s.message()
                    );
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    };
    side.restart(leader).await?;
    side.wait_healthy(REJOIN_TIMEOUT).await?;
    tokio::time::sleep(REJOIN_SETTLE).await;
    Ok((took, w.conflicts()))
}

fn summary(v: &[Duration]) -> (f64, f64, f64) {
    let p = |q| percentile(v, q).map(ms).unwrap_or(f64::NAN);
    (p(0.5), p(0.99), p(1.0))
}

/// Leader failover, trials interleaved between shoal and etcd.
pub fn failover(a: &FailoverArgs) -> Result<()> {
    if a.trials == 0 || a.trials > MAX_TRIALS {
        bail!("--trials must be 1..={MAX_TRIALS}");
    }
    let load = Duration::from_millis(a.load_ms);
    if load > MAX_PHASE {
        bail!("--load-ms must be at most {}", MAX_PHASE.as_millis());
    }
    runtime()?.block_on(async {
        let mut cl = Clusters::start(&a.common).await?;
        let vb = a.common.value_bytes;
        let timers = match a.common.timers()? {
            Some(t) => format!(
                "heartbeat {} ms, election timeout {}..{} ms (etcd: --heartbeat-interval {} --election-timeout {})",
                t.heartbeat, t.election_min, t.election_max, t.heartbeat, t.election_min
            ),
            None => "each side's default Raft timers".to_string(),
        };
        let (mut s, mut e) = (Vec::new(), Vec::new());
        let mut sc = 0;
        for t in 0..a.trials {
            let (st, sconf) = failover_trial(&mut cl.shoal, load, vb, a.verbose).await?;
            let (et, _) = failover_trial(&mut cl.etcd, load, vb, a.verbose).await?;
            sc += sconf;
            eprintln!(
                "  trial {}: shoal {:.3} ms, etcd {:.3} ms",
                t + 1,
                ms(st),
                ms(et)
            );
            s.push(st);
            e.push(et);
        }
        let (s50, s99, smax) = summary(&s);
        let (e50, e99, emax) = summary(&e);
        println!(
            "cluster-failover: {} trials each, kill -9 of the leader under steady writes, time to the next successful write through a survivor; {timers}",
            a.trials
        );
        println!("  shoal: p50 {s50:.1} ms  p99 {s99:.1} ms  max {smax:.1} ms  ({sc} conflicts)  (target p99 < 1000 ms)");
        println!("  etcd:  p50 {e50:.1} ms  p99 {e99:.1} ms  max {emax:.1} ms");
        println!("  shoal/etcd: p50 {:.2}x  p99 {:.2}x", s50 / e50, s99 / e99);
        println!(
            "{}",
            serde_json::json!({"bench": "cluster-failover", "trials": a.trials,
                "raft_timers_ms": a.common.raft_timers,
                "shoal_p50_ms": s50, "shoal_p99_ms": s99, "shoal_max_ms": smax,
                "shoal_conflicts": sc,
                "etcd_p50_ms": e50, "etcd_p99_ms": e99, "etcd_max_ms": emax,
                "shoal_ms": s.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "etcd_ms": e.iter().map(|d| ms(*d)).collect::<Vec<_>>()})
        );
        Ok(())
    })
}

/// Memory of every member, the leader's first.
async fn memories<S: Side>(side: &S) -> Result<(usize, Vec<Mem>)> {
    let leader = side.leader().await?;
    let mut v = Vec::new();
    for i in 0..MEMBERS {
        let pid = side
            .pid(i)
            .with_context(|| format!("{} member {i} is not running", side.name()))?;
        v.push(mem_of(pid)?);
    }
    Ok((leader, v))
}

/// Creates objects 0..n through the leader with `clients` concurrent clients.
async fn create_many<S: Side>(
    side: &S,
    n: usize,
    clients: usize,
    value_bytes: usize,
) -> Result<Duration> {
    let leader = side.leader().await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients.min(n) {
        let ch = side.channel(leader).await?;
        let jobs: Vec<_> = (k..n)
            .step_by(clients)
            .map(|i| (i, S::create(ch.clone(), i, value_bytes)))
            .collect();
        // Each job is a future not yet polled: run them one after another in this task.
        tasks.push(tokio::spawn(async move {
            for (i, job) in jobs {
                job.await.map_err(|s| (i, s))?;
            }
            Ok::<(), (usize, Status)>(())
        }));
    }
    for t in tasks {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(start + CREATE_DEADLINE), t)
            .await
        {
            Err(_) => bail!(
                "{}: creating {n} objects took over {CREATE_DEADLINE:?}",
                side.name()
            ),
            Ok(Err(e)) => bail!("a creating task failed: {e}"),
            Ok(Ok(Err((i, s)))) => bail!("{}: creating object {i}: {}", side.name(), s.message()),
            Ok(Ok(Ok(()))) => {}
        }
    }
    Ok(start.elapsed())
}

fn print_mem(name: &str, when: &str, leader: usize, mems: &[Mem], disk: u64) {
    let l = mems[leader];
    let max_rss = mems.iter().map(|m| m.rss).max().unwrap_or(0);
    println!(
        "  {name:5} {when:>12}: leader RSS {:7.1} MiB  PSS {:7.1} MiB  private {:7.1} MiB  (largest member RSS {:.1} MiB; leader's data on disk {:.1} MiB)",
        l.rss as f64 / 1024.0,
        l.pss as f64 / 1024.0,
        l.private as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        disk as f64 / (1024.0 * 1024.0)
    );
}

fn mem_json(leader: usize, mems: &[Mem], disk: u64) -> serde_json::Value {
    serde_json::json!({
        "leader_rss_kib": mems[leader].rss, "leader_pss_kib": mems[leader].pss,
        "leader_private_kib": mems[leader].private,
        "members_rss_kib": mems.iter().map(|m| m.rss).collect::<Vec<_>>(),
        "members_pss_kib": mems.iter().map(|m| m.pss).collect::<Vec<_>>(),
        "leader_disk_bytes": disk,
    })
}

/// Memory of a manager idle and with many services, next to an etcd member's.
pub fn memory(a: &MemoryArgs) -> Result<()> {
    if a.objects == 0 || a.objects > MAX_OBJECTS {
        bail!("--objects must be 1..={MAX_OBJECTS}");
    }
    if a.clients == 0 || a.clients > MAX_CLIENTS {
        bail!("--clients must be 1..={MAX_CLIENTS}");
    }
    runtime()?.block_on(async {
        let cl = Clusters::start(&a.common).await?;
        let vb = a.common.value_bytes;
        // etcd stores values of the size a shoal service takes encoded, so both hold as much.
        let spec = service_spec("mem-0000", value(vb, 0));
        let etcd_vb = prost::Message::encoded_len(&spec);
        tokio::time::sleep(MEMORY_SETTLE).await;
        let (sl, s_idle) = memories(&cl.shoal).await?;
        let (el, e_idle) = memories(&cl.etcd).await?;
        let s_idle_disk = disk_usage(&cl.shoal.data_dir(sl));
        let e_idle_disk = disk_usage(&cl.etcd.data_dir(el));
        let s_took = create_many(&cl.shoal, a.objects, a.clients, vb).await?;
        let e_took = create_many(&cl.etcd, a.objects, a.clients, etcd_vb).await?;
        tokio::time::sleep(MEMORY_SETTLE).await;
        let (sl2, s_full) = memories(&cl.shoal).await?;
        let (el2, e_full) = memories(&cl.etcd).await?;
        let s_disk = disk_usage(&cl.shoal.data_dir(sl2));
        let e_disk = disk_usage(&cl.etcd.data_dir(el2));
        println!(
            "cluster-memory: 3 managers / 3 etcd members; {} services ({etcd_vb} bytes encoded, {vb}-byte label) vs {} etcd keys of {etcd_vb}-byte values",
            a.objects, a.objects
        );
        print_mem("shoal", "idle", sl, &s_idle, s_idle_disk);
        print_mem("etcd", "idle", el, &e_idle, e_idle_disk);
        let with = format!("{} objects", a.objects);
        print_mem("shoal", &with, sl2, &s_full, s_disk);
        print_mem("etcd", &with, el2, &e_full, e_disk);
        println!(
            "  creating them ({} clients): shoal {:.1} s, etcd {:.1} s",
            a.clients,
            s_took.as_secs_f64(),
            e_took.as_secs_f64()
        );
        println!(
            "{}",
            serde_json::json!({"bench": "cluster-memory", "objects": a.objects,
                "value_bytes": vb, "object_bytes": etcd_vb,
                "shoal_idle": mem_json(sl, &s_idle, s_idle_disk),
                "etcd_idle": mem_json(el, &e_idle, e_idle_disk),
                "shoal_full": mem_json(sl2, &s_full, s_disk),
                "etcd_full": mem_json(el2, &e_full, e_disk),
                "shoal_create_s": s_took.as_secs_f64(), "etcd_create_s": e_took.as_secs_f64()})
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_asked_size_and_differ() {
        assert_eq!(value(256, 7).len(), 256);
        assert_eq!(value(4, 7).len(), 4);
        assert_ne!(value(256, 1), value(256, 2));
    }

    #[test]
    fn the_bench_spec_passes_shoal_validation_rules() {
        let s = service_spec("bench-w-0", value(256, 1));
        assert_eq!(s.labels["bench"].len(), 256);
        assert!(s.task.and_then(|t| t.container).is_some());
    }

    #[test]
    fn own_memory_is_readable() {
        let m = mem_of(std::process::id()).unwrap();
        assert!(m.rss > 0 && m.pss > 0);
    }
}
