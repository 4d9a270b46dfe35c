//! The peer of the cluster benchmarks: a 3-member etcd (Debian's etcd-server) on loopback,
//! started and stopped by pid, talked to over gRPC like etcd's own client (clientv3) does.
//!
//! Only the few etcd messages the benchmarks need are declared here, by their field numbers in
//! etcd's `rpc.proto` (unknown fields of the answers are skipped by prost).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::cluster::{
    free_port, value, Proc, Side, Timers, Writer, ATTEMPT_TIMEOUT, CONNECT_TIMEOUT,
};

/// `etcdserverpb.PutRequest` (key, value only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// `etcdserverpb.PutResponse` (header only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `etcdserverpb.StatusRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

/// `etcdserverpb.StatusResponse` (header and leader).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(string, tag = "2")]
    pub version: String,
    #[prost(uint64, tag = "4")]
    pub leader: u64,
}

const PUT: &str = "/etcdserverpb.KV/Put";
const STATUS: &str = "/etcdserverpb.Maintenance/Status";

async fn unary<Q, R>(
    ch: Channel,
    path: &'static str,
    msg: Q,
    timeout: Duration,
) -> Result<R, Status>
where
    Q: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut req = Request::new(msg);
    req.set_timeout(timeout);
    let codec = tonic_prost::ProstCodec::<Q, R>::default();
    grpc.unary(req, PathAndQuery::from_static(path), codec)
        .await
        .map(|r| r.into_inner())
}

/// One etcd member: its ports, data dir and process.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

/// A 3-member etcd cluster on 127.0.0.1; every member is killed (by pid) when dropped.
pub struct Etcd {
    bin: String,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    timers: Option<Timers>,
}

impl Etcd {
    /// Starts 3 members with data under `root` and waits until they have a leader.
    pub async fn start(bin: &str, root: &Path, timers: Option<Timers>) -> Result<Etcd> {
        let mut members = Vec::new();
        for i in 1..=3 {
            let dir = root.join(format!("etcd{i}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            members.push(Member {
                name: format!("e{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                data: dir.join("data"),
                log: dir.join("etcd.log"),
                proc: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            bin: bin.to_string(),
            members,
            initial_cluster,
            token: format!("shoal-bench-{}", std::process::id()),
            timers,
        };
        for i in 0..3 {
            etcd.spawn(i)?;
        }
        if let Err(e) = etcd.wait_healthy(crate::cluster::STARTUP_TIMEOUT).await {
            // A member that refused its flags has exited: say so, with its log.
            for m in &mut etcd.members {
                if let Some(why) = m.proc.as_mut().and_then(|p| p.exited()) {
                    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                    let last = log.lines().last().unwrap_or("").trim();
                    bail!("etcd did not come up: {why}: {last}");
                }
            }
            return Err(e.context("etcd did not come up"));
        }
        Ok(etcd)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("opening {}", m.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"]);
        if let Some(t) = self.timers {
            cmd.arg("--heartbeat-interval")
                .arg(t.heartbeat.to_string())
                .arg("--election-timeout")
                .arg(t.election_min.to_string());
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let what = format!("etcd {}", m.name);
        self.members[i].proc = Some(Proc::spawn(&mut cmd, &what)?);
        Ok(())
    }

    async fn status(&self, i: usize) -> Result<StatusResponse, Status> {
        let ch = self.channel_to(i).await?;
        unary(ch, STATUS, StatusRequest {}, ATTEMPT_TIMEOUT).await
    }

    async fn channel_to(&self, i: usize) -> Result<Channel, Status> {
        let url = format!("http://127.0.0.1:{}", self.members[i].client_port);
        Endpoint::from_shared(url)
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Puts one value (no retry).
    pub async fn put(
        ch: Channel,
        key: &[u8],
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), Status> {
        let _: PutResponse = unary(
            ch,
            PUT,
            PutRequest {
                key: key.to_vec(),
                value,
            },
            timeout,
        )
        .await?;
        Ok(())
    }
}

impl Side for Etcd {
    type W = EtcdWriter;

    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn leader(&self) -> Result<usize> {
        let mut ids = Vec::new();
        let mut leader = 0;
        for i in 0..self.members.len() {
            if self.members[i].proc.is_none() {
                ids.push(0);
                continue;
            }
            match self.status(i).await {
                Ok(s) => {
                    ids.push(s.header.map(|h| h.member_id).unwrap_or(0));
                    if s.leader != 0 {
                        leader = s.leader;
                    }
                }
                Err(_) => ids.push(0),
            }
        }
        match ids.iter().position(|&id| id != 0 && id == leader) {
            Some(i) => Ok(i),
            None => bail!("etcd has no leader among its running members"),
        }
    }

    async fn channel(&self, member: usize) -> Result<Channel> {
        self.channel_to(member)
            .await
            .with_context(|| format!("connecting to etcd {}", self.members[member].name))
    }

    async fn writer(&self, member: usize, client: usize, value_bytes: usize) -> Result<EtcdWriter> {
        Ok(EtcdWriter {
            ch: self.channel(member).await?,
            key: format!("bench/w/{client}").into_bytes(),
            value_bytes,
            seq: 0,
            timeout: ATTEMPT_TIMEOUT,
        })
    }

    fn kill(&mut self, member: usize) {
        if let Some(mut p) = self.members[member].proc.take() {
            p.kill();
        }
    }

    async fn restart(&mut self, member: usize) -> Result<()> {
        self.spawn(member)
    }

    async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            let mut leaders = Vec::new();
            for i in 0..self.members.len() {
                match self.status(i).await {
                    Ok(s) => leaders.push(s.leader),
                    Err(e) => {
                        last = format!("{}: {}", self.members[i].name, e.message());
                        break;
                    }
                }
            }
            if leaders.len() == self.members.len()
                && leaders[0] != 0
                && leaders.iter().all(|&l| l == leaders[0])
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("etcd not healthy after {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self, member: usize) -> Option<u32> {
        self.members[member].proc.as_ref().map(|p| p.pid())
    }

    async fn create(ch: Channel, i: usize, value_bytes: usize) -> Result<(), Status> {
        let key = format!("bench/mem/{i}");
        Etcd::put(
            ch,
            key.as_bytes(),
            value(value_bytes, i as u64).into_bytes(),
            ATTEMPT_TIMEOUT,
        )
        .await
    }

    fn data_dir(&self, member: usize) -> PathBuf {
        self.members[member].data.clone()
    }
}

/// One client putting its own key again and again.
pub struct EtcdWriter {
    ch: Channel,
    key: Vec<u8>,
    value_bytes: usize,
    seq: u64,
    timeout: Duration,
}

impl Writer for EtcdWriter {
    async fn write(&mut self) -> Result<(), Status> {
        self.seq += 1;
        Etcd::put(
            self.ch.clone(),
            &self.key,
            value(self.value_bytes, self.seq).into_bytes(),
            self.timeout,
        )
        .await
    }

    fn set_channel(&mut self, ch: Channel) {
        self.ch = ch;
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn conflicts(&self) -> u64 {
        0
    }
}
