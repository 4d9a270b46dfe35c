//! What the cluster commands share: the local socket, `--format`, docker-like tables, the
//! JSON views of cluster objects, and the units users type (durations, sizes, CPUs).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use shoal_proto::v1 as pb;
use tonic::transport::Channel;

/// The daemon's local control socket.
#[derive(Args, Clone, Debug)]
pub struct SocketArg {
    /// The shoal daemon's control socket
    #[arg(long, global = true, env = "SHOAL_SOCKET", default_value = shoal_manager::daemon::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

impl SocketArg {
    /// A channel to the local daemon.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(shoal_manager::daemon::connect_local(&self.socket).await?)
    }
}

/// How results are printed.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns, as docker prints them
    Table,
    /// JSON
    Json,
}

/// A blocking entry point for an async command (the CLI makes one call at a time, on a
/// runtime of its own that starts no thread: the front door stays single-threaded).
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

/// The answer of a call, or its error message as the user should read it.
pub fn rpc<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(|r| r.into_inner())
        .map_err(|s| anyhow!("{}", s.message()))
}

/// The control client the cluster commands use.
pub type Control = pb::control_client::ControlClient<Channel>;

/// Calls `method` on `c` for every page of the listing `req` starts and hands each page's
/// items to `each` as it arrives (`shoal_proto::paging`).
#[macro_export]
macro_rules! each_page {
    ($c:expr, $method:ident, $req:expr, $each:expr) => {
        shoal_proto::paging::each_page(
            $req,
            |r| {
                let mut c = $c.clone();
                async move { $crate::cmd::output::rpc(c.$method(r).await) }
            },
            $each,
        )
    };
}

macro_rules! lists {
    ($($(#[$doc:meta])* $name:ident: $method:ident($req:ident) -> $item:ident;)*) => {$(
        $(#[$doc])*
        pub async fn $name(c: &Control, req: pb::$req) -> anyhow::Result<Vec<pb::$item>> {
            shoal_proto::paging::all_pages(req, |r| {
                let mut c = c.clone();
                async move { rpc(c.$method(r).await) }
            })
            .await
        }
    )*};
}

lists! {
    /// Every node, page after page.
    all_nodes: list_nodes(ListNodesRequest) -> Node;
    /// Every service (that `req` filters), with its task counts, page after page.
    all_services: list_services(ListServicesRequest) -> ServiceSummary;
    /// Every task (that `req` filters), page after page.
    all_tasks: list_tasks(ListTasksRequest) -> Task;
    /// Every network, page after page.
    all_networks: list_networks(ListNetworksRequest) -> Network;
    /// Every secret (without its data), page after page.
    all_secrets: list_secrets(ListSecretsRequest) -> Secret;
    /// Every config (without its data), page after page.
    all_configs: list_configs(ListConfigsRequest) -> Config;
}

/// A JSON array printed as its items arrive, the same text `print_json` prints for the whole
/// array (serde_json's pretty form: two spaces per level).
pub struct JsonArray<W: std::io::Write = std::io::Stdout> {
    out: W,
    first: bool,
}

impl JsonArray {
    /// Starts the array on stdout.
    pub fn start() -> JsonArray {
        JsonArray::to(std::io::stdout())
    }
}

impl<W: std::io::Write> JsonArray<W> {
    /// Starts the array on `out`.
    pub fn to(out: W) -> JsonArray<W> {
        JsonArray { out, first: true }
    }

    /// Prints one item.
    pub fn item(&mut self, v: &Value) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(v)?;
        writeln!(self.out, "{}", if self.first { "[" } else { "," })?;
        self.first = false;
        for (i, line) in text.lines().enumerate() {
            if i > 0 {
                writeln!(self.out)?;
            }
            write!(self.out, "  {line}")?;
        }
        Ok(())
    }

    /// Ends the array.
    pub fn end(mut self) -> anyhow::Result<()> {
        if self.first {
            writeln!(self.out, "[]")?;
        } else {
            writeln!(self.out, "\n]")?;
        }
        self.out.flush()?;
        Ok(())
    }
}

/// Prints JSON, pretty.
pub fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Columns padded to the widest cell plus three spaces, like docker's tabwriter.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row.
    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 3));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

// ---- units ----

