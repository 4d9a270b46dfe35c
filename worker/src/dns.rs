//! The embedded DNS of a task container on cluster networks, as Docker's: a resolver at
//! `127.0.0.11:53` inside the container's own network namespace (the agent holds the socket),
//! answering `SERVICE` and `tasks.SERVICE` with the addresses of the service's running tasks
//! on the networks this container shares with it, from the records the dispatcher session
//! sends; every other name is forwarded to the host's resolvers. Messages are parsed and built
//! with hickory-proto.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use shoal_proto::v1 as pb;
use tokio::net::UdpSocket;

/// Where the resolver listens in every container (Docker's address).
pub const RESOLVER_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);
/// TTL of cluster answers: 0, so a client asks again and follows scale and failures at once.
const CLUSTER_TTL: u32 = 0;
/// Largest DNS message over UDP read or forwarded (EDNS sizes included).
const MAX_MESSAGE: usize = 4096;
/// How long a forwarded query waits for an upstream answer, each upstream in turn.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// The records of the node's cluster networks, shared by every resolver of the node.
pub type SharedRecords = Arc<RwLock<pb::ServiceRecords>>;

/// The addresses `name` resolves to for a container on `networks` (case-insensitive, trailing
/// dot optional): `SERVICE` → its virtual IP (endpoint mode vip) or its running tasks'
/// addresses (dnsrr); `tasks.SERVICE` → its running tasks' addresses. `None`: not a cluster
/// name (forward it); `Some(empty)`: a dnsrr service with no running task.
pub fn resolve(
    records: &pb::ServiceRecords,
    networks: &[String],
    name: &str,
) -> Option<Vec<Ipv4Addr>> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let (service, tasks) = match name.strip_prefix("tasks.") {
        Some(s) => (s, true),
        None => (name.as_str(), false),
    };
    let mut found = false;
    let mut out = Vec::new();
    for r in records
        .services
        .iter()
        .filter(|r| networks.contains(&r.network_id))
        .filter(|r| r.service_name.eq_ignore_ascii_case(service))
    {
        found = true;
        match (tasks, r.vip.parse::<Ipv4Addr>()) {
            (false, Ok(vip)) => out.push(vip),
            _ => out.extend(
                r.addresses
                    .iter()
                    .filter_map(|a| a.parse::<Ipv4Addr>().ok()),
            ),
        }
    }
    found.then_some(out)
}

/// The virtual IPs a container on `networks` balances, each with its running tasks.
pub fn vips(records: &pb::ServiceRecords, networks: &[String]) -> Vec<(Ipv4Addr, Vec<Ipv4Addr>)> {
    records
        .services
        .iter()
        .filter(|r| networks.contains(&r.network_id))
        .filter_map(|r| {
            let vip = r.vip.parse::<Ipv4Addr>().ok()?;
            Some((
                vip,
                r.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            ))
        })
        .collect()
}

/// The answer to one query message, or `None` when it is to be forwarded.
fn answer(query: &Message, records: &pb::ServiceRecords, networks: &[String]) -> Option<Message> {
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    if query.metadata.op_code != OpCode::Query || query.queries.len() != 1 {
        resp.metadata.response_code = ResponseCode::NotImp;
        return Some(resp);
    }
    let q = &query.queries[0];
    let addrs = resolve(records, networks, &q.name().to_ascii())?;
    resp.add_query(q.clone());
    resp.metadata.authoritative = true;
    if q.query_type() == RecordType::A {
        for a in addrs {
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                CLUSTER_TTL,
                RData::A(A(a)),
            ));
        }
    }
    // Any other type of a cluster name: no data (NOERROR, no answer).
    Some(resp)
}

