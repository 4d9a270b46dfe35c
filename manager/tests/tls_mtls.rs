//! Mutual TLS and role authorisation over real sockets on 127.0.0.1 with real rustls.

use crate::tls_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use shoal_manager::ca::{cert_info, join_cluster, make_csr, renew_loop, renew_once, Role, RootCa};
use shoal_manager::raft::network::{RaftService, MAX_RAFT_MESSAGE_BYTES};
use shoal_manager::tls::{
    anonymous_channel, channel_with_config, tls_incoming, Authorizer, NodeTls, CONNECT_TIMEOUT,
};
use shoal_proto::v1::ca_client::CaClient;
use shoal_proto::v1::raft_client::RaftClient;
use shoal_proto::v1::{GetRootCertificateRequest, RaftMessage, RenewRequest};
use tls_support::{manager_tls, node_tls, raw_vote, serve_probe, Manager};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_issued_from_a_csr_works_for_mtls() {
    let m = Manager::start().await;
    let joined = join_cluster(&m.addr, &m.token(Role::Manager), "h", "127.0.0.1")
        .await
        .unwrap();
    let tls = joined.tls().unwrap();
    // A manager-only method: the Raft node answers the vote.
    let resp = raw_vote(tls.channel(&m.addr).unwrap()).await.unwrap();
    let answer: Result<openraft::raft::VoteResponse<u64>, openraft::error::RaftError<u64>> =
        bincode::deserialize(&resp.into_inner().data).unwrap();
    answer.unwrap();
    // Renewal is open to it too.
    let (_, csr_pem) = make_csr(Some(&joined.node_id)).unwrap();
    CaClient::new(tls.channel(&m.addr).unwrap())
        .renew_node_certificate(RenewRequest { csr_pem })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_cert_gets_only_the_unauthenticated_methods() {
    let m = Manager::start().await;
    let channel = anonymous_channel(&m.addr, m.ca.cert_pem()).unwrap();
    let root = CaClient::new(channel.clone())
        .get_root_certificate(GetRootCertificateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(root.ca_pem, m.ca.cert_pem());

    let status = raw_vote(channel.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("client certificate"),
        "{status:?}"
    );

    let (_, csr_pem) = make_csr(None).unwrap();
    let status = CaClient::new(channel)
        .renew_node_certificate(RenewRequest { csr_pem })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// A client that trusts the cluster CA but presents `cert`/`key`.
fn client_presenting(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_from_another_ca_is_refused() {
    let m = Manager::start().await;
    // Same cluster id, same node id as the real manager, a manager role: only the signer
    // differs.
    let rogue = RootCa::create("cluster-test").unwrap();
    let (key, csr) = make_csr(None).unwrap();
    let cert = rogue
        .issue(
            &csr,
            "manager-0",
            Role::Manager,
            &["127.0.0.1".into()],
            Duration::from_secs(600),
        )
        .unwrap();
    let config = client_presenting(m.ca.cert_pem(), &cert.cert_pem, &key);
    let channel = channel_with_config(&m.addr, config, CONNECT_TIMEOUT).unwrap();
    // The server refuses the handshake (with TLS 1.3 the client learns it as the
    // connection closing), so no request reaches a handler — not even the one that needs no
    // certificate at all.
    // A status a handler sent has no local source; a failed connection does.
    let refused = |s: &tonic::Status| {
        std::error::Error::source(s).is_some()
            && matches!(
                s.code(),
                Code::Unavailable | Code::Cancelled | Code::Unknown
            )
    };
    let status = raw_vote(channel.clone()).await.unwrap_err();
    assert!(refused(&status), "{status:?}");
    let status = CaClient::new(channel)
        .get_root_certificate(GetRootCertificateRequest {})
        .await
        .unwrap_err();
    assert!(refused(&status), "{status:?}");

    // The server is unharmed.
    raw_vote(m.tls.channel(&m.addr).unwrap()).await.unwrap();

    // And a client refuses a server whose certificate is from another CA.
    let rogue_server = manager_tls(&rogue, "m", Duration::from_secs(600));
    let (probe, _h) = serve_probe(&rogue_server).await;
    let status = CaClient::new(m.tls.channel(&probe).unwrap())
        .get_root_certificate(GetRootCertificateRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_naming_another_cluster_is_refused_by_authorize() {
    let m = Manager::start().await;
    // A server whose authoriser admits another cluster id: the client's certificate passes
    // the handshake (same CA) but its O names a different cluster.
    let authorizer = Authorizer::new("another-cluster", m.backend.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tls_incoming(listener, m.tls.server_config().unwrap());
    let router = tonic::transport::Server::builder()
        .add_service(RaftService::new(m.raft.clone(), authorizer).into_server());
    let h = tokio::spawn(async move { router.serve_with_incoming(incoming).await.unwrap() });
    let status = raw_vote(m.tls.channel(&addr).unwrap()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("cluster-test"), "{status:?}");
    h.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_cert_cannot_call_manager_only_methods() {
    let m = Manager::start().await;
    let joined = join_cluster(&m.addr, &m.token(Role::Worker), "h", "127.0.0.1")
        .await
        .unwrap();
    let tls = joined.tls().unwrap();
    let status = raw_vote(tls.channel(&m.addr).unwrap()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("worker"), "{status:?}");
    // Renewal is a worker's right.
    let (_, csr_pem) = make_csr(Some(&joined.node_id)).unwrap();
    let renewed = CaClient::new(tls.channel(&m.addr).unwrap())
        .renew_node_certificate(RenewRequest { csr_pem })
        .await
        .unwrap()
        .into_inner();
    let der = CertificateDer::from_pem_slice(renewed.cert_pem.as_bytes()).unwrap();
    let info = cert_info(&der).unwrap();
    assert_eq!(info.identity.node_id, joined.node_id);
    assert_eq!(info.identity.role, Role::Worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_node_is_refused_at_once() {
    let m = Manager::start().await;
    let joined = join_cluster(&m.addr, &m.token(Role::Manager), "h", "127.0.0.1")
        .await
        .unwrap();
    let tls = joined.tls().unwrap();
    let channel = tls.channel(&m.addr).unwrap();
    raw_vote(channel.clone()).await.unwrap();
    m.backend.remove(&joined.node_id);
    // Same connection, still-valid certificate: refused from the next request on.
    let status = raw_vote(channel.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("removed"), "{status:?}");
    let (_, csr_pem) = make_csr(Some(&joined.node_id)).unwrap();
    let status = CaClient::new(channel)
        .renew_node_certificate(RenewRequest { csr_pem })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

/// The serial of the certificate a TLS server presents to a new connection.
async fn server_serial(tls: &NodeTls, addr: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.client_config().unwrap());
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let certs = stream.get_ref().1.peer_certificates().unwrap();
    cert_info(&certs[0]).unwrap().serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_cert_is_renewed_and_new_connections_use_it() {
    let m = Manager::start().await;
    *m.backend.lifetime.lock().unwrap() = Duration::from_secs(3);
    let joined = join_cluster(&m.addr, &m.token(Role::Worker), "h", "127.0.0.1")
        .await
        .unwrap();
    let pki = m.pki_dir("worker");
    joined.save(&pki).unwrap();
    let tls = NodeTls::load(&pki).unwrap();
    let first = tls.serial();
    let (probe, _h) = serve_probe(&m.tls).await;
    let seen = |tls: NodeTls, probe: String| async move {
        CaClient::new(tls.channel(&probe).unwrap())
            .get_root_certificate(GetRootCertificateRequest {})
            .await
            .unwrap()
            .into_inner()
            .ca_pem
    };
    assert_eq!(seen(tls.clone(), probe.clone()).await, first);

    let addr = m.addr.clone();
    let looping = tokio::spawn(renew_loop(
        tls.clone(),
        pki.clone(),
        Arc::new(move || vec![addr.clone()]),
    ));
    // Renewal happens at 50–80 % of ~3.3 s; give it two rounds.
    let started = Instant::now();
    let mut serials = vec![first.clone()];
    while serials.len() < 3 && started.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = tls.serial();
        if serials.last() != Some(&now) {
            serials.push(now);
        }
    }
    assert!(serials.len() >= 3, "renewed twice in 8 s: {serials:?}");
    let current = tls.serial();
    // The files were replaced and load back to the new certificate.
    assert_eq!(NodeTls::load(&pki).unwrap().serial(), current);
    // A new connection presents the new certificate.
    let presented = seen(tls.clone(), probe.clone()).await;
    assert!(
        serials[1..].contains(&presented),
        "{presented} not among {serials:?}"
    );
    assert_ne!(presented, first);
    // The CA recorded the renewals.
    let renewals = m.backend.renewals.lock().unwrap().clone();
    assert!(renewals
        .iter()
        .any(|(id, s)| id == &joined.node_id && s == &serials[1]));
    looping.abort();
    // The first certificate has expired by now; the renewed one still works.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = CaClient::new(tls.channel(&m.addr).unwrap())
        .get_root_certificate(GetRootCertificateRequest {})
        .await;
    assert!(status.is_ok(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_renewal_is_presented_to_new_connections() {
    let m = Manager::start().await;
    let client = node_tls(&m.ca, "client-1", Role::Manager, Duration::from_secs(600));
    let before = server_serial(&client, &m.addr).await;
    assert_eq!(before, m.tls.serial());
    // The manager renews its own certificate from its own CA service.
    let pki = m.pki_dir("manager");
    m.tls.save(&pki).unwrap();
    renew_once(&m.tls, &pki, &m.addr).await.unwrap();
    let after = server_serial(&client, &m.addr).await;
    assert_ne!(after, before);
    assert_eq!(after, m.tls.serial());
    assert_eq!(NodeTls::load(&pki).unwrap().serial(), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_raft_message_is_refused_cleanly() {
    let m = Manager::start().await;
    let mut client = RaftClient::new(m.tls.channel(&m.addr).unwrap());
    let status = client
        .append_entries(RaftMessage {
            data: vec![0u8; MAX_RAFT_MESSAGE_BYTES + 1],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    // Malformed (not bincode of a request): a clear invalid-argument.
    let status = client
        .append_entries(RaftMessage {
            data: vec![1, 2, 3],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("malformed"), "{status:?}");
    // The server is still serving.
    raw_vote(m.tls.channel(&m.addr).unwrap()).await.unwrap();
}