/// "1h30m", "500ms", "10s", "90d" → milliseconds.
pub fn parse_duration_ms(s: &str) -> anyhow::Result<u64> {
    let bad = || anyhow!("invalid duration {s:?}: expected e.g. 500ms, 10s, 5m, 2h, 90d");
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    if rest == "0" {
        return Ok(0);
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            "d" => 86_400_000.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        // `as` saturates: a term beyond u64 must be refused, not turned into u64::MAX.
        let ms = (n * mult).round();
        if !ms.is_finite() || ms >= u64::MAX as f64 {
            return Err(bad());
        }
        total = total.checked_add(ms as u64).ok_or_else(bad)?;
    }
    Ok(total)
}

/// A point in time as docker's `--since`/`--until` take it: an RFC 3339 timestamp, Unix
/// seconds (with a fraction), or a duration before `now_ms` ("10m") → ms since the epoch.
pub fn parse_time_ms(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    if let Some(secs) = shoal_runtime::image::parse_rfc3339(s) {
        return Ok(secs.saturating_mul(1000));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = s
            .parse()
            .map_err(|_| anyhow!("invalid time {s:?}: expected a timestamp or a duration"))?;
        return Ok((secs * 1000.0) as i64);
    }
    let ago = parse_duration_ms(s).map_err(|_| {
        anyhow!(
            "invalid time {s:?}: expected an RFC 3339 timestamp, Unix seconds or a duration (10m)"
        )
    })?;
    Ok(now_ms.saturating_sub(i64::try_from(ago).unwrap_or(i64::MAX)))
}

/// Milliseconds since the epoch as docker prints event times: RFC 3339, nanoseconds, UTC.
pub fn format_time_ms(ms: i64) -> String {
    let whole = shoal_runtime::image::format_unix(ms.div_euclid(1000));
    format!(
        "{}.{:03}000000Z",
        whole.trim_end_matches('Z'),
        ms.rem_euclid(1000)
    )
}

/// Milliseconds as a short duration: "100ms", "1s", "1m30s", "90d".
pub fn format_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 || !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut s = ms / 1000;
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    out
}

/// "512m", "1g", "100k", "1048576" → bytes.
pub fn parse_bytes(s: &str) -> anyhow::Result<i64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("invalid size {s:?}: expected e.g. 512m or 1g"))?;
    if n < 0.0 {
        bail!("invalid size {s:?}: must not be negative");
    }
    // NaN, infinities and sizes beyond i64 would otherwise become 0 or i64::MAX silently.
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes >= i64::MAX as f64 {
        bail!("invalid size {s:?}: expected e.g. 512m or 1g");
    }
    Ok(bytes as i64)
}

/// "0.5", "2" → nano-CPUs.
pub fn parse_cpus(s: &str) -> anyhow::Result<i64> {
    let n: f64 = s
        .trim()
        .parse()
        .map_err(|_| anyhow!("invalid CPU count {s:?}: expected e.g. 0.5 or 2"))?;
    if !(0.0..=1_000_000.0).contains(&n) {
        bail!("invalid CPU count {s:?}");
    }
    Ok((n * 1e9) as i64)
}

/// `KEY=VALUE` pairs (a bare `KEY` has an empty value).
pub fn parse_kv(items: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    items
        .iter()
        .map(|s| {
            let (k, v) = s.split_once('=').unwrap_or((s.as_str(), ""));
            if k.is_empty() {
                bail!("invalid label {s:?}: expected KEY=VALUE");
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

// ---- names ----

/// `manager` / `worker`.
pub fn role_name(r: i32) -> &'static str {
    match pb::NodeRole::try_from(r) {
        Ok(pb::NodeRole::Manager) => "manager",
        _ => "worker",
    }
}

/// Docker's capitalised availability.
pub fn availability_name(a: i32) -> &'static str {
    match pb::NodeAvailability::try_from(a) {
        Ok(pb::NodeAvailability::Pause) => "Pause",
        Ok(pb::NodeAvailability::Drain) => "Drain",
        _ => "Active",
    }
}

/// Docker's capitalised node state.
pub fn state_name(s: i32) -> &'static str {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::Ready) => "Ready",
        Ok(pb::NodeState::Down) => "Down",
        Ok(pb::NodeState::Disconnected) => "Disconnected",
        _ => "Unknown",
    }
}

