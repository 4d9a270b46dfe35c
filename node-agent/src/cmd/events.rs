//! `shoal events`: the cluster's changes as docker prints them — the manager's store watch
//! stream, with `--since` replaying what the manager kept and `--until` ending the stream.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use shoal_proto::v1 as pb;
use shoal_proto::v1::control_client::ControlClient;

use super::output::{block_on, format_time_ms, parse_time_ms, SocketArg};
use super::service::progress::state_word;

#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Only matching events: type=service|node|task|network|secret|config|cluster,
    /// event=create|update|remove, service=NAME|ID, node=ID (repeatable; the same key
    /// twice matches either value)
    #[arg(short, long = "filter")]
    filter: Vec<String>,
    /// Events since this time: RFC 3339, Unix seconds, or a duration ago (10m); from the
    /// events the manager kept (its last few thousand)
    #[arg(long)]
    since: Option<String>,
    /// Stop after the events up to this time (same forms as --since)
    #[arg(long)]
    until: Option<String>,
    /// `json` (or docker's `{{json .}}`): one JSON object per line
    #[arg(long)]
    format: Option<String>,
}

const TYPES: [&str; 7] = [
    "service", "node", "task", "network", "secret", "config", "cluster",
];
const ACTIONS: [&str; 3] = ["create", "update", "remove"];

/// The filters, by key: an event passes when, for every key given, one value matches.
#[derive(Debug, Default, PartialEq)]
struct Filters(BTreeMap<String, Vec<String>>);

impl Filters {
    fn parse(items: &[String]) -> anyhow::Result<Filters> {
        let mut f = Filters::default();
        for item in items {
            let Some((k, v)) = item
                .split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            else {
                bail!("invalid filter {item:?}: want KEY=VALUE");
            };
            match k {
                "type" if !TYPES.contains(&v) => {
                    bail!("invalid filter type={v}: one of {}", TYPES.join(", "))
                }
                "event" if !ACTIONS.contains(&v) => {
                    bail!("invalid filter event={v}: one of {}", ACTIONS.join(", "))
                }
                "type" | "event" | "service" | "node" => {}
                _ => bail!(
                    "invalid filter {k:?}: shoal events filters by type, event, service or node"
                ),
            }
            f.0.entry(k.to_string()).or_default().push(v.to_string());
        }
        Ok(f)
    }

    /// The kinds the manager need send (none named: all).
    fn kinds(&self) -> Vec<i32> {
        let Some(types) = self.0.get("type") else {
            return Vec::new();
        };
        let mut kinds: Vec<i32> = types
            .iter()
            .map(|t| match t.as_str() {
                "service" => pb::WatchKind::Service,
                "node" => pb::WatchKind::Node,
                "task" => pb::WatchKind::Task,
                "network" => pb::WatchKind::Network,
                "secret" => pb::WatchKind::Secret,
                "config" => pb::WatchKind::Config,
                _ => pb::WatchKind::Cluster,
            } as i32)
            .collect();
        // A task event names its service and node: filtering by them needs no other kind.
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    fn pass(&self, e: &Line) -> bool {
        let any = |key: &str, values: &[&str]| {
            self.0
                .get(key)
                .is_none_or(|want| want.iter().any(|w| values.contains(&w.as_str())))
        };
        let (service, node): (Vec<&str>, Vec<&str>) = match e.kind {
            "service" => (vec![e.id.as_str(), attr(e, "name")], vec![]),
            "task" => (
                vec![attr(e, "service"), attr(e, "service.id")],
                vec![attr(e, "node")],
            ),
            "node" => (vec![], vec![e.id.as_str(), attr(e, "name")]),
            _ => (vec![], vec![]),
        };
        any("type", &[e.kind])
            && any("event", &[e.action])
            && any("service", &service)
            && any("node", &node)
    }
}

fn attr<'a>(e: &'a Line, k: &str) -> &'a str {
    e.attrs.get(k).map_or("", String::as_str)
}

