//! Slow and silent clients on a real manager's TLS port (a one-manager cluster in this process):
//! hundreds of connections that never speak, handshakes stalled half way, TLS clients that
//! trickle the HTTP/2 preface — a real client still gets answers promptly, the server drops
//! every one of them within the handshake timeout, and its file descriptors and memory stay
//! bounded (read from /proc).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use shoal_manager::daemon::{connect_local, Daemon, DaemonConfig};
use shoal_manager::tls::{anonymous_channel, HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES};
use shoal_proto::v1 as pb;
use shoal_proto::v1::ca_client::CaClient;
use shoal_proto::v1::daemon_client::DaemonClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Silent connections while real clients must still be answered at once (below the
/// pending-handshake cap).
const SILENT: usize = 500;
/// Connections of each slow kind (stalled handshake, trickled preface).
const SLOW_EACH: usize = 5;
/// A flood beyond the pending-handshake cap: real clients then wait at most one timeout.
const FLOOD: usize = MAX_PENDING_HANDSHAKES + 400;
/// How fast "promptly" is for a real client's call while the port is under siege.
const PROMPT: Duration = Duration::from_secs(2);
/// Memory the server may grow by while holding all of them (generous: debug build).
const MAX_RSS_GROWTH_KIB: u64 = 128 * 1024;
/// Served connections the flood phase may see besides the pending handshakes.
const SERVED_ALLOWANCE: usize = 64;
/// How long opening the flood may take (a loaded 2-core machine, debug build).
const FLOOD_DEADLINE: Duration = Duration::from_secs(20);

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Soft fd limit up to the hard one: this process holds both ends of every connection.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    let need = (2 * FLOOD + 512) as u64;
    assert!(
        lim.rlim_cur >= need,
        "this test needs {need} file descriptors, the limit is {}",
        lim.rlim_cur
    );
}

/// Established connections to `port` this process holds the server end of (from
/// /proc/net/tcp and /proc/self/fd). A socket counts only if it is still established when the
/// table is read after the fds were, so every one counted had an open fd at that moment.
fn server_side(port: u16) -> usize {
    let mut mine = std::collections::HashSet::new();
    for e in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(l) = std::fs::read_link(e.path()) {
            if let Some(i) = l.to_string_lossy().strip_prefix("socket:[") {
                mine.insert(i.trim_end_matches(']').to_string());
            }
        }
    }
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    // Distinct sockets, not lines: /proc/net/tcp is read in several chunks, and while
    // connections open and close between them the kernel resumes at a shifted position and
    // lists some sockets twice (tens of them a scan under this test's churn).
    tcp.lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[3] == "01" && f[1].ends_with(&local) && mine.contains(f[9]))
        .map(|f| f[9].to_string())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// One real call through the same listener: the CA's public root-certificate method.
async fn real_call(addr: SocketAddr, ca_pem: &str) -> Duration {
    let t = Instant::now();
    let ch = anonymous_channel(&addr.to_string(), ca_pem).expect("channel");
    let r = tokio::time::timeout(
        HANDSHAKE_TIMEOUT * 3,
        CaClient::new(ch).get_root_certificate(pb::GetRootCertificateRequest {}),
    )
    .await
    .expect("a real client got no answer")
    .expect("root certificate call failed");
    assert!(!r.into_inner().ca_pem.is_empty());
    t.elapsed()
}

async fn silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).await.expect("connect"));
    }
    v
}

/// Connections that send the first bytes of a TLS ClientHello, then nothing.
async fn stalled_handshakes(addr: SocketAddr) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..SLOW_EACH {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // Record header claiming a 512-byte handshake message, then 4 bytes of it.
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
            .await
            .expect("write");
        v.push(s);
    }
    v
}