/// Leader / Reachable / Unreachable, or empty for a worker.
pub fn manager_status_name(n: &pb::Node) -> &'static str {
    match (&n.manager_status, n.role == pb::NodeRole::Manager as i32) {
        (Some(m), true) if m.leader => "Leader",
        (Some(m), true) if m.reachable => "Reachable",
        (Some(_), true) => "Unreachable",
        _ => "",
    }
}

fn enum_name(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase()
}

fn meta_json(m: &Option<pb::Meta>) -> (String, Value) {
    let m = m.clone().unwrap_or_default();
    (
        m.id.clone(),
        json!({"Index": m.version, "CreatedAtMs": m.created_at_ms, "UpdatedAtMs": m.updated_at_ms}),
    )
}

/// A node as `node inspect` shows it.
pub fn node_json(n: &pb::Node) -> Value {
    let (id, version) = meta_json(&n.meta);
    let spec = n.spec.clone().unwrap_or_default();
    let desc = n.description.clone().unwrap_or_default();
    let status = n.status.clone().unwrap_or_default();
    let res = desc.resources.unwrap_or_default();
    json!({
        "ID": id,
        "Version": version,
        "Spec": {
            "Role": role_name(spec.desired_role),
            "Availability": availability_name(spec.availability).to_ascii_lowercase(),
            "Labels": spec.labels,
        },
        "Role": role_name(n.role),
        "Description": {
            "Hostname": desc.hostname,
            "OS": desc.os,
            "Architecture": desc.arch,
            "Resources": {"NanoCPUs": res.nano_cpus, "MemoryBytes": res.memory_bytes},
        },
        "Status": {"State": state_name(status.state).to_ascii_lowercase(), "Message": status.message, "Addr": status.addr},
        "ManagerStatus": n.manager_status.as_ref().filter(|_| n.role == pb::NodeRole::Manager as i32).map(|m| json!({
            "RaftID": m.raft_id, "Addr": m.addr, "Leader": m.leader,
            "Reachability": if m.reachable { "reachable" } else { "unreachable" },
        })),
        "CertificateSerial": n.certificate_serial,
    })
}

fn resources_json(r: &Option<pb::Resources>) -> Value {
    let r = (*r).unwrap_or_default();
    json!({"NanoCPUs": r.nano_cpus, "MemoryBytes": r.memory_bytes})
}

fn update_json(u: &Option<pb::UpdateConfig>) -> Value {
    match u {
        None => Value::Null,
        Some(u) => json!({
            "Parallelism": u.parallelism,
            "Delay": format_ms(u.delay_ms),
            "FailureAction": enum_name(u.failure_action().as_str_name(), "FAILURE_ACTION_"),
            "Monitor": format_ms(u.monitor_ms),
            "MaxFailureRatio": u.max_failure_ratio,
            "Order": enum_name(u.order().as_str_name(), "UPDATE_ORDER_").replace('_', "-"),
        }),
    }
}

