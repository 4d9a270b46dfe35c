//! Checks of what clients send, before anything is proposed: one clear message per mistake.

use shoal_proto::v1::{ClusterSpec, NodeRole, ServiceSpec};

/// Longest service name docker accepts (a DNS label).
pub const MAX_SERVICE_NAME_LEN: usize = 63;
/// Replicas above this are a typo, not a plan.
pub const MAX_REPLICAS: u64 = 100_000;
/// Longest image reference accepted (docker's limit on a full reference).
pub const MAX_IMAGE_REF_LEN: usize = 255;
/// Longest tag of an image reference.
pub const MAX_TAG_LEN: usize = 128;
/// Most constraints one service may carry.
pub const MAX_CONSTRAINTS: usize = 64;
/// Most aliases a service may have on one network.
pub const MAX_ALIASES: usize = 32;
/// Most labels one object may carry.
pub const MAX_LABELS: usize = 256;
/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 4096;
/// Shortest node certificate lifetime accepted (ms): swarm's minimum, one hour. Nodes renew at
/// 50–80 % of it, so a shorter one would keep every node renewing.
pub const MIN_NODE_CERT_LIFETIME_MS: u64 = 3_600_000;
/// Longest node certificate lifetime accepted (ms): a year; a removed node is refused by the
/// store, but a stolen certificate should not outlive that by much more.
pub const MAX_NODE_CERT_LIFETIME_MS: u64 = 365 * 24 * 3_600_000;
/// Longest Raft timer accepted (ms): anything beyond is a unit mistake.
pub const MAX_TIMER_MS: u64 = 3_600_000;
/// Longest duration a service spec may carry (restart delay and window, update delay and
/// monitor, stop grace period, healthcheck timers): a year is a typo already, and the
/// orchestrators add these to wall-clock milliseconds, which must not overflow.
pub const MAX_SPEC_DURATION_MS: u64 = 365 * 24 * 3_600_000;

/// Most bytes all labels of one object may hold together.
pub const MAX_LABELS_BYTES: usize = 64 * 1024;
/// Largest service spec (prost-encoded) `service create`/`update` accept. Every task of the
/// service carries its task spec, and the orchestrators write a slot's old tasks and its
/// replacement in one Raft entry, so this stays well under the entry bound.
pub const MAX_SERVICE_SPEC_BYTES: usize = 256 * 1024;
/// What a task adds to its service's spec at most: status texts, network attachments,
/// restart history, ids.
pub const MAX_TASK_EXTRA_BYTES: usize = 4 * shoal_proto::limits::MAX_STATUS_TEXT_BYTES + 24 * 1024;
/// Largest node spec (its labels, prost-encoded) `node update` leaves.
pub const MAX_NODE_SPEC_BYTES: usize = MAX_LABELS_BYTES + 1024;

// Four tasks of a largest service (a slot's old tasks and their replacement, one atomic
// group of the orchestrators) fit one Raft entry.
const _: () =
    assert!(4 * (MAX_SERVICE_SPEC_BYTES + MAX_TASK_EXTRA_BYTES) <= crate::raft::MAX_ENTRY_BYTES);
// A largest secret or config with its labels fits one entry (and one control message).
const _: () = assert!(
    crate::secrets::MAX_DATA_BYTES + MAX_LABELS_BYTES + 64 * 1024 <= crate::raft::MAX_ENTRY_BYTES
);
// The orchestrators' command budget is within the entry bound.
const _: () = assert!(crate::orchestrator::MAX_COMMAND_BYTES <= crate::raft::MAX_ENTRY_BYTES);
// A request the control API takes whole may be larger than an entry (it is checked, then
// refused with a clear error), but an entry always fits a request.
const _: () = assert!(crate::raft::MAX_ENTRY_BYTES <= super::MAX_CONTROL_MESSAGE_BYTES);

/// Most mounts one service may ask for (the node runtime's limit too).
pub const MAX_MOUNTS: usize = 128;
/// Longest mount source or target.
pub const MAX_MOUNT_PATH_LEN: usize = 4096;

/// Most words in a health check's test.
pub const MAX_HEALTHCHECK_ARGS: usize = 256;
/// Most bytes in a health check's test, all words together.
pub const MAX_HEALTHCHECK_BYTES: usize = 64 * 1024;

