//! Who may call the control API over the manager's TLS port: refusals with real certificates
//! from real daemons on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;

use shoal_manager::ca::PKI_DIR;
use shoal_manager::daemon::{connect_local, Daemon, DaemonConfig};
use shoal_manager::tls::{anonymous_channel, NodeTls};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;
use shoal_proto::v1::daemon_client::DaemonClient;
use tonic::Code;

struct Node {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    daemon: Option<Daemon>,
}

impl Node {
    async fn start(name: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut cfg = DaemonConfig::new(dir.path().join("data"), addr, dir.path().join("s.sock"));
        cfg.hostname = Some(name.into());
        cfg.raft_timers = Some(pb::RaftConfig {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_interval: 10_000,
            keep_old_entries: 100,
        });
        let daemon = Daemon::start(cfg).await.unwrap();
        Node {
            dir,
            addr,
            daemon: Some(daemon),
        }
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("data").join(PKI_DIR)
    }

    async fn local(&self) -> DaemonClient<tonic::transport::Channel> {
        DaemonClient::new(
            connect_local(&self.dir.path().join("s.sock"))
                .await
                .unwrap(),
        )
    }

    async fn control(&self) -> ControlClient<tonic::transport::Channel> {
        ControlClient::new(
            connect_local(&self.dir.path().join("s.sock"))
                .await
                .unwrap(),
        )
    }

    async fn init(&self) -> pb::InitResponse {
        self.local()
            .await
            .init(pb::InitRequest {
                advertise_addr: self.addr.to_string(),
                cluster_name: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn join(&self, token: &str, via: &Node) -> pb::JoinResponse {
        self.local()
            .await
            .join(pb::JoinRequest {
                token: token.into(),
                manager_addr: via.addr.to_string(),
                advertise_addr: self.addr.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// A control client over TLS to this node, presenting `tls`'s certificate.
    fn tls_control(&self, tls: &NodeTls) -> ControlClient<tonic::transport::Channel> {
        ControlClient::new(tls.channel(&self.addr.to_string()).unwrap())
    }

    async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
    }
}

async fn list(c: &mut ControlClient<tonic::transport::Channel>) -> Result<usize, tonic::Status> {
    c.list_services(pb::ListServicesRequest::default())
        .await
        .map(|r| r.into_inner().services.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_over_tls_needs_a_current_manager_certificate() {
    let mut a = Node::start("a").await;
    let init = a.init().await;

    // The manager's own certificate is accepted.
    let a_tls = NodeTls::load(&a.pki()).unwrap();
    assert_eq!(list(&mut a.tls_control(&a_tls)).await.unwrap(), 0);

    // No client certificate.
    let anon = anonymous_channel(&a.addr.to_string(), a_tls.ca_pem()).unwrap();
    let e = list(&mut ControlClient::new(anon)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // A worker's certificate.
    let mut w = Node::start("w").await;
    w.join(&init.worker_token, &a).await;
    let w_tls = NodeTls::load(&w.pki()).unwrap();
    let e = list(&mut a.tls_control(&w_tls)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // The worker's local socket has no cluster state to show either.
    let e = list(&mut w.control().await).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // A certificate from another cluster's CA: the TLS handshake itself fails.
    let mut other = Node::start("other").await;
    other.init().await;
    let other_tls = NodeTls::load(&other.pki()).unwrap();
    assert!(list(&mut a.tls_control(&other_tls)).await.is_err());

    // A manager that was demoted and removed: its still-valid certificate is refused at once.
    let mut b = Node::start("b").await;
    let b_id = b.join(&init.manager_token, &a).await.node_id;
    let b_tls = NodeTls::load(&b.pki()).unwrap();
    assert_eq!(list(&mut a.tls_control(&b_tls)).await.unwrap(), 0);
    let mut c = a.control().await;
    c.demote_node(pb::DemoteNodeRequest { node: b_id.clone() })
        .await
        .unwrap();
    b.stop().await;
    let e = list(&mut a.tls_control(&b_tls)).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "a demoted manager is refused: {e}"
    );
    c.remove_node(pb::RemoveNodeRequest {
        node: b_id,
        force: true,
    })
    .await
    .unwrap();
    let e = list(&mut a.tls_control(&b_tls)).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "a removed node is refused: {e}"
    );
    assert!(e.message().contains("removed"), "{e}");

    // A rotated-out token no longer joins.
    c.rotate_join_token(pb::RotateJoinTokenRequest {
        role: pb::NodeRole::Worker as i32,
    })
    .await
    .unwrap();
    let mut late = Node::start("late").await;
    let e = late
        .local()
        .await
        .join(pb::JoinRequest {
            token: init.worker_token.clone(),
            manager_addr: a.addr.to_string(),
            advertise_addr: late.addr.to_string(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("token"), "{e}");
    assert!(!late.pki().exists(), "a refused join leaves nothing behind");

    for n in [&mut a, &mut w, &mut other, &mut late] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_refuses_bad_and_oversized_requests() {
    let mut a = Node::start("a").await;
    a.init().await;
    let mut c = a.control().await;
    let spec = |name: &str, image: &str, replicas: u64, constraint: &str| pb::ServiceSpec {
        name: name.into(),
        task: Some(pb::TaskSpec {
            container: Some(pb::ContainerSpec {
                image: image.into(),
                ..Default::default()
            }),
            placement: Some(pb::Placement {
                constraints: vec![constraint.into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(pb::service_spec::Mode::Replicated(pb::ReplicatedService {
            replicas,
        })),
        ..Default::default()
    };
    for (s, want) in [
        (
            spec("a b", "busybox", 1, "node.role==worker"),
            "invalid service name",
        ),
        (
            spec("ok", "Busybox", 1, "node.role==worker"),
            "invalid image reference",
        ),
        (
            spec("ok", "busybox@sha256:12", 1, "node.role==worker"),
            "invalid image reference",
        ),
        (
            spec("ok", "busybox", 1, "node.role=worker"),
            "invalid constraint",
        ),
        (
            spec("ok", "busybox", 10_000_000, "node.role==worker"),
            "replicas",
        ),
    ] {
        let e = c
            .create_service(pb::CreateServiceRequest {
                spec: Some(s),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains(want), "{e} should mention {want}");
    }
    let e = c
        .create_service(pb::CreateServiceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Oversized: a 5 MiB label.
    let mut big = spec("big", "busybox", 1, "node.role==worker");
    big.labels.insert("x".into(), "y".repeat(5 << 20));
    let e = c
        .create_service(pb::CreateServiceRequest {
            spec: Some(big),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{e}"
    );

    // Nothing was written.
    assert_eq!(list(&mut c).await.unwrap(), 0);

    // Cluster timers are checked too.
    let cl = c
        .get_cluster(pb::GetClusterRequest {})
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    let mut s = cl.spec.clone().unwrap();
    s.raft.as_mut().unwrap().election_timeout_min_ms = 10;
    let e = c
        .update_cluster(pb::UpdateClusterRequest {
            version: 0,
            spec: Some(s),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    a.stop().await;
}