/// A service spec, whole.
pub fn service_spec_json(s: &pb::ServiceSpec) -> Value {
    let task = s.task.clone().unwrap_or_default();
    let c = task.container.clone().unwrap_or_default();
    let res = task.resources.unwrap_or_default();
    let restart = task.restart.unwrap_or_default();
    let placement = task.placement.clone().unwrap_or_default();
    let mode = match &s.mode {
        Some(pb::service_spec::Mode::Replicated(r)) => {
            json!({"Replicated": {"Replicas": r.replicas}})
        }
        Some(pb::service_spec::Mode::Global(_)) => json!({"Global": {}}),
        None => Value::Null,
    };
    json!({
        "Name": s.name,
        "Labels": s.labels,
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": c.image, "Command": c.command, "Args": c.args, "Env": c.env, "Dir": c.dir,
                "User": c.user, "Hostname": c.hostname, "Labels": c.labels,
                "StopGracePeriod": format_ms(c.stop_grace_period_ms), "ReadOnly": c.read_only,
                "PidsLimit": c.pids_limit,
                "Mounts": c.mounts.iter().map(mount_json).collect::<Vec<_>>(),
                "Secrets": c.secrets.iter().map(|r| json!({
                    "File": {"Name": r.target, "UID": r.uid.to_string(), "GID": r.gid.to_string(), "Mode": r.mode},
                    "SecretID": r.id, "SecretName": r.name})).collect::<Vec<_>>(),
                "Configs": c.configs.iter().map(|r| json!({
                    "File": {"Name": r.target, "UID": r.uid.to_string(), "GID": r.gid.to_string(), "Mode": r.mode},
                    "ConfigID": r.id, "ConfigName": r.name})).collect::<Vec<_>>(),
                "Healthcheck": c.healthcheck.as_ref().map(|h| json!({
                    "Test": h.test, "Interval": format_ms(h.interval_ms), "Timeout": format_ms(h.timeout_ms),
                    "Retries": h.retries, "StartPeriod": format_ms(h.start_period_ms)})),
            },
            "Resources": {"Limits": resources_json(&res.limits), "Reservations": resources_json(&res.reservations)},
            "RestartPolicy": {
                "Condition": enum_name(restart.condition().as_str_name(), "RESTART_CONDITION_").replace('_', "-"),
                "Delay": format_ms(restart.delay_ms), "MaxAttempts": restart.max_attempts,
                "Window": format_ms(restart.window_ms),
            },
            "Placement": {
                "Constraints": placement.constraints,
                "Preferences": placement.preferences.iter().map(|p| json!({"Spread": p.spread_descriptor})).collect::<Vec<_>>(),
                "MaxReplicas": placement.max_replicas_per_node,
            },
            "Networks": task.networks.iter().map(|n| json!({
                "Target": n,
                "Aliases": task.network_aliases.iter().filter(|a| a.network == *n).flat_map(|a| a.aliases.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "ForceUpdate": task.force_update,
        },
        "Mode": mode,
        "UpdateConfig": update_json(&s.update),
        "RollbackConfig": update_json(&s.rollback),
        "EndpointSpec": {"Ports": s.ports.iter().map(|p| json!({
            "Name": p.name, "Protocol": p.protocol, "TargetPort": p.target_port,
            "PublishedPort": p.published_port, "PublishMode": p.publish_mode})).collect::<Vec<_>>()},
    })
}

/// A task's mount as docker's `service inspect` shows it.
fn mount_json(m: &pb::Mount) -> Value {
    let mut v = json!({
        "Type": if m.r#type == pb::MountType::Volume as i32 { "volume" } else { "bind" },
        "Source": m.source,
        "Target": m.target,
    });
    if m.read_only {
        v["ReadOnly"] = json!(true);
    }
    if m.volume_nocopy || !m.volume_labels.is_empty() {
        v["VolumeOptions"] = json!({"NoCopy": m.volume_nocopy, "Labels": m.volume_labels});
    }
    v
}

/// A service as `service inspect` shows it.
pub fn service_json(s: &pb::Service) -> Value {
    let (id, version) = meta_json(&s.meta);
    let us = s.update_status.clone();
    json!({
        "ID": id,
        "Version": version,
        "Spec": service_spec_json(&s.spec.clone().unwrap_or_default()),
        "PreviousSpec": s.previous_spec.as_ref().map(service_spec_json),
        "SpecVersion": s.spec_version,
        "Endpoint": {
            "VirtualIPs": s.virtual_ips.iter().map(|v| json!({"NetworkID": v.network_id, "Addr": v.address})).collect::<Vec<_>>(),
        },
        "UpdateStatus": us.map(|u| json!({
            "State": enum_name(u.state().as_str_name(), "UPDATE_STATE_"),
            "StartedAtMs": u.started_at_ms, "CompletedAtMs": u.completed_at_ms, "Message": u.message})),
    })
}

/// The cluster as `cluster inspect` shows it (join tokens left out, as docker does).
pub fn cluster_json(c: &pb::ClusterResponse) -> Value {
    let cl = c.cluster.clone().unwrap_or_default();
    let (id, version) = meta_json(&cl.meta);
    let spec = cl.spec.unwrap_or_default();
    let raft = spec.raft.unwrap_or_default();
    let d = spec.dispatcher.unwrap_or_default();
    json!({
        "ID": id,
        "Version": version,
        "Spec": {
            "Name": spec.name,
            "Raft": {
                "HeartbeatInterval": format_ms(raft.heartbeat_interval_ms),
                "ElectionTimeoutMin": format_ms(raft.election_timeout_min_ms),
                "ElectionTimeoutMax": format_ms(raft.election_timeout_max_ms),
                "SnapshotInterval": raft.snapshot_interval,
                "KeepOldSnapshots": raft.keep_old_entries,
            },
            "Dispatcher": {
                "HeartbeatPeriod": format_ms(d.heartbeat_period_ms),
                "MissedHeartbeatsBeforeDown": d.missed_heartbeats_down,
                "StatusBatchWindow": format_ms(d.status_batch_ms),
                "StatusBatchMax": d.status_batch_max,
            },
            "CAConfig": {"NodeCertExpiry": format_ms(spec.ca.unwrap_or_default().node_cert_lifetime_ms)},
            "Orchestration": {"TaskHistoryRetentionLimit": spec.orchestration.unwrap_or_default().task_history_per_slot},
            "Network": {"VNIStart": match spec.network.map_or(0, |n| n.vni_start) {
                0 => 4096,
                v => v,
            }},
        },
        "RootCACert": cl.root_ca_cert_pem,
        "Raft": {"LeaderNodeID": c.leader_node_id, "Term": c.raft_term, "LastApplied": c.raft_last_applied},
    })
}

/// A node's short id and hostname, as tables show them.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() {
        assert_eq!(parse_duration_ms("100ms").unwrap(), 100);
        assert_eq!(parse_duration_ms("1m30s").unwrap(), 90_000);
        assert_eq!(parse_duration_ms("90d").unwrap(), 90 * 86_400_000);
        assert!(parse_duration_ms("10").is_err());
        assert!(parse_duration_ms("abc").is_err());
        assert_eq!(format_ms(90_000), "1m30s");
        assert_eq!(format_ms(100), "100ms");
        assert_eq!(format_ms(90 * 86_400_000), "90d");
    }

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert!(parse_bytes("x").is_err());
        assert_eq!(parse_cpus("0.5").unwrap(), 500_000_000);
        assert!(parse_cpus("-1").is_err());
    }

    #[test]
    fn a_json_array_printed_item_by_item_reads_as_the_whole_one() {
        let items = [
            json!({"ID": "a", "Spec": {"Labels": {"x": "y"}, "List": [1, 2]}}),
            json!({"ID": "b", "Empty": {}, "None": []}),
        ];
        for n in 0..=items.len() {
            let mut buf = Vec::new();
            let mut a = JsonArray::to(&mut buf);
            for v in &items[..n] {
                a.item(v).unwrap();
            }
            a.end().unwrap();
            let whole = serde_json::to_string_pretty(&Value::Array(items[..n].to_vec())).unwrap();
            assert_eq!(String::from_utf8(buf).unwrap(), whole + "\n");
        }
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["abc".into(), "web".into()]);
        t.row(vec!["a".into(), "longer".into()]);
        assert_eq!(t.render(), "ID    NAME\nabc   web\na     longer\n");
    }
}