async fn forward(packet: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("0.0.0.0:0").await.ok()?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    for up in upstream {
        if sock.send_to(packet, up).await.is_err() {
            continue;
        }
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(FORWARD_TIMEOUT, sock.recv_from(&mut buf)).await
        {
            if from == *up {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}

/// Serves one container's resolver on `sock` (bound in its namespace) until dropped or aborted.
pub async fn serve(
    sock: UdpSocket,
    networks: Vec<String>,
    records: SharedRecords,
    upstream: Arc<Vec<SocketAddr>>,
) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            return;
        };
        let packet = buf[..n].to_vec();
        let Ok(query) = Message::from_vec(&packet) else {
            continue; // not DNS: no answer, as a server does
        };
        if query.metadata.message_type != MessageType::Query {
            continue;
        }
        let local = {
            let r = records.read().unwrap_or_else(|p| p.into_inner());
            answer(&query, &r, &networks)
        };
        let (sock, upstream) = (sock.clone(), upstream.clone());
        tokio::spawn(async move {
            let reply = match local {
                Some(m) => m.to_vec().ok(),
                None => match forward(&packet, &upstream).await {
                    Some(r) => Some(r),
                    None => Message::error_msg(
                        query.metadata.id,
                        query.metadata.op_code,
                        ResponseCode::ServFail,
                    )
                    .to_vec()
                    .ok(),
                },
            };
            if let Some(r) = reply {
                let _ = sock.send_to(&r, from).await;
            }
        });
    }
}

/// The host's resolvers from a resolv.conf text (loopback ones included: the agent runs in
/// the host's namespace), on port 53.
pub fn upstream_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn records() -> pb::ServiceRecords {
        pb::ServiceRecords {
            ingress: None,
            services: vec![
                pb::ServiceRecord {
                    network_id: "n1".into(),
                    service_name: "web".into(),
                    addresses: vec!["10.0.0.2".into(), "10.0.0.3".into()],
                    vip: String::new(),
                },
                pb::ServiceRecord {
                    network_id: "n2".into(),
                    service_name: "db".into(),
                    addresses: vec![],
                    vip: String::new(),
                },
            ],
        }
    }

    #[test]
    fn services_with_a_virtual_ip_resolve_to_it() {
        let mut r = records();
        r.services[0].vip = "10.0.0.9".into();
        let on = vec!["n1".to_string()];
        assert_eq!(
            resolve(&r, &on, "web"),
            Some(vec![Ipv4Addr::new(10, 0, 0, 9)])
        );
        assert_eq!(resolve(&r, &on, "tasks.web").map(|v| v.len()), Some(2));
        let v = vips(&r, &on);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(v[0].1.len(), 2);
        assert!(vips(&r, &["n2".to_string()]).is_empty());
    }

    #[test]
    fn names_resolve_only_on_shared_networks() {
        let r = records();
        let on = |n: &str| vec![n.to_string()];
        let two = vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)];
        assert_eq!(resolve(&r, &on("n1"), "web."), Some(two.clone()));
        assert_eq!(resolve(&r, &on("n1"), "tasks.WEB"), Some(two));
        assert_eq!(resolve(&r, &on("n2"), "web"), None);
        assert_eq!(resolve(&r, &on("n2"), "db"), Some(vec![]));
        assert_eq!(resolve(&r, &on("n1"), "example.com."), None);
    }

    #[test]
    fn queries_are_answered_with_a_records_or_left_to_forward() {
        let r = records();
        let nets = vec!["n1".to_string()];
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("web.").unwrap(),
            RecordType::A,
        ));
        let wire = q.to_vec().unwrap();
        let parsed = Message::from_vec(&wire).unwrap();
        let a = answer(&parsed, &r, &nets).unwrap();
        let back = Message::from_vec(&a.to_vec().unwrap()).unwrap();
        assert_eq!(back.metadata.id, q.metadata.id);
        assert_eq!(back.metadata.response_code, ResponseCode::NoError);
        assert_eq!(back.answers.len(), 2);
        let mut q6 = Message::query();
        q6.add_query(Query::query(
            Name::from_ascii("web.").unwrap(),
            RecordType::AAAA,
        ));
        assert!(answer(&q6, &r, &nets).unwrap().answers.is_empty());
        let mut other = Message::query();
        other.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        assert!(answer(&other, &r, &nets).is_none());
        assert_eq!(
            upstream_from_resolv_conf("search x\nnameserver 127.0.0.53\nnameserver ::1\n"),
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
