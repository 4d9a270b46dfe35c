//! Every node's Prometheus series: the worker agent's (tasks by state, container starts, image
//! pulls), its containers' usage from their cgroups (v1 and v2), and the process's own
//! (`process.rs`). docs/design/metrics.md.
//!
//! Starts and pulls are counted where they happen ([`get`]); tasks, container usage and the
//! process are read at scrape time by [`WorkerCollector`] and [`process::ProcessCollector`]
//! (file reads: encode them off the async runtime).

pub mod process;

use std::sync::{Arc, LazyLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use shoal_manager::daemon::LocalTasksSlot;
use shoal_manager::metrics::{put, put_gauges, Label};
use shoal_proto::v1::{Task, TaskState};

use crate::Executor;

/// Buckets of container starts (network, rootfs, the create subprocess), 10 ms to 60 s.
pub const START_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The task states a node's agent holds tasks in, as the metrics name them.
pub const STATES: [(TaskState, &str); 10] = [
    (TaskState::Assigned, "assigned"),
    (TaskState::Accepted, "accepted"),
    (TaskState::Preparing, "preparing"),
    (TaskState::Ready, "ready"),
    (TaskState::Starting, "starting"),
    (TaskState::Running, "running"),
    (TaskState::Complete, "complete"),
    (TaskState::Shutdown, "shutdown"),
    (TaskState::Failed, "failed"),
    (TaskState::Rejected, "rejected"),
];

/// The worker's event metrics.
#[derive(Debug)]
pub struct Metrics {
    starts: Family<Label, Counter>,
    /// Time a successful container start took (network, rootfs, create, start).
    pub start_seconds: Histogram,
    pulls: Family<Label, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let starts: Family<Label, Counter> = Family::default();
        let pulls: Family<Label, Counter> = Family::default();
        for r in ["ok", "error"] {
            starts.get_or_create_owned(&[("result", r)]);
            pulls.get_or_create_owned(&[("result", r)]);
        }
        Metrics {
            starts,
            start_seconds: Histogram::new(START_BUCKETS),
            pulls,
        }
    }

    /// Counts a container start that succeeded after `seconds`, or failed.
    pub fn started(&self, ok: bool, seconds: f64) {
        self.starts
            .get_or_create(&[("result", if ok { "ok" } else { "error" })])
            .inc();
        if ok {
            self.start_seconds.observe(seconds);
        }
    }

    /// Counts an image pull from a registry (or peers) for a task.
    pub fn pulled(&self, ok: bool) {
        self.pulls
            .get_or_create(&[("result", if ok { "ok" } else { "error" })])
            .inc();
    }
}

/// The process's worker event metrics.
pub fn get() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// One running task's container, as the usage series label it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerSample {
    pub task: String,
    pub service: String,
    pub stats: shoal_runtime::cgroups::CgroupStats,
}

/// What a node's agent tells at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Tasks the agent holds, per state of [`STATES`].
    pub tasks: Vec<(&'static str, u64)>,
    /// Its running tasks' containers.
    pub containers: Vec<ContainerSample>,
}

impl Sample {
    /// Counts `tasks` by state and reads the cgroups of the running ones through `executor`.
    pub fn read(tasks: &[Task], executor: Option<&dyn Executor>) -> Sample {
        let state = |t: &Task| t.status.as_ref().map_or(0, |s| s.state);
        let counts = STATES
            .iter()
            .map(|(s, name)| {
                let n = tasks.iter().filter(|t| state(t) == *s as i32).count();
                (*name, n as u64)
            })
            .collect();
        let containers = executor.map_or_else(Vec::new, |exec| {
            tasks
                .iter()
                .filter(|t| state(t) == TaskState::Running as i32)
                .filter_map(|t| {
                    let id = t.meta.as_ref()?.id.clone();
                    let stats = exec.stats(&id)?;
                    Some(ContainerSample {
                        task: id,
                        service: t.service_name.clone(),
                        stats,
                    })
                })
                .collect()
        });
        Sample {
            tasks: counts,
            containers,
        }
    }
}

/// Writes one series per container of `samples`, each valued by `value`.
fn put_containers<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    ty: MetricType,
    samples: &[ContainerSample],
    value: impl Fn(&shoal_runtime::cgroups::CgroupStats) -> V,
) -> std::fmt::Result
where
    ConstCounter<V>: EncodeMetric,
    ConstGauge<V>: EncodeMetric,
{
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), ty)?;
    for c in samples {
        let labels = [("service", c.service.as_str()), ("task", c.task.as_str())];
        let v = value(&c.stats);
        let into = m.encode_family(&labels)?;
        match ty {
            MetricType::Counter => ConstCounter::new(v).encode(into)?,
            _ => ConstGauge::new(v).encode(into)?,
        }
    }
    Ok(())
}