/// Splits `s` into words as a POSIX shell does (docker parses `--args` and `--entrypoint`
/// so): blanks separate
/// words; single quotes keep everything literally; double quotes keep everything but `\\`
/// before `"`, `\\`, `$` or a backtick; a backslash outside quotes keeps the next character.
pub fn shell_words(s: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => anyhow::bail!("unterminated single quote in {s:?}"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => anyhow::bail!("unterminated double quote in {s:?}"),
                        },
                        Some(c) => cur.push(c),
                        None => anyhow::bail!("unterminated double quote in {s:?}"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => anyhow::bail!("a trailing backslash in {s:?}"),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod shell_words_tests {
    use super::shell_words;

    #[test]
    fn words_split_like_a_shell() {
        let w = |s: &str| shell_words(s).unwrap();
        assert_eq!(w("sh -c 'exit 3'"), ["sh", "-c", "exit 3"]);
        assert_eq!(w(r#"echo "a b" c\ d ''"#), ["echo", "a b", "c d", ""]);
        assert_eq!(w(r#""say \"hi\" \$x \n""#), [r#"say "hi" $x \n"#]);
        assert_eq!(w("  a   b  "), ["a", "b"]);
        assert!(w("").is_empty());
        for bad in ["'open", "\"open", "end\\"] {
            assert!(shell_words(bad).is_err(), "{bad}");
        }
    }
}

/// `--tail` of the log commands: a number of lines, or "all" (`None`).
pub fn parse_tail(s: &str) -> anyhow::Result<Option<u64>> {
    if s == "all" {
        return Ok(None);
    }
    s.parse::<u64>()
        .map(Some)
        .map_err(|_| anyhow!("invalid --tail {s:?}: expected a number of lines or \"all\""))
}

/// The socket SHOAL_SOCKET names, else the default one.
fn env_socket() -> std::path::PathBuf {
    std::env::var_os("SHOAL_SOCKET")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| shoal_manager::daemon::DEFAULT_SOCKET.into())
}

/// What the agent on SHOAL_SOCKET (or the default socket) says of itself, if one answers
/// within 2 s; and the socket asked.
async fn agent_info_async() -> (std::path::PathBuf, Option<shoal_proto::v1::InfoResponse>) {
    let socket = env_socket();
    let info = agent_info_at(&socket).await;
    (socket, info)
}

/// What the agent on `socket` says of itself, if one answers within 2 s.
async fn agent_info_at(socket: &std::path::Path) -> Option<shoal_proto::v1::InfoResponse> {
    async {
        let ch = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            shoal_manager::daemon::connect_local(socket),
        )
        .await??;
        anyhow::Ok(
            shoal_proto::v1::daemon_client::DaemonClient::new(ch)
                .info(shoal_proto::v1::InfoRequest {})
                .await?
                .into_inner(),
        )
    }
    .await
    .ok()
}

fn agent_info() -> (std::path::PathBuf, Option<shoal_proto::v1::InfoResponse>) {
    block_on(async { Ok(agent_info_async().await) }).unwrap_or_else(|_| (env_socket(), None))
}

/// The data directory a node-local command works on: the one given (`--data-dir`,
/// `SHOAL_DATA_DIR`), else the one of the agent answering on `SHOAL_SOCKET` (so that setting
/// the socket alone points every command at that node), else the default.
pub fn data_dir(given: Option<std::path::PathBuf>) -> std::path::PathBuf {
    data_dir_at(given, &env_socket())
}

/// [`data_dir`] for a command that talks to the agent on `socket` (its `--socket`): that
/// agent's data dir unless one is given.
pub fn data_dir_at(
    given: Option<std::path::PathBuf>,
    socket: &std::path::Path,
) -> std::path::PathBuf {
    if let Some(d) = given {
        return d;
    }
    pick_data_dir(block_on(async { Ok(agent_info_at(socket).await) }).unwrap_or(None))
}

/// [`data_dir`] from inside an async command (no `--data-dir` flag: `SHOAL_DATA_DIR` or the
/// agent's).
pub async fn data_dir_async() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("SHOAL_DATA_DIR") {
        return d.into();
    }
    pick_data_dir(agent_info_async().await.1)
}

fn pick_data_dir(info: Option<shoal_proto::v1::InfoResponse>) -> std::path::PathBuf {
    info.map(|i| i.data_dir)
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| super::image::DEFAULT_DATA_DIR.into())
}

/// `shoal info` flags.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// `shoal info`: what `docker info` says, for this node — the agent answering on SHOAL_SOCKET
/// (version, data dir, cluster membership), the host's cgroups and kernel, and what the data
/// dir holds (containers, service tasks, images, the cluster registry's port).
pub fn info(a: InfoArgs) -> anyhow::Result<()> {
    let (socket, agent) = agent_info();
    let data = std::env::var_os("SHOAL_DATA_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| pick_data_dir(agent.clone()));
    let cgroups = match shoal_runtime::cgroups::hierarchy() {
        Ok(shoal_runtime::cgroups::Hierarchy::V2 { .. }) => "v2".to_string(),
        Ok(shoal_runtime::cgroups::Hierarchy::V1 { .. }) => {
            if std::path::Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
                "v1 (hybrid, with a v2 tree at /sys/fs/cgroup/unified)".to_string()
            } else {
                "v1".to_string()
            }
        }
        Err(e) => format!("unknown ({e})"),
    };
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (running, all) = shoal_runtime::frontdoor::FrontDoor::open(&data)
        .and_then(|f| Ok((f.list(false)?.len(), f.list(true)?.len())))
        .unwrap_or((0, 0));
    let tasks = shoal_runtime::container::Container::list(
        &data
            .join(shoal_runtime::frontdoor::CONTAINERS_DIR)
            .join(".tasks"),
    )
    .map(|l| l.len())
    .unwrap_or(0);
    let (images, image_bytes) = shoal_runtime::image::ImageStore::open(&data)
        .and_then(|s| s.list())
        .map(|l| (l.len(), l.iter().map(|i| i.size).sum::<u64>()))
        .unwrap_or((0, 0));
    let registry_port = std::fs::read_to_string(data.join("registry-port"))
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok());
    let role = agent.as_ref().map(|i| match i.state() {
        shoal_proto::v1::LocalNodeState::Manager => "manager",
        shoal_proto::v1::LocalNodeState::Worker => "worker",
        shoal_proto::v1::LocalNodeState::Inactive => "inactive (in no cluster)",
    });
    if a.format == Format::Json {
        let v = serde_json::json!({
            "ClientVersion": env!("CARGO_PKG_VERSION"),
            "Agent": agent.as_ref().map(|i| serde_json::json!({
                "Socket": socket.display().to_string(),
                "Version": i.version,
                "Role": role,
                "NodeID": i.node_id,
                "ClusterID": i.cluster_id,
                "AdvertiseAddr": i.advertise_addr,
            })),
            "DataDir": data.display().to_string(),
            "Kernel": kernel,
            "OSType": std::env::consts::OS,
            "Architecture": std::env::consts::ARCH,
            "Cgroups": cgroups,
            "Containers": all,
            "ContainersRunning": running,
            "Tasks": tasks,
            "Images": images,
            "ImagesSize": image_bytes,
            "RegistryPort": registry_port,
        });
        return print_json(&v);
    }
    println!("Client:\n Version:        {}", env!("CARGO_PKG_VERSION"));
    match &agent {
        Some(i) => {
            println!("Agent:\n Socket:         {}", socket.display());
            println!(" Version:        {}", i.version);
            println!(" Role:           {}", role.unwrap_or_default());
            if !i.node_id.is_empty() {
                println!(" Node ID:        {}", i.node_id);
                println!(" Cluster ID:     {}", i.cluster_id);
                println!(" Advertise addr: {}", i.advertise_addr);
            }
        }
        None => println!("Agent:\n No agent answers on {}", socket.display()),
    }
    println!("Data dir:        {}", data.display());
    println!(" Containers:     {all} ({running} running)");
    println!(" Service tasks:  {tasks}");
    println!(" Images:         {images} ({})", human_bytes(image_bytes));
    match registry_port {
        Some(p) => println!(" Registry port:  {p}"),
        None => println!(" Registry port:  none"),
    }
    println!("Host:");
    println!(
        " Kernel:         {kernel} ({}/{})",
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    println!(" Cgroups:        {cgroups}");
    println!(" Runtime:        shoal (namespaces, cgroups, overlayfs, seccomp)");
    Ok(())
}

/// `1.5GB`-style size (docker's decimal units).
fn human_bytes(b: u64) -> String {
    let f = b as f64;
    if f >= 1e9 {
        format!("{:.2}GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1}MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}kB", f / 1e3)
    } else {
        format!("{b}B")
    }
}

/// `shoal version`: this binary's version, and the agent's on SHOAL_SOCKET when one answers.
pub fn version() -> anyhow::Result<()> {
    println!("Client:\n Version:  {}", env!("CARGO_PKG_VERSION"));
    println!(
        " OS/Arch:  {}/{}",
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    match agent_info() {
        (socket, Some(i)) => {
            println!("Server (agent on {}):", socket.display());
            println!(" Version:  {}", i.version);
            println!(" Data dir: {}", i.data_dir);
            if !i.node_id.is_empty() {
                println!(" Node:     {}", i.node_id);
            }
        }
        (socket, None) => println!("Server: no agent answers on {}", socket.display()),
    }
    Ok(())
}
