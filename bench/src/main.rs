//! shoal's benchmarks, each run side by side with its peer in the same run, reporting medians
//! and ratios. Not timed tests: run them by hand (see BENCHMARKS.md) on a quiet machine.

mod bed;
mod cluster;
mod etcd;
mod failure;
mod fixture;
mod image_pull;
mod logs;
mod mesh;
mod node_loss;
mod overlay;
mod p2p;
mod publish;
mod runtime;
mod scale;
mod scale_answer;
mod scrape;
mod services;
mod stack;
mod stats;
mod update;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shoal-bench", about = "shoal benchmarks against their peers")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Start latency: `shoal runtime run` vs `runc run` on the same busybox /bin/true bundle, interleaved.
    RuntimeStart(runtime::StartArgs),
    /// Resident memory of the per-container monitor with N containers running.
    MonitorMemory(runtime::MemoryArgs),
    /// Write path: service updates on 3 managers vs etcd puts on 3 members, 1 and 64 clients.
    ClusterWrite(cluster::WriteArgs),
    /// Leader failover: kill -9 of the leader under writes, time to the next write (vs etcd).
    ClusterFailover(cluster::FailoverArgs),
    /// Memory of a manager idle and with 10,000 services (vs an etcd member).
    ClusterMemory(cluster::MemoryArgs),
    /// One node: `service create --replicas N` until all run, then scale to 0 (vs swarm mode).
    ServiceConverge(services::ConvergeArgs),
    /// One node: `stack deploy` of S services × R replicas until all run (vs `docker stack deploy`).
    StackDeploy(stack::StackArgs),
    /// Kill a worker (agent and containers) running N tasks: time until all run elsewhere.
    NodeFailure(failure::FailureArgs),
    /// One node: a rolling update of N replicas, parallelism P, until completed (vs swarm mode).
    ServiceUpdate(update::UpdateArgs),
    /// 3 drained managers + N hollow nodes: a service of R replicas until all run.
    Scale(scale::ScaleArgs),
    /// A published port of one busybox httpd: wrk requests/s, latency and connections/s (vs Docker).
    Publish(publish::PublishArgs),
    /// A ~200 MiB image of 5 gzip layers from a local registry: `shoal image pull` vs
    /// `skopeo copy` and `docker pull` (if dockerd runs), interleaved, each into an empty place.
    ImagePull(image_pull::ImagePullArgs),
    /// Test bed, 2 hosts: TCP throughput (iperf3) and round trips between two tasks over a
    /// cluster network (VXLAN) vs the hosts' own underlay path.
    Overlay(overlay::OverlayArgs),
    /// Test bed: an ingress-published httpd task, wrk connections/s and p99 through the mesh
    /// (a node without the task) vs straight to the task.
    Mesh(mesh::MeshArgs),
    /// Test bed, 2 hosts: time from `service scale web=N+1` until the new task answers on the
    /// service's VIP.
    ScaleAnswer(scale_answer::ScaleAnswerArgs),
    /// Test bed, 2 hosts: time from cutting a node off until no connection to the service's
    /// VIP goes to its task.
    NodeLoss(node_loss::NodeLossArgs),
    /// Test bed, 3 nodes, the registry's bandwidth limited: a new image to every node,
    /// peer-to-peer layers vs every node pulling from the registry.
    P2pPull(p2p::P2pArgs),
    /// (internal to `overlay`) serves one round-trip client.
    #[command(hide = true)]
    RrServer(overlay::RrServerArgs),
    /// (internal to `overlay`) times 1-byte round trips to an rr-server.
    #[command(hide = true)]
    RrClient(overlay::RrClientArgs),
    /// One node: `service logs -f` lines/s and MB/s from N tasks writing as fast as they can
    /// (vs `docker service logs -f` on a one-node swarm).
    ServiceLogs(logs::LogsArgs),
    /// Runs N hollow nodes (own key, certificate, session; sim executor) in this process.
    HollowNodes(scale::HollowArgs),
    /// 3 managers, N replicas: time, size and agent CPU of one scrape of `--metrics-addr`.
    MetricsScrape(scrape::ScrapeArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::RuntimeStart(a) => runtime::start_latency(&a),
        Bench::MonitorMemory(a) => runtime::monitor_memory(&a),
        Bench::ClusterWrite(a) => cluster::write_path(&a),
        Bench::ClusterFailover(a) => cluster::failover(&a),
        Bench::ClusterMemory(a) => cluster::memory(&a),
        Bench::ServiceConverge(a) => services::converge(&a),
        Bench::StackDeploy(a) => stack::stack_deploy(&a),
        Bench::NodeFailure(a) => failure::node_failure(&a),
        Bench::ServiceUpdate(a) => update::service_update(&a),
        Bench::Scale(a) => scale::scale(&a),
        Bench::Publish(a) => publish::publish(&a),
        Bench::ImagePull(a) => image_pull::image_pull(&a),
        Bench::Overlay(a) => overlay::overlay(&a),
        Bench::Mesh(a) => mesh::mesh(&a),
        Bench::ScaleAnswer(a) => scale_answer::scale_answer(&a),
        Bench::NodeLoss(a) => node_loss::node_loss(&a),
        Bench::P2pPull(a) => p2p::p2p(&a),
        Bench::RrServer(a) => overlay::rr_server(&a),
        Bench::RrClient(a) => overlay::rr_client(&a),
        Bench::HollowNodes(a) => scale::hollow_nodes(&a),
        Bench::ServiceLogs(a) => logs::service_logs(&a),
        Bench::MetricsScrape(a) => scrape::metrics_scrape(&a),
    };
    if let Err(e) = result {
        eprintln!("shoal-bench: {e:#}");
        std::process::exit(1);
    }
}
