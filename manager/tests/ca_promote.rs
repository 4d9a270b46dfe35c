//! Promotion and demotion through certificate renewal, over real TLS on 127.0.0.1: the CA
//! issues the role the cluster wants, and hands the CA key only with a manager certificate.

use crate::tls_support;

use std::os::unix::fs::PermissionsExt;

use shoal_manager::ca::{join_cluster, renew_once, Role, RootCa, CA_KEY_FILE};
use shoal_manager::secrets::Keyring;
use shoal_manager::tls::NodeTls;
use tls_support::Manager;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_worker_renews_into_a_manager_with_the_ca_key() {
    let m = Manager::start().await;
    let w = join_cluster(&m.addr, &m.token(Role::Worker), "box-1", "127.0.0.1")
        .await
        .unwrap();
    let pki = m.pki_dir("w");
    w.save(&pki).unwrap();
    let tls = NodeTls::load(&pki).unwrap();

    // Not promoted: still a worker, and no CA key nor secrets key on disk.
    assert!(
        w.secrets_key.is_empty(),
        "workers never get the secrets key"
    );
    renew_once(&tls, &pki, &m.addr).await.unwrap();
    assert_eq!(tls.identity().role, Role::Worker);
    assert!(!pki.join(CA_KEY_FILE).exists());
    assert!(Keyring::load(&pki).unwrap().is_none());

    m.backend
        .desired
        .lock()
        .unwrap()
        .insert(w.node_id.clone(), Role::Manager);
    renew_once(&tls, &pki, &m.addr).await.unwrap();
    assert_eq!(tls.identity().role, Role::Manager);
    assert_eq!(tls.identity().node_id, w.node_id);
    let key = pki.join(CA_KEY_FILE);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(RootCa::load(&pki).unwrap().digest(), m.ca.digest());
    // With it, the cluster's secrets key, wrapped by this node's own key-encryption key.
    let keys = Keyring::load(&pki)
        .unwrap()
        .expect("the secrets key came with the CA key");
    assert_eq!(keys.raw(), m.keys.raw());
    // What a restarted daemon loads is the manager certificate.
    assert_eq!(NodeTls::load(&pki).unwrap().identity().role, Role::Manager);

    // Demoted again: the next renewal is a worker's.
    m.backend
        .desired
        .lock()
        .unwrap()
        .insert(w.node_id.clone(), Role::Worker);
    renew_once(&tls, &pki, &m.addr).await.unwrap();
    assert_eq!(tls.identity().role, Role::Worker);
}