/// One event as docker shows it.
#[derive(Debug, PartialEq)]
struct Line {
    time_ms: i64,
    kind: &'static str,
    action: &'static str,
    id: String,
    attrs: BTreeMap<String, String>,
}

impl Line {
    fn of(ev: &pb::WatchEvent) -> Option<Line> {
        use pb::watch_event::Object as O;
        let action = match pb::WatchAction::try_from(ev.action).ok()? {
            pb::WatchAction::Create => "create",
            pb::WatchAction::Update => "update",
            pb::WatchAction::Delete => "remove",
            _ => return None,
        };
        let mut attrs = BTreeMap::new();
        let (kind, meta) = match ev.object.as_ref()? {
            O::Service(s) => {
                let spec = s.spec.clone().unwrap_or_default();
                attrs.insert("name".into(), spec.name);
                if let Some(u) = &s.update_status {
                    if let Ok(st) = pb::UpdateState::try_from(u.state) {
                        if st != pb::UpdateState::Unknown {
                            let name = st.as_str_name().trim_start_matches("UPDATE_STATE_");
                            attrs.insert("updatestate".into(), name.to_lowercase());
                        }
                    }
                }
                ("service", &s.meta)
            }
            O::Node(n) => {
                let host = n.description.as_ref().map_or("", |d| d.hostname.as_str());
                attrs.insert("name".into(), host.to_string());
                let st = n.status.as_ref().map_or(0, |s| s.state);
                attrs.insert(
                    "state".into(),
                    pb::NodeState::try_from(st).map_or(String::new(), |s| {
                        s.as_str_name()
                            .trim_start_matches("NODE_STATE_")
                            .to_lowercase()
                    }),
                );
                ("node", &n.meta)
            }
            O::Task(t) => {
                attrs.insert("service".into(), t.service_name.clone());
                attrs.insert("service.id".into(), t.service_id.clone());
                if t.slot > 0 {
                    attrs.insert("slot".into(), t.slot.to_string());
                }
                attrs.insert("node".into(), t.node_id.clone());
                let st = t.status.as_ref().map_or(0, |s| s.state);
                attrs.insert("state".into(), state_word(st));
                attrs.insert("desired".into(), state_word(t.desired_state));
                ("task", &t.meta)
            }
            O::Network(n) => {
                let name = n.spec.as_ref().map_or("", |s| s.name.as_str());
                attrs.insert("name".into(), name.to_string());
                ("network", &n.meta)
            }
            O::Secret(x) => {
                let name = x.spec.as_ref().map_or("", |s| s.name.as_str());
                attrs.insert("name".into(), name.to_string());
                ("secret", &x.meta)
            }
            O::Config(x) => {
                let name = x.spec.as_ref().map_or("", |s| s.name.as_str());
                attrs.insert("name".into(), name.to_string());
                ("config", &x.meta)
            }
            O::Cluster(c) => {
                let name = c.spec.as_ref().map_or("", |s| s.name.as_str());
                attrs.insert("name".into(), name.to_string());
                ("cluster", &c.meta)
            }
        };
        Some(Line {
            time_ms: ev.time_ms,
            kind,
            action,
            id: meta.as_ref().map_or(String::new(), |m| m.id.clone()),
            attrs,
        })
    }

    /// `2026-12-07T19:00:00.123000000Z service create ID (name=web)`
    fn text(&self) -> String {
        let attrs: Vec<String> = self
            .attrs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{} {} {} {} ({})",
            format_time_ms(self.time_ms),
            self.kind,
            self.action,
            self.id,
            attrs.join(", ")
        )
    }

    /// docker's `--format '{{json .}}'` object.
    fn json(&self) -> Value {
        json!({
            "Type": self.kind,
            "Action": self.action,
            "Actor": {"ID": self.id, "Attributes": self.attrs},
            "scope": "swarm",
            "time": self.time_ms.div_euclid(1000),
            "timeNano": i128::from(self.time_ms) * 1_000_000,
        })
    }
}