/// What is wrong with a request, as the user will read it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// A health check's test, docker's forms: `[]` (the image's), `["NONE"]`, `["CMD", argv…]`,
/// `["CMD-SHELL", command]`.
pub fn healthcheck_test(test: &[String]) -> Result<(), Invalid> {
    if test.len() > MAX_HEALTHCHECK_ARGS
        || test.iter().map(String::len).sum::<usize>() > MAX_HEALTHCHECK_BYTES
    {
        return Err(invalid(format!(
            "health check test is too long (at most {MAX_HEALTHCHECK_ARGS} words, \
             {MAX_HEALTHCHECK_BYTES} bytes)"
        )));
    }
    match test.split_first() {
        None => Ok(()),
        Some((k, rest)) if k == "NONE" && rest.is_empty() => Ok(()),
        Some((k, rest)) if k == "CMD" && !rest.is_empty() && !rest[0].is_empty() => Ok(()),
        Some((k, rest)) if k == "CMD-SHELL" && rest.len() == 1 && !rest[0].is_empty() => Ok(()),
        Some((k, _)) if matches!(k.as_str(), "NONE" | "CMD" | "CMD-SHELL") => {
            Err(invalid(format!(
                "invalid health check test: {k} takes {}",
                match k.as_str() {
                    "NONE" => "nothing after it",
                    "CMD" => "a command after it",
                    _ => "one command line after it",
                }
            )))
        }
        Some((k, _)) => Err(invalid(format!(
            "invalid health check test type {k:?}: expected NONE, CMD or CMD-SHELL"
        ))),
    }
}

