//! Joining over real TLS on 127.0.0.1: tokens, the CA digest check, CSR identity checks.

use crate::tls_support;

use std::time::Duration;

use shoal_manager::ca::{
    join_cluster, make_csr, CaError, JoinToken, NodeIdentity, Role, RootCa, CA_CERT_FILE,
    CA_KEY_FILE, NODE_CERT_FILE, NODE_KEY_FILE,
};
use shoal_manager::tls::{anonymous_channel, NodeTls};
use shoal_proto::v1::ca_client::CaClient;
use shoal_proto::v1::{IssueRequest, RenewRequest};
use tls_support::Manager;
use tonic::Code;

fn rpc_code(e: &CaError) -> Option<Code> {
    match e {
        CaError::Rpc { status, .. } => Some(status.code()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_manager_join_with_their_tokens() {
    let m = Manager::start().await;
    let w = join_cluster(&m.addr, &m.token(Role::Worker), "box-1", "127.0.0.1:4243")
        .await
        .unwrap();
    assert_eq!(w.role, Role::Worker);
    assert!(w.ca_key_pem.is_none(), "workers never get the CA key");
    let tls = w.tls().unwrap();
    assert_eq!(
        tls.identity(),
        NodeIdentity {
            node_id: w.node_id.clone(),
            role: Role::Worker,
            cluster_id: "cluster-test".into(),
        }
    );
    let info = tls.cert_info();
    assert_eq!(
        info.sans,
        vec!["127.0.0.1".to_string(), "box-1".to_string()]
    );

    let mgr = join_cluster(&m.addr, &m.token(Role::Manager), "box-2", "127.0.0.1")
        .await
        .unwrap();
    assert_eq!(mgr.role, Role::Manager);
    assert_ne!(mgr.node_id, w.node_id);
    let key = mgr.ca_key_pem.clone().expect("managers get the CA key");
    assert_eq!(
        RootCa::from_pem(&mgr.ca_pem, &key).unwrap().digest(),
        m.ca.digest()
    );

    // The cluster recorded both, with the serial of the certificate it handed out.
    let joined = m.backend.joined.lock().unwrap().clone();
    assert_eq!(joined.len(), 2);
    assert_eq!(joined[0].node_id, w.node_id);
    assert_eq!(joined[0].role, Role::Worker);
    assert_eq!(joined[0].hostname, "box-1");
    assert_eq!(joined[0].cert_serial, info.serial);
    assert_eq!(joined[1].role, Role::Manager);

    // Saved: key files 0600, and the directory loads back to the same identity.
    let pki = m.pki_dir("mgr");
    mgr.save(&pki).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (f, mode) in [
        (CA_CERT_FILE, 0o644),
        (CA_KEY_FILE, 0o600),
        (NODE_CERT_FILE, 0o644),
        (NODE_KEY_FILE, 0o600),
    ] {
        let meta = std::fs::metadata(pki.join(f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{f}");
    }
    let back = NodeTls::load(&pki).unwrap();
    assert_eq!(back.identity().node_id, mgr.node_id);
    assert_eq!(RootCa::load(&pki).unwrap().digest(), m.ca.digest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_rotated_out_tokens_are_refused() {
    let m = Manager::start().await;
    // Right CA digest, wrong secret.
    let forged = JoinToken::generate(&m.ca.digest()).to_string();
    let err = join_cluster(&m.addr, &forged, "h", "127.0.0.1")
        .await
        .unwrap_err();
    assert_eq!(rpc_code(&err), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("not valid"), "{err}");

    // Rotation: the old worker token stops working, the new one works, the manager
    // token is untouched.
    let old = m.token(Role::Worker);
    m.backend.tokens.lock().unwrap().rotate(Role::Worker);
    let err = join_cluster(&m.addr, &old, "h", "127.0.0.1")
        .await
        .unwrap_err();
    assert_eq!(rpc_code(&err), Some(Code::PermissionDenied), "{err}");
    join_cluster(&m.addr, &m.token(Role::Worker), "h", "127.0.0.1")
        .await
        .unwrap();
    join_cluster(&m.addr, &m.token(Role::Manager), "h", "127.0.0.1")
        .await
        .unwrap();

    // Malformed: refused before anything is sent.
    let err = join_cluster(&m.addr, "SHOAL-1-nope", "h", "127.0.0.1")
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::TokenMalformed(_)), "{err}");
    assert_eq!(
        m.backend.joined.lock().unwrap().len(),
        2,
        "only the good joins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiner_refuses_a_ca_that_does_not_match_the_token() {
    let m = Manager::start().await;
    let other = RootCa::create("impostor").unwrap();
    // A token for another CA: the served CA's digest differs, the joiner stops before
    // sending its CSR and token anywhere.
    let token = JoinToken::generate(&other.digest()).to_string();
    let err = join_cluster(&m.addr, &token, "h", "127.0.0.1")
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::ServedCaMismatch { .. }), "{err}");
    assert!(m.backend.joined.lock().unwrap().is_empty());

    // And the server refuses such a token if one is sent anyway.
    let mut client = CaClient::new(anonymous_channel(&m.addr, m.ca.cert_pem()).unwrap());
    let (_, csr_pem) = make_csr(None).unwrap();
    let status = client
        .issue_node_certificate(IssueRequest {
            csr_pem,
            token,
            hostname: "h".into(),
            advertise_addr: "127.0.0.1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("different CA"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_for_another_identity_is_refused() {
    let m = Manager::start().await;
    let first = join_cluster(&m.addr, &m.token(Role::Worker), "h", "127.0.0.1")
        .await
        .unwrap();

    // Joining with a CSR that claims the first node's id.
    let mut anon = CaClient::new(anonymous_channel(&m.addr, m.ca.cert_pem()).unwrap());
    let (_, csr_pem) = make_csr(Some(&first.node_id)).unwrap();
    let status = anon
        .issue_node_certificate(IssueRequest {
            csr_pem,
            token: m.token(Role::Worker),
            hostname: "h".into(),
            advertise_addr: "127.0.0.1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("CN"), "{status:?}");

    // Renewing with a CSR for someone else's id.
    let second = join_cluster(&m.addr, &m.token(Role::Worker), "h", "127.0.0.1")
        .await
        .unwrap();
    let tls = second.tls().unwrap();
    let mut client = CaClient::new(tls.channel(&m.addr).unwrap());
    let (_, csr_pem) = make_csr(Some(&first.node_id)).unwrap();
    let status = client
        .renew_node_certificate(RenewRequest { csr_pem })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Garbage CSR: a clear invalid-argument.
    let status = anon
        .issue_node_certificate(IssueRequest {
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            token: m.token(Role::Worker),
            hostname: "h".into(),
            advertise_addr: "127.0.0.1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(m.backend.joined.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_manager_fails_fast() {
    // Nothing listens there: the join fails within the connect timeout, not hanging.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let ca = RootCa::create("c").unwrap();
    let token = JoinToken::generate(&ca.digest()).to_string();
    let started = std::time::Instant::now();
    let err = join_cluster(&addr, &token, "h", "127.0.0.1")
        .await
        .unwrap_err();
    assert_eq!(rpc_code(&err), Some(Code::Unavailable), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