/// Completes TLS (no client certificate), then trickles the HTTP/2 preface a byte at a time.
fn trickling_clients(addr: SocketAddr, ca_pem: &str) -> Vec<tokio::task::JoinHandle<()>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca pem"))
        .expect("ca");
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    (0..SLOW_EACH)
        .map(|_| {
            let connector = connector.clone();
            tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let name = ServerName::from(addr.ip());
                let Ok(mut tls) = connector.connect(name, tcp).await else {
                    return;
                };
                for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
                    if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
                        return; // the server hung up: what we want
                    }
                    tokio::time::sleep(Duration::from_millis(700)).await;
                }
            })
        })
        .collect()
}

/// True once the server closed `s` (EOF or reset).
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a TLS alert, say
        }
    }
}

#[test]
fn silent_and_slow_clients_do_not_exhaust_the_manager_port() {
    raise_fd_limit();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_port();
        let socket = dir.path().join("shoal.sock");
        let data = dir.path().join("data");
        let mut cfg = DaemonConfig::new(&data, addr, socket.clone());
        cfg.hostname = Some("siege".into());
        let daemon = Daemon::start(cfg).await.expect("daemon");
        DaemonClient::new(connect_local(&socket).await.expect("socket"))
            .init(pb::InitRequest { advertise_addr: addr.to_string(), ..Default::default() })
            .await
            .expect("init");
        let ca_pem = std::fs::read_to_string(data.join("pki/ca.crt")).expect("ca.crt");
        real_call(addr, &ca_pem).await;
        let (fds0, rss0) = (fd_count(), rss_kib());

        // Phase 1: below the pending-handshake cap, real clients are not held up at all.
        let mut quiet = silent(addr, SILENT).await;
        let mut stalled = stalled_handshakes(addr).await;
        let trickle = trickling_clients(addr, &ca_pem);
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..5 {
            let took = real_call(addr, &ca_pem).await;
            assert!(took < PROMPT, "a real call took {took:?} beside {SILENT} silent connections");
        }
        let held = SILENT + 2 * SLOW_EACH;
        let fds1 = fd_count();
        // Both ends of each connection live in this process, plus a few per real call.
        assert!(fds1 <= fds0 + 2 * held + 64, "fds {fds0} -> {fds1} for {held} connections");

        // Every one of them is dropped by the server within the handshake timeout.
        let within = HANDSHAKE_TIMEOUT + Duration::from_secs(3);
        for s in quiet.iter_mut().chain(stalled.iter_mut()) {
            assert!(closed_by_server(s, within).await, "a silent or stalled connection was kept open");
        }
        for t in trickle {
            tokio::time::timeout(within, t).await.expect("a trickling client was kept open").expect("join");
        }
        // The server's ends are gone: only our own client ends remain.
        let fds2 = fd_count();
        assert!(fds2 <= fds0 + held + 64, "fds {fds0} -> {fds2}: the server kept connections it dropped");
        drop(quiet);
        drop(stalled);

        // Phase 2: a flood beyond the pending-handshake cap. The server holds at most the cap
        // (the rest wait in the kernel's backlog); a real client is answered within a timeout.
        let t0 = Instant::now();
        let mut flooding = tokio::spawn(silent(addr, FLOOD));
        let mut most_held = 0;
        let flood = loop {
            tokio::select! {
                r = &mut flooding => break r.expect("flood"),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    most_held = most_held.max(server_side(addr.port()));
                    assert!(t0.elapsed() < FLOOD_DEADLINE, "{FLOOD} connects took over {FLOOD_DEADLINE:?}");
                }
            }
        };
        most_held = most_held.max(server_side(addr.port()));
        // Pending handshakes are capped; connections already served (the real calls' channels,
        // closing in the background) come on top.
        assert!(
            most_held <= MAX_PENDING_HANDSHAKES + SERVED_ALLOWANCE,
            "the server held {most_held} connections, beyond its cap of {MAX_PENDING_HANDSHAKES} pending handshakes"
        );
        let fds3 = fd_count();
        let took = real_call(addr, &ca_pem).await;
        assert!(
            took < HANDSHAKE_TIMEOUT * 2 + PROMPT,
            "a real call took {took:?} behind a flood of {FLOOD}"
        );
        let rss = rss_kib();
        assert!(rss <= rss0 + MAX_RSS_GROWTH_KIB, "rss {rss0} KiB -> {rss} KiB");
        eprintln!(
            "fds: base {fds0}, {held} slow held {fds1}, after drop {fds2}, flood {fds3} (server held at most {most_held}, connects took {:?}); rss {rss0} -> {rss} KiB; flooded call {took:?}",
            t0.elapsed()
        );
        drop(flood);
        daemon.shutdown().await;
    });
}