/// Writes the worker and container series: `sample` (read now) and the event metrics.
pub fn encode(sample: &Sample, enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let m = get();
    put_gauges(
        enc,
        "shoal_worker_tasks",
        "Tasks this node's agent holds, by state.",
        None,
        "state",
        sample.tasks.iter().map(|(s, n)| (*s, *n as i64)),
    )?;
    put(
        enc,
        "shoal_worker_container_starts",
        "Task containers this node started (result: ok or error).",
        None,
        &m.starts,
    )?;
    put(
        enc,
        "shoal_worker_container_start_duration",
        "Time a successful task container start took (network, rootfs, create, start).",
        Some(Unit::Seconds),
        &m.start_seconds,
    )?;
    put(
        enc,
        "shoal_worker_image_pulls",
        "Image pulls for tasks, from a registry or peers (result: ok or error).",
        None,
        &m.pulls,
    )?;
    let c = &sample.containers;
    put_containers(
        enc,
        "shoal_container_cpu_usage",
        "CPU time a running task's container used (its cgroup).",
        Some(Unit::Seconds),
        MetricType::Counter,
        c,
        |s| s.cpu_usage_ns as f64 / 1e9,
    )?;
    put_containers(
        enc,
        "shoal_container_memory_usage",
        "Memory a running task's container uses (its cgroup).",
        Some(Unit::Bytes),
        MetricType::Gauge,
        c,
        |s| s.memory_usage,
    )?;
    put_containers(
        enc,
        "shoal_container_pids",
        "Processes in a running task's container.",
        None,
        MetricType::Gauge,
        c,
        |s| s.pids_current,
    )?;
    put_containers(
        enc,
        "shoal_container_oom_kills",
        "Processes of a running task's container the OOM killer killed.",
        None,
        MetricType::Counter,
        c,
        |s| s.oom_kills,
    )
}

/// The worker and container series of this node: its agent's tasks (none while it is in no
/// cluster) and, with an executor of real containers, their cgroups.
#[derive(Clone)]
pub struct WorkerCollector {
    tasks: LocalTasksSlot,
    executor: Option<Arc<dyn Executor>>,
}

impl WorkerCollector {
    /// Reads the tasks the daemon's agent holds and their containers through `executor`.
    pub fn new(tasks: LocalTasksSlot, executor: Option<Arc<dyn Executor>>) -> WorkerCollector {
        WorkerCollector { tasks, executor }
    }
}

impl std::fmt::Debug for WorkerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCollector").finish_non_exhaustive()
    }
}

impl Collector for WorkerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let tasks = self.tasks.tasks();
        encode(&Sample::read(&tasks, self.executor.as_deref()), &mut enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct Fixed(Sample);

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            encode(&self.0, &mut enc)
        }
    }

    fn task(id: &str, state: TaskState) -> Task {
        Task {
            meta: Some(shoal_proto::v1::Meta {
                id: id.into(),
                ..Default::default()
            }),
            service_name: "web".into(),
            status: Some(shoal_proto::v1::TaskStatus {
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn tasks_are_counted_by_state() {
        let tasks = [
            task("a", TaskState::Running),
            task("b", TaskState::Running),
            task("c", TaskState::Failed),
        ];
        let s = Sample::read(&tasks, None);
        let n = |st: &str| s.tasks.iter().find(|(x, _)| *x == st).unwrap().1;
        assert_eq!((n("running"), n("failed"), n("assigned")), (2, 1, 0));
        assert!(s.containers.is_empty(), "no executor, no containers read");
    }

    #[test]
    fn the_worker_series_are_named_and_typed_as_prometheus_wants() {
        get().started(true, 0.3);
        get().started(false, 0.0);
        get().pulled(true);
        let sample = Sample {
            tasks: vec![("running", 2), ("failed", 1)],
            containers: vec![ContainerSample {
                task: "t1".into(),
                service: "web".into(),
                stats: shoal_runtime::cgroups::CgroupStats {
                    cpu_usage_ns: 1_500_000_000,
                    memory_usage: 4 << 20,
                    pids_current: 2,
                    ..Default::default()
                },
            }],
        };
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Fixed(sample)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &reg).unwrap();
        for line in [
            "# TYPE shoal_worker_tasks gauge",
            "shoal_worker_tasks{state=\"running\"} 2",
            "# TYPE shoal_worker_container_starts_total counter",
            "shoal_worker_container_starts_total{result=\"ok\"} 1",
            "shoal_worker_container_starts_total{result=\"error\"} 1",
            "# TYPE shoal_worker_container_start_duration_seconds histogram",
            "shoal_worker_container_start_duration_seconds_count 1",
            "shoal_worker_container_start_duration_seconds_bucket{le=\"0.5\"} 1",
            "# TYPE shoal_worker_image_pulls_total counter",
            "shoal_worker_image_pulls_total{result=\"ok\"} 1",
            "# TYPE shoal_container_cpu_usage_seconds_total counter",
            "shoal_container_cpu_usage_seconds_total{service=\"web\",task=\"t1\"} 1.5",
            "# TYPE shoal_container_memory_usage_bytes gauge",
            "shoal_container_memory_usage_bytes{service=\"web\",task=\"t1\"} 4194304",
            "shoal_container_pids{service=\"web\",task=\"t1\"} 2",
            "# TYPE shoal_container_oom_kills_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }
}