/// Docker's rule for service names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 63 characters.
pub fn service_name(name: &str) -> Result<(), Invalid> {
    if name.is_empty() {
        return Err(invalid("service name must not be empty"));
    }
    if name.len() > MAX_SERVICE_NAME_LEN {
        return Err(invalid(format!(
            "invalid service name {name:?}: longer than {MAX_SERVICE_NAME_LEN} characters"
        )));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok {
        return Err(invalid(format!(
            "invalid service name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )));
    }
    Ok(())
}

/// A placement constraint: `node.id|node.hostname|node.role|node.labels.KEY` `==`|`!=` VALUE.
pub fn constraint(c: &str) -> Result<(), Invalid> {
    let bad = |why: &str| invalid(format!("invalid constraint {c:?}: {why}"));
    let (key, op, value) = if let Some((k, v)) = c.split_once("!=") {
        (k, "!=", v)
    } else if let Some((k, v)) = c.split_once("==") {
        (k, "==", v)
    } else {
        return Err(bad("expected KEY==VALUE or KEY!=VALUE"));
    };
    let key = key.trim();
    let value = value.trim();
    if value.is_empty() {
        return Err(bad("empty value"));
    }
    if value.contains("==") || value.contains("!=") {
        return Err(bad("more than one operator"));
    }
    match key {
        "node.id" | "node.hostname" => {}
        "node.role" => {
            if value != "manager" && value != "worker" {
                return Err(bad("node.role is manager or worker"));
            }
        }
        _ => match key.strip_prefix("node.labels.") {
            Some(label) if !label.is_empty() => {}
            _ => {
                return Err(bad(
                    "key must be node.id, node.hostname, node.role or node.labels.<name>",
                ))
            }
        },
    }
    debug_assert!(op == "==" || op == "!=");
    Ok(())
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// One path component: lowercase alphanumerics joined by `.`, `_`, `__` or dashes.
fn path_component(s: &str) -> bool {
    if s.is_empty() || !s.starts_with(is_lower_alnum) || !s.ends_with(is_lower_alnum) {
        return false;
    }
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if is_lower_alnum(c) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__", or one or more "-".
        let start = i;
        while i < b.len() && !is_lower_alnum(b[i] as char) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|c| c == '-');
        if !ok {
            return false;
        }
    }
    true
}

/// A registry host: DNS labels (or an IPv4 address), optionally `:port`.
fn domain(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.chars().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// An image reference: `name[:tag][@sha256:<64 hex>]`, name as docker spells it
/// (`[domain[:port]/]component(/component)*`, lowercase).
pub fn image_reference(r: &str) -> Result<(), Invalid> {
    let bad = |why: &str| invalid(format!("invalid image reference {r:?}: {why}"));
    if r.is_empty() {
        return Err(invalid("image must not be empty"));
    }
    if r.len() > MAX_IMAGE_REF_LEN {
        return Err(bad("too long"));
    }
    let (rest, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let hex = d
            .strip_prefix("sha256:")
            .ok_or_else(|| bad("digest must be sha256:<64 hex digits>"))?;
        if hex.len() != 64
            || !hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(bad("digest must be sha256:<64 lowercase hex digits>"));
        }
    }
    // A tag is after the last ':' that follows the last '/' (a ':' before it is a port).
    let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= MAX_TAG_LEN
            && t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Err(bad("tag must be [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
        }
    }
    if name.is_empty() {
        return Err(bad("missing repository name"));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // The first part is a registry domain when it looks like one (docker's rule).
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            if !domain(first) {
                return Err(bad("invalid registry host"));
            }
            parts.remove(0);
        }
    }
    if parts.iter().any(|p| !path_component(p)) {
        return Err(bad(
            "repository name must be lowercase [a-z0-9] separated by '.', '_', '__', '-' or '/'",
        ));
    }
    Ok(())
}

pub fn labels(what: &str, l: &std::collections::HashMap<String, String>) -> Result<(), Invalid> {
    if l.len() > MAX_LABELS {
        return Err(invalid(format!(
            "too many {what} labels (at most {MAX_LABELS})"
        )));
    }
    let mut total = 0;
    for (k, v) in l {
        if k.is_empty() {
            return Err(invalid(format!("{what} label with an empty key")));
        }
        if k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
            return Err(invalid(format!("{what} label {k:?} is too long")));
        }
        total += k.len() + v.len();
    }
    if total > MAX_LABELS_BYTES {
        return Err(invalid(format!(
            "{what} labels hold {total} bytes: at most {MAX_LABELS_BYTES} are allowed"
        )));
    }
    Ok(())
}

/// A whole service spec as `service create`/`update` send it.
pub fn service_spec(spec: &ServiceSpec) -> Result<(), Invalid> {
    use shoal_proto::v1::service_spec::Mode;
    let bytes = prost::Message::encoded_len(spec);
    if bytes > MAX_SERVICE_SPEC_BYTES {
        return Err(invalid(format!(
            "service spec is {bytes} bytes: at most {MAX_SERVICE_SPEC_BYTES} are allowed"
        )));
    }
    service_name(&spec.name)?;
    labels("service", &spec.labels)?;
    let task = spec
        .task
        .as_ref()
        .ok_or_else(|| invalid("service has no task spec"))?;
    let container = task
        .container
        .as_ref()
        .ok_or_else(|| invalid("service has no container spec"))?;
    image_reference(&container.image)?;
    labels("container", &container.labels)?;
    if container.pids_limit < 0 {
        return Err(invalid("pids limit must not be negative"));
    }
    for e in &container.env {
        if e.is_empty() || e.starts_with('=') {
            return Err(invalid(format!(
                "invalid environment variable {e:?}: expected NAME=VALUE"
            )));
        }
    }
    if let Some(h) = &container.healthcheck {
        healthcheck_test(&h.test)?;
    }
    mounts(&container.mounts)?;
    let mut timers = vec![("stop grace period", container.stop_grace_period_ms)];
    if let Some(h) = &container.healthcheck {
        timers.push(("healthcheck interval", h.interval_ms));
        timers.push(("healthcheck timeout", h.timeout_ms));
        timers.push(("healthcheck start period", h.start_period_ms));
    }
    if let Some(r) = &task.restart {
        timers.push(("restart delay", r.delay_ms));
        timers.push(("restart window", r.window_ms));
    }
    for u in [&spec.update, &spec.rollback].into_iter().flatten() {
        timers.push(("update delay", u.delay_ms));
        timers.push(("update monitor", u.monitor_ms));
    }
    for (what, ms) in timers {
        if ms > MAX_SPEC_DURATION_MS {
            return Err(invalid(format!(
                "{what} of {ms} ms is longer than the limit of {MAX_SPEC_DURATION_MS} ms (a year)"
            )));
        }
    }
    if let Some(res) = &task.resources {
        for (what, r) in [("limits", &res.limits), ("reservations", &res.reservations)] {
            if let Some(r) = r {
                if r.nano_cpus < 0 || r.memory_bytes < 0 {
                    return Err(invalid(format!("resource {what} must not be negative")));
                }
            }
        }
    }
    if let Some(p) = &task.placement {
        if p.constraints.len() > MAX_CONSTRAINTS {
            return Err(invalid(format!(
                "too many constraints (at most {MAX_CONSTRAINTS})"
            )));
        }
        for c in &p.constraints {
            constraint(c)?;
        }
        for pref in &p.preferences {
            let ok = pref
                .spread_descriptor
                .strip_prefix("node.labels.")
                .is_some_and(|l| !l.is_empty())
                || pref.spread_descriptor == "node.id"
                || pref.spread_descriptor == "node.hostname";
            if !ok {
                return Err(invalid(format!(
                    "invalid placement preference spread={:?}: expected node.labels.<name>",
                    pref.spread_descriptor
                )));
            }
        }
    }
    match &spec.mode {
        Some(Mode::Replicated(r)) if r.replicas > MAX_REPLICAS => {
            return Err(invalid(format!(
                "replicas {} is more than the limit of {MAX_REPLICAS}",
                r.replicas
            )))
        }
        Some(_) => {}
        None => return Err(invalid("service mode must be replicated or global")),
    }
    for (what, u) in [("update", &spec.update), ("rollback", &spec.rollback)] {
        if let Some(u) = u {
            if !(0.0..=1.0).contains(&u.max_failure_ratio) {
                return Err(invalid(format!(
                    "{what} max failure ratio must be between 0 and 1"
                )));
            }
        }
    }
    let networks = spec.task.as_ref().map_or(&[][..], |t| &t.networks[..]);
    let local = networks.iter().any(|n| n == "host" || n == "none");
    if local && networks.len() > 1 {
        return Err(invalid(
            "network host or none is the task's only network: it joins no other",
        ));
    }
    if networks.iter().any(|n| n.is_empty()) {
        return Err(invalid("an empty network name"));
    }
    let mut distinct = std::collections::HashSet::new();
    if let Some(n) = networks.iter().find(|n| !distinct.insert(n.as_str())) {
        return Err(invalid(format!("network {n} is given twice")));
    }
    let aliases = spec
        .task
        .as_ref()
        .map_or(&[][..], |t| &t.network_aliases[..]);
    for a in aliases {
        if !networks.contains(&a.network) {
            return Err(invalid(format!(
                "aliases for network {}, which the service is not on",
                a.network
            )));
        }
        if a.aliases.len() > MAX_ALIASES {
            return Err(invalid(format!(
                "more than {MAX_ALIASES} aliases on network {}",
                a.network
            )));
        }
        for alias in &a.aliases {
            service_name(alias)
                .map_err(|e| invalid(e.0.replace("service name", "network alias")))?;
        }
    }
    if !matches!(spec.endpoint_mode.as_str(), "" | "vip" | "dnsrr") {
        return Err(invalid(format!(
            "invalid endpoint mode {:?}: vip or dnsrr",
            spec.endpoint_mode
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for p in &spec.ports {
        if p.target_port == 0 || p.target_port > 65535 || p.published_port > 65535 {
            return Err(invalid(format!(
                "invalid port {}:{}: ports are 1-65535",
                p.published_port, p.target_port
            )));
        }
        if !matches!(p.protocol.as_str(), "" | "tcp" | "udp") {
            return Err(invalid(format!(
                "invalid port protocol {:?}: tcp or udp",
                p.protocol
            )));
        }
        match p.publish_mode.as_str() {
            // An ingress port without a published one gets one from the control API.
            "host" | "" | "ingress" => {}
            other => {
                return Err(invalid(format!(
                    "invalid publish mode {other:?}: ingress or host"
                )))
            }
        }
        if local {
            return Err(invalid(format!(
                "port {}: ports are published only from the node bridge, not network {}",
                p.target_port, networks[0]
            )));
        }
        let proto = if p.protocol.is_empty() {
            "tcp"
        } else {
            &p.protocol
        };
        if p.published_port > 0 && !seen.insert((p.published_port, proto.to_string())) {
            return Err(invalid(format!(
                "published port {}/{proto} is given twice",
                p.published_port
            )));
        }
    }
    Ok(())
}

/// A task's bind mounts and volumes (`--mount`), checked as docker's daemon does
/// (`validateMountConfig`) and with its words; whether a bind source exists is the node's to
/// say when it runs the task.
pub fn mounts(mounts: &[shoal_proto::v1::Mount]) -> Result<(), Invalid> {
    use shoal_proto::v1::MountType;
    if mounts.len() > MAX_MOUNTS {
        return Err(invalid(format!("too many mounts: at most {MAX_MOUNTS}")));
    }
    let mut seen = std::collections::HashSet::new();
    for m in mounts {
        let kind = match MountType::try_from(m.r#type) {
            Ok(MountType::Bind) => "bind",
            Ok(MountType::Volume) => "volume",
            Err(_) => {
                return Err(invalid(format!(
                    "invalid mount config for type \"{}\": mount type unknown",
                    m.r#type
                )))
            }
        };
        let bad = |why: String| invalid(format!("invalid mount config for type \"{kind}\": {why}"));
        let t = &m.target;
        if t.is_empty() {
            return Err(bad("field Target must not be empty".into()));
        }
        let parts: Vec<&str> = t
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        if t.starts_with('/') && parts.is_empty() {
            return Err(bad("invalid specification: destination can't be '/'".into()));
        }
        if !t.starts_with('/') {
            return Err(bad(format!(
                "invalid mount path: '{t}' mount path must be absolute"
            )));
        }
        if parts.contains(&"..") || t.contains('\0') || t.len() > MAX_MOUNT_PATH_LEN {
            return Err(bad(format!(
                "invalid mount path: '{t}' must not hold '..' or a NUL, and be at most {MAX_MOUNT_PATH_LEN} bytes"
            )));
        }
        if m.source.len() > MAX_MOUNT_PATH_LEN || m.source.contains('\0') {
            return Err(bad(format!(
                "the source must be at most {MAX_MOUNT_PATH_LEN} bytes, without a NUL"
            )));
        }
        if kind == "bind" {
            if m.source.is_empty() {
                return Err(bad("field Source must not be empty".into()));
            }
            if !m.source.starts_with('/') {
                return Err(bad(format!(
                    "invalid mount path: '{}' mount path must be absolute",
                    m.source
                )));
            }
            if m.volume_nocopy || !m.volume_labels.is_empty() {
                return Err(bad("field VolumeOptions must not be specified".into()));
            }
        } else if m.source.is_empty() {
            if m.read_only {
                return Err(bad(
                    "must not set ReadOnly mode when using anonymous volumes".into(),
                ));
            }
        } else if !volume_name(&m.source) {
            return Err(invalid(format!(
                "create {0}: \"{0}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path",
                m.source
            )));
        }
        labels("volume", &m.volume_labels)?;
        let clean = format!("/{}", parts.join("/"));
        if !seen.insert(clean.clone()) {
            return Err(invalid(format!("Duplicate mount point: {clean}")));
        }
    }
    Ok(())
}

/// Docker's local volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+` (a file name: at most 255).
fn volume_name(n: &str) -> bool {
    let b = n.as_bytes();
    b.len() >= 2
        && b.len() <= 255
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A cluster spec as `cluster update` sends it: every timer set and consistent.
pub fn cluster_spec(spec: &ClusterSpec) -> Result<(), Invalid> {
    let raft = spec
        .raft
        .as_ref()
        .ok_or_else(|| invalid("cluster spec has no raft settings"))?;
    let nonzero = |what: &str, v: u64| {
        if v == 0 {
            Err(invalid(format!("{what} must be greater than zero")))
        } else if v > MAX_TIMER_MS {
            Err(invalid(format!("{what} must be at most {MAX_TIMER_MS}")))
        } else {
            Ok(())
        }
    };
    nonzero("raft heartbeat interval", raft.heartbeat_interval_ms)?;
    nonzero("raft election timeout min", raft.election_timeout_min_ms)?;
    nonzero("raft election timeout max", raft.election_timeout_max_ms)?;
    if raft.election_timeout_min_ms <= raft.heartbeat_interval_ms {
        return Err(invalid(
            "raft election timeout must be longer than the heartbeat interval",
        ));
    }
    if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
        return Err(invalid(
            "raft election timeout max must be greater than its min",
        ));
    }
    if raft.snapshot_interval == 0 {
        return Err(invalid("snapshot interval must be greater than zero"));
    }
    let d = spec
        .dispatcher
        .as_ref()
        .ok_or_else(|| invalid("cluster spec has no dispatcher settings"))?;
    nonzero("dispatcher heartbeat period", d.heartbeat_period_ms)?;
    if d.missed_heartbeats_down == 0 {
        return Err(invalid(
            "missed heartbeats before down must be greater than zero",
        ));
    }
    if d.status_batch_max == 0 {
        return Err(invalid("status batch size must be greater than zero"));
    }
    let ca = spec
        .ca
        .as_ref()
        .ok_or_else(|| invalid("cluster spec has no CA settings"))?;
    if ca.node_cert_lifetime_ms < MIN_NODE_CERT_LIFETIME_MS {
        return Err(invalid(format!(
            "node certificate lifetime must be at least 1 hour, not {} ms",
            ca.node_cert_lifetime_ms
        )));
    }
    if ca.node_cert_lifetime_ms > MAX_NODE_CERT_LIFETIME_MS {
        return Err(invalid(format!(
            "node certificate lifetime must be at most 365 days, not {} ms",
            ca.node_cert_lifetime_ms
        )));
    }
    Ok(())
}

/// The role a `node.role` constraint or a CLI flag names.
pub fn parse_role(s: &str) -> Result<NodeRole, Invalid> {
    match s {
        "manager" => Ok(NodeRole::Manager),
        "worker" => Ok(NodeRole::Worker),
        _ => Err(invalid(format!(
            "invalid role {s:?}: expected worker or manager"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["web", "a", "Web-1.api_x", &"x".repeat(63)] {
            assert_eq!(service_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-web", ".a", "we b", "web/1", "wéb", &"x".repeat(64)] {
            assert!(service_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn constraints() {
        for ok in [
            "node.role==manager",
            "node.role != worker",
            "node.hostname==h1",
            "node.id!=abc",
            "node.labels.zone==east",
        ] {
            assert_eq!(constraint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "node.role=manager",
            "node.role==boss",
            "node.labels.==x",
            "engine.foo==x",
            "node.hostname==",
            "node.id==a==b",
            "zone",
        ] {
            assert!(constraint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_references() {
        let d = "a".repeat(64);
        for ok in [
            "busybox".to_string(),
            "busybox:1.36".to_string(),
            "library/busybox:latest".to_string(),
            "localhost:5000/team/app:v1".to_string(),
            "registry.example.com/a/b_c__d-e".to_string(),
            format!("busybox@sha256:{d}"),
            format!("busybox:1@sha256:{d}"),
        ] {
            assert_eq!(image_reference(&ok), Ok(()), "{ok}");
        }
        for bad in [
            "".to_string(),
            "BusyBox".to_string(),
            "busybox:".to_string(),
            "busybox:-x".to_string(),
            "busybox@sha256:abc".to_string(),
            format!("busybox@md5:{d}"),
            "a//b".to_string(),
            "a_-b".to_string(),
            ":tag".to_string(),
            "-busybox".to_string(),
        ] {
            assert!(image_reference(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_cert_lifetimes_are_between_an_hour_and_a_year() {
        let spec = |ms: u64| ClusterSpec {
            raft: Some(crate::raft::default_raft_timers()),
            dispatcher: Some(shoal_proto::v1::DispatcherConfig {
                heartbeat_period_ms: 1000,
                missed_heartbeats_down: 3,
                status_batch_max: 100,
                ..Default::default()
            }),
            ca: Some(shoal_proto::v1::CaConfig {
                node_cert_lifetime_ms: ms,
            }),
            ..Default::default()
        };
        let day = 24 * 3_600_000;
        for ok in [3_600_000, 90 * day, 365 * day] {
            cluster_spec(&spec(ok)).unwrap();
        }
        for (bad, want) in [
            (0, "at least 1 hour"),
            (60_000, "at least 1 hour"),
            (3_599_999, "at least 1 hour"),
            (365 * day + 1, "at most 365 days"),
            (u64::MAX, "at most 365 days"),
        ] {
            let e = cluster_spec(&spec(bad)).unwrap_err().0;
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn service_specs() {
        use shoal_proto::v1::{
            service_spec::Mode, ContainerSpec, Placement, ReplicatedService, TaskSpec,
        };
        let good = ServiceSpec {
            name: "web".into(),
            task: Some(TaskSpec {
                container: Some(ContainerSpec {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                placement: Some(Placement {
                    constraints: vec!["node.role==worker".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mode: Some(Mode::Replicated(ReplicatedService { replicas: 3 })),
            ..Default::default()
        };
        assert_eq!(service_spec(&good), Ok(()));
        let mut absurd = good.clone();
        absurd.mode = Some(Mode::Replicated(ReplicatedService {
            replicas: MAX_REPLICAS + 1,
        }));
        assert!(service_spec(&absurd).unwrap_err().0.contains("replicas"));
        let mut no_mode = good.clone();
        no_mode.mode = None;
        assert!(service_spec(&no_mode).is_err());
        let mut bad_c = good.clone();
        if let Some(p) = bad_c.task.as_mut().and_then(|t| t.placement.as_mut()) {
            p.constraints.push("node.rol==x".into());
        }
        assert!(service_spec(&bad_c).unwrap_err().0.contains("constraint"));
        let aliased = |net: &str, alias: &str| {
            let mut s = good.clone();
            let t = s.task.as_mut().unwrap();
            t.networks = vec!["backend".into()];
            t.network_aliases = vec![shoal_proto::v1::NetworkAliases {
                network: net.into(),
                aliases: vec![alias.into()],
            }];
            service_spec(&s)
        };
        assert_eq!(aliased("backend", "db"), Ok(()));
        assert!(aliased("front", "db").unwrap_err().0.contains("not on"));
        assert!(aliased("backend", "d b")
            .unwrap_err()
            .0
            .contains("invalid network alias"));
    }

    #[test]
    fn mounts_follow_docker() {
        use shoal_proto::v1::{Mount, MountType};
        let m = |t: MountType, source: &str, target: &str, ro: bool| Mount {
            r#type: t as i32,
            source: source.into(),
            target: target.into(),
            read_only: ro,
            ..Default::default()
        };
        use MountType::{Bind, Volume};
        assert_eq!(
            mounts(&[
                m(Bind, "/srv", "/s", true),
                m(Volume, "data", "/d", false),
                m(Volume, "", "/anon", false)
            ]),
            Ok(())
        );
        for (bad, want) in [
            (m(Volume, "data", "rel", false), "invalid mount config for type \"volume\": invalid mount path: 'rel' mount path must be absolute"),
            (m(Bind, "rel", "/x", false), "invalid mount config for type \"bind\": invalid mount path: 'rel' mount path must be absolute"),
            (m(Bind, "", "/x", false), "field Source must not be empty"),
            (m(Volume, "a/b", "/x", false), "create a/b: \"a/b\" includes invalid characters"),
            (m(Volume, "", "/x", true), "must not set ReadOnly mode when using anonymous volumes"),
            (m(Volume, "data", "/", false), "destination can't be '/'"),
            (m(Volume, "data", "/a/../b", false), "must not hold '..'"),
            (m(Volume, "data", "", false), "field Target must not be empty"),
        ] {
            let e = mounts(&[bad]).unwrap_err().0;
            assert!(e.contains(want), "{e}");
        }
        let mut unknown = m(Volume, "data", "/d", false);
        unknown.r#type = 7;
        assert!(mounts(&[unknown])
            .unwrap_err()
            .0
            .contains("mount type unknown"));
        let mut opts = m(Bind, "/srv", "/d", false);
        opts.volume_nocopy = true;
        assert!(mounts(&[opts]).unwrap_err().0.contains("VolumeOptions"));
        assert_eq!(
            mounts(&[m(Volume, "a1", "/d", false), m(Bind, "/x", "/d/", false)])
                .unwrap_err()
                .0,
            "Duplicate mount point: /d"
        );
    }

    #[test]
    fn health_check_tests_follow_docker_forms() {
        let v = |t: &[&str]| healthcheck_test(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(v(&[]).is_ok());
        assert!(v(&["NONE"]).is_ok());
        assert!(v(&["CMD", "curl", "-f", "http://localhost/"]).is_ok());
        assert!(v(&["CMD-SHELL", "curl -f http://localhost/ || exit 1"]).is_ok());
        for bad in [
            &["NONE", "x"][..],
            &["CMD"],
            &["CMD", ""],
            &["CMD-SHELL"],
            &["CMD-SHELL", "a", "b"],
            &["SHELL", "true"],
        ] {
            assert!(v(bad).is_err(), "{bad:?}");
        }
        let long = vec!["x".to_string(); MAX_HEALTHCHECK_ARGS + 1];
        assert!(healthcheck_test(&long).is_err());
    }
}