/// A client without a certificate reaches only the CA: a large request to any other service
/// is refused before its body is read (the handler would refuse it too, but only after the
/// server had buffered and decoded it).
#[test]
fn anonymous_requests_beyond_the_ca_are_refused_before_decoding() {
    use shoal_proto::v1::control_client::ControlClient;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_port();
        let socket = dir.path().join("shoal.sock");
        let data = dir.path().join("data");
        let mut cfg = DaemonConfig::new(&data, addr, socket.clone());
        cfg.hostname = Some("anon".into());
        let daemon = Daemon::start(cfg).await.expect("daemon");
        DaemonClient::new(connect_local(&socket).await.expect("socket"))
            .init(pb::InitRequest {
                advertise_addr: addr.to_string(),
                cluster_name: String::new(),
                ..Default::default()
            })
            .await
            .expect("init");
        let ca_pem = std::fs::read_to_string(data.join("pki/ca.crt")).expect("ca.crt");
        let ch = anonymous_channel(&addr.to_string(), &ca_pem).expect("channel");
        let big = pb::CreateServiceRequest {
            spec: Some(pb::ServiceSpec {
                name: "x".repeat(3 << 20),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = ControlClient::new(ch.clone())
            .max_encoding_message_size(8 << 20)
            .create_service(big)
            .await
            .expect_err("an anonymous create was accepted");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(
            err.message().contains("client certificate is required"),
            "{err:?}"
        );
        // The same connection still serves the public CA method.
        CaClient::new(ch)
            .get_root_certificate(pb::GetRootCertificateRequest {})
            .await
            .expect("root certificate after a refused call");
        daemon.shutdown().await;
    });
}

/// A connection without a client certificate is closed after its lifetime, even while its
/// client (a tonic channel, which answers keepalive pings) would keep it idle forever.
#[test]
fn anonymous_connections_end_after_their_lifetime() {
    use shoal_manager::tls::ANONYMOUS_CONNECTION_LIFETIME;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_port();
        let socket = dir.path().join("shoal.sock");
        let data = dir.path().join("data");
        let mut cfg = DaemonConfig::new(&data, addr, socket.clone());
        cfg.hostname = Some("lifetime".into());
        let daemon = Daemon::start(cfg).await.expect("daemon");
        DaemonClient::new(connect_local(&socket).await.expect("socket"))
            .init(pb::InitRequest {
                advertise_addr: addr.to_string(),
                cluster_name: String::new(),
                ..Default::default()
            })
            .await
            .expect("init");
        let ca_pem = std::fs::read_to_string(data.join("pki/ca.crt")).expect("ca.crt");
        let ch = anonymous_channel(&addr.to_string(), &ca_pem).expect("channel");
        let opened = Instant::now();
        CaClient::new(ch.clone())
            .get_root_certificate(pb::GetRootCertificateRequest {})
            .await
            .expect("root certificate");
        assert_eq!(server_side(addr.port()), 1, "one anonymous connection open");
        let deadline = ANONYMOUS_CONNECTION_LIFETIME + Duration::from_secs(3);
        while server_side(addr.port()) > 0 {
            assert!(
                opened.elapsed() < deadline,
                "an idle anonymous connection outlived {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            opened.elapsed() + Duration::from_secs(1) >= ANONYMOUS_CONNECTION_LIFETIME,
            "closed after {:?}, before its lifetime",
            opened.elapsed()
        );
        // The channel reconnects for the next call.
        CaClient::new(ch)
            .get_root_certificate(pb::GetRootCertificateRequest {})
            .await
            .expect("root certificate on a new connection");
        daemon.shutdown().await;
    });
}