pub fn run(a: EventsArgs) -> anyhow::Result<()> {
    block_on(run_async(a))
}

async fn run_async(a: EventsArgs) -> anyhow::Result<()> {
    // Everything is checked before the daemon is asked.
    let filters = Filters::parse(&a.filter)?;
    let json = match a.format.as_deref() {
        None | Some("table") => false,
        Some("json") | Some("{{json .}}") => true,
        Some(f) => bail!("invalid --format {f:?}: json (or {{{{json .}}}})"),
    };
    let now = shoal_manager::controlapi::now_ms();
    let since = a
        .since
        .as_deref()
        .map(|s| parse_time_ms(s, now).context("--since"))
        .transpose()?;
    let until = a
        .until
        .as_deref()
        .map(|s| parse_time_ms(s, now).context("--until"))
        .transpose()?;
    if let (Some(s), Some(u)) = (since, until) {
        if s > u {
            bail!("--since is after --until: no event can match");
        }
    }
    // docker: --until alone replays from the start of what is kept.
    let since_ms = since.unwrap_or(if until.is_some() { 1 } else { 0 }).max(0);
    let mut client = ControlClient::new(a.socket.channel().await?);
    let mut stream = client
        .watch(pb::WatchRequest {
            kinds: filters.kinds(),
            since_ms,
            until_ms: until.unwrap_or(0).max(0),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("the event stream broke: {}", s.message()))?
    {
        if ev.action == pb::WatchAction::Resync as i32 {
            eprintln!("shoal: some events were lost: this client fell behind");
            continue;
        }
        let Some(line) = Line::of(&ev) else { continue };
        if !filters.pass(&line) {
            continue;
        }
        let text = if json {
            line.json().to_string()
        } else {
            line.text()
        };
        writeln!(out, "{text}")?;
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_event(action: pb::WatchAction, id: &str, name: &str) -> pb::WatchEvent {
        pb::WatchEvent {
            version: 7,
            action: action as i32,
            time_ms: 1_765_134_000_123,
            object: Some(pb::watch_event::Object::Service(pb::Service {
                meta: Some(pb::Meta {
                    id: id.into(),
                    ..Default::default()
                }),
                spec: Some(pb::ServiceSpec {
                    name: name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_service_event_reads_as_docker_prints_it() {
        let l = Line::of(&service_event(pb::WatchAction::Delete, "abc", "web")).unwrap();
        assert_eq!(
            l.text(),
            "2025-12-07T19:00:00.123000000Z service remove abc (name=web)"
        );
        let j = l.json();
        assert_eq!(j["Type"], "service");
        assert_eq!(j["Action"], "remove");
        assert_eq!(j["Actor"]["Attributes"]["name"], "web");
        assert_eq!(j["time"], 1_765_134_000);
        assert_eq!(j["timeNano"], 1_765_134_000_123_000_000_i64);
    }

    #[test]
    fn filters_match_by_key_and_any_value() {
        let f = Filters::parse(&[
            "type=service".into(),
            "event=create".into(),
            "event=remove".into(),
        ])
        .unwrap();
        assert_eq!(f.kinds(), vec![pb::WatchKind::Service as i32]);
        let created = Line::of(&service_event(pb::WatchAction::Create, "a", "web")).unwrap();
        let updated = Line::of(&service_event(pb::WatchAction::Update, "a", "web")).unwrap();
        assert!(f.pass(&created));
        assert!(!f.pass(&updated));
        let by_name = Filters::parse(&["service=web".into()]).unwrap();
        assert!(by_name.pass(&created));
        assert!(!Filters::parse(&["service=db".into()])
            .unwrap()
            .pass(&created));
    }

    #[test]
    fn bad_filters_are_refused_in_one_line() {
        for (bad, want) in [
            ("type=container", "one of service"),
            ("event=die", "one of create"),
            ("label=a", "filters by type"),
            ("type", "want KEY=VALUE"),
            ("=x", "want KEY=VALUE"),
        ] {
            let e = Filters::parse(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
