//! `shoal agent --metrics-addr ADDR`: the node's Prometheus metrics over plain HTTP, `GET
//! /metrics` (the Prometheus text format, 0.0.4); any other path is 404. A small hyper server
//! of its own, so that another page (a dashboard) can be served the same way on its own port.
//! The series: docs/design/metrics.md.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Connections served at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 16;
/// A request's headers must arrive within this (an idle kept-alive connection closes after it).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the metrics address: done first thing, so that a bad or taken address stops the
/// agent before anything starts.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
    l.set_nonblocking(true)
        .with_context(|| format!("--metrics-addr {addr}"))?;
    Ok(l)
}

/// Every series of the node: the manager's (while it is one), the worker agent's and its
/// containers', the process's.
pub fn registry(
    managers: shoal_manager::controlapi::ApiSlot,
    tasks: shoal_manager::daemon::LocalTasksSlot,
    executor: Arc<dyn shoal_worker::Executor>,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(shoal_manager::metrics::ManagerCollector::new(
        managers,
    )));
    r.register_collector(Box::new(shoal_worker::metrics::WorkerCollector::new(
        tasks,
        Some(executor),
    )));
    r.register_collector(Box::new(shoal_worker::metrics::process::ProcessCollector));
    r
}

/// Serves `registry` on `listener` until `stop` turns true.
pub async fn serve(
    listener: std::net::TcpListener,
    registry: Registry,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: {e}");
            return;
        }
    };
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "serving metrics");
    }
    let registry = Arc::new(registry);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => tokio::select! {
                    _ = stop.changed() => return,
                    a = listener.accept() => a.map(|a| (a, p)),
                },
                Err(_) => return,
            },
        };
        let ((tcp, _peer), permit) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: the next accept may do.
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(answer(&req, registry).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {}
            }
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `GET /metrics`: every series, encoded off the async runtime (collectors read files).
async fn answer(req: &Request<Incoming>, registry: Arc<Registry>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let encoded = tokio::task::spawn_blocking(move || {
        let mut out = String::with_capacity(64 * 1024);
        prometheus_text::encode(&mut out, &registry).map(|()| out)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
            );
            r
        }
        _ => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be encoded\n",
        ),
    }
}
