//! Compose files as `docker stack deploy` reads them: several `-c` files merged (later files
//! override keys), `${VAR}` interpolation from the environment, and the subset of keys shoal
//! maps onto a service. A key outside that subset is refused by name and line, never skipped.
//!
//! A service becomes the same `CreateArgs` that `service create`'s flags fill in, so its spec
//! is built by the one `service::build_spec`.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, bail, Context};
use clap::ValueEnum;

use super::yaml::{self, Key, Node, Value};
use crate::cmd::output;
use crate::cmd::service::update::RollbackActionArg;
use crate::cmd::service::{CreateArgs, FailureActionArg, ModeArg, OrderArg, RestartArg};

/// One service of the file, before the stack's name is put on it.
pub struct ServiceDef {
    /// The key under `services:`.
    pub key: String,
    pub file: Rc<str>,
    pub line: usize,
    /// What the flags of `service create` would hold; name and networks are set by the stack.
    pub args: CreateArgs,
    /// Networks by their key under `networks:` (or `default`), with their aliases.
    pub networks: Vec<(String, Vec<String>)>,
    /// Secrets and configs by their key under the top-level `secrets:`/`configs:`.
    pub secrets: Vec<FileRef>,
    pub configs: Vec<FileRef>,
    /// `volumes:`: named volumes by their key under the top-level `volumes:`, anonymous
    /// volumes (no source) and binds of host paths (made absolute).
    pub volumes: Vec<MountRef>,
}

/// One of a service's `volumes:`, checked as `--mount` would check it.
#[derive(Debug, PartialEq)]
pub struct MountRef {
    pub line: usize,
    pub mount: shoal_runtime::volume::MountSpec,
}

/// One volume under the top-level `volumes:`.
#[derive(Debug, Default, PartialEq)]
pub struct VolumeDef {
    pub external: bool,
    /// `name:` (for an external one: the existing volume's name on the nodes).
    pub name: Option<String>,
    pub labels: Vec<String>,
}

/// A service's use of a secret or config: the key it names, and the long syntax's options.
#[derive(Debug, Default, PartialEq)]
pub struct FileRef {
    pub key: String,
    pub line: usize,
    pub target: Option<String>,
    pub uid: Option<String>,
    pub gid: Option<String>,
    /// Octal, as the `--secret mode=` flag takes it.
    pub mode: Option<String>,
}

/// One secret or config under the top-level `secrets:`/`configs:`.
#[derive(Debug, Default, PartialEq)]
pub struct FileDef {
    pub external: bool,
    /// `name:` (for an external one: the existing object's name).
    pub name: Option<String>,
    /// `file:`, relative to the first compose file's directory.
    pub file: Option<std::path::PathBuf>,
    pub labels: Vec<String>,
    pub line: usize,
}

/// One network under the top-level `networks:`.
#[derive(Default, Debug, PartialEq)]
pub struct NetworkDef {
    pub external: bool,
    /// `name:` (for an external network: the existing network's name).
    pub name: Option<String>,
    pub attachable: bool,
    pub internal: bool,
    pub labels: Vec<String>,
    pub driver_opts: BTreeMap<String, String>,
}

pub struct Compose {
    pub services: Vec<ServiceDef>,
    pub networks: BTreeMap<String, NetworkDef>,
    pub secrets: BTreeMap<String, FileDef>,
    pub configs: BTreeMap<String, FileDef>,
    pub volumes: BTreeMap<String, VolumeDef>,
    /// The first file's name, for messages.
    pub file: Rc<str>,
}

// ---- interpolation ----

/// `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `${VAR?err}`,
/// `${VAR:+alt}`, `${VAR+alt}`, as compose does (a default may itself hold `${…}`).
pub fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(body_start) = after.strip_prefix('{') {
            // The matching brace (nested `${…}` in a default count).
            let mut depth = 1;
            let mut end = None;
            let bytes = body_start.as_bytes();
            let mut j = 0;
            while j < bytes.len() {
                match bytes[j] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(j);
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            let Some(end) = end else {
                return Err(format!("unclosed ${{ in {s:?}"));
            };
            out.push_str(&substitute(&body_start[..end], s, env)?);
            rest = &body_start[end + 1..];
        } else {
            let n = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if n == 0 || after.as_bytes()[0].is_ascii_digit() {
                return Err(format!(
                    "invalid interpolation in {s:?}: a lone $ (write $$ for a literal $)"
                ));
            }
            out.push_str(&env(&after[..n]).unwrap_or_default());
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn substitute(
    body: &str,
    whole: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let n = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(body.len());
    let (name, op) = body.split_at(n);
    if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(format!("invalid interpolation ${{{body}}} in {whole:?}"));
    }
    let value = env(name);
    let set = value.is_some();
    let nonempty = value.as_deref().is_some_and(|v| !v.is_empty());
    let (modifier, arg) = if let Some(a) = op.strip_prefix(":-") {
        (":-", a)
    } else if let Some(a) = op.strip_prefix(":?") {
        (":?", a)
    } else if let Some(a) = op.strip_prefix(":+") {
        (":+", a)
    } else if op.is_empty() {
        ("", "")
    } else {
        (&op[..1], &op[1..])
    };
    let value = value.unwrap_or_default();
    Ok(match modifier {
        "" => value,
        ":-" if nonempty => value,
        "-" if set => value,
        ":-" | "-" => interpolate(arg, env)?,
        ":?" if nonempty => value,
        "?" if set => value,
        ":?" | "?" => {
            let why = interpolate(arg, env)?;
            return Err(if why.is_empty() {
                format!("variable {name} is required and not set")
            } else {
                format!("variable {name} is required and not set: {why}")
            });
        }
        ":+" if nonempty => interpolate(arg, env)?,
        "+" if set => interpolate(arg, env)?,
        ":+" | "+" => String::new(),
        _ => return Err(format!("invalid interpolation ${{{body}}} in {whole:?}")),
    })
}

fn interpolate_tree(
    n: &mut Node,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let (file, line) = (n.file.clone(), n.line);
    match &mut n.value {
        Value::Scalar(s, _) => {
            *s = interpolate(s, env).map_err(|e| anyhow!("{file}:{line}: {path}: {e}"))?;
        }
        Value::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_tree(item, &format!("{path}[{i}]"), env)?;
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries.iter_mut() {
                interpolate_tree(v, &join(path, &k.name), env)?;
            }
        }
        Value::Null => {}
    }
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

// ---- merging ----

/// `environment` and `labels` as a map (`KEY=VALUE` items become keys), so files merge them
/// key by key as compose does.
fn as_map(n: Node) -> Node {
    let Value::Seq(items) = n.value else { return n };
    let mut entries: Vec<(Key, Node)> = Vec::new();
    for item in items {
        let Value::Scalar(s, q) = &item.value else {
            continue;
        };
        let (k, v) = match s.split_once('=') {
            Some((k, v)) => (k.to_string(), Value::Scalar(v.to_string(), *q)),
            None => (s.clone(), Value::Null),
        };
        entries.retain(|(e, _)| e.name != k);
        entries.push((
            Key {
                name: k,
                line: item.line,
            },
            Node { value: v, ..item },
        ));
    }
    Node {
        value: Value::Map(entries),
        ..n
    }
}

/// `over` on top of `base`: maps merge key by key, anything else in `over` replaces.
pub fn merge(base: Node, over: Node, key: &str) -> Node {
    let (base, over) = if matches!(key, "environment" | "labels") {
        (as_map(base), as_map(over))
    } else {
        (base, over)
    };
    match (base.value, over.value) {
        (Value::Map(mut b), Value::Map(o)) => {
            for (k, v) in o {
                match b.iter().position(|(bk, _)| bk.name == k.name) {
                    Some(i) => {
                        let (_, old) = b.remove(i);
                        let merged = merge(old, v, &k.name);
                        b.insert(i, (k, merged));
                    }
                    None => b.push((k, v)),
                }
            }
            Node {
                value: Value::Map(b),
                ..over_meta(&base.file, base.line)
            }
        }
        (_, value) => Node {
            value,
            file: over.file,
            line: over.line,
        },
    }
}

fn over_meta(file: &Rc<str>, line: usize) -> Node {
    Node {
        file: file.clone(),
        line,
        value: Value::Null,
    }
}

/// Reads, interpolates and merges the files, then maps them onto services and networks.
pub fn load(files: &[String], env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Compose> {
    let mut merged: Option<Node> = None;
    let mut dir = Path::new(".").to_path_buf();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?;
        let mut n = yaml::parse(f, &text)?;
        interpolate_tree(&mut n, "", env)?;
        if !matches!(n.value, Value::Map(_)) {
            bail!(
                "{f}:{}: a compose file is a mapping (services:, networks:)",
                n.line
            );
        }
        if merged.is_none() {
            dir = Path::new(f)
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf();
        }
        merged = Some(match merged {
            None => n,
            Some(b) => merge(b, n, ""),
        });
    }
    let root = merged.ok_or_else(|| anyhow!("no compose file given (-c FILE)"))?;
    convert(&root, &dir, env)
}

// ---- the subset ----

fn at(n: &Node, path: &str, msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}:{}: {path}: {msg}", n.file, n.line)
}

/// The map's entries; every key not in `allowed` (nor an `x-` extension) refused by name.
fn entries<'a>(
    n: &'a Node,
    path: &str,
    allowed: &[&str],
) -> anyhow::Result<Vec<(&'a Key, &'a Node, String)>> {
    let Value::Map(m) = &n.value else {
        if n.value == Value::Null {
            return Ok(Vec::new());
        }
        return Err(at(n, path, "expected a mapping"));
    };
    let mut out = Vec::new();
    for (k, v) in m {
        let p = join(path, &k.name);
        if k.name.starts_with("x-") {
            continue;
        }
        if !allowed.contains(&k.name.as_str()) {
            bail!(
                "{}:{}: {p}: not supported by shoal stack deploy",
                n.file,
                k.line
            );
        }
        out.push((k, v, p));
    }
    Ok(out)
}

fn string(n: &Node, path: &str) -> anyhow::Result<String> {
    match &n.value {
        Value::Scalar(s, _) => Ok(s.clone()),
        _ => Err(at(n, path, "expected a string")),
    }
}

fn strings(n: &Node, path: &str) -> anyhow::Result<Vec<String>> {
    match &n.value {
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| string(x, &format!("{path}[{i}]")))
            .collect(),
        Value::Null => Ok(Vec::new()),
        _ => Err(at(n, path, "expected a list")),
    }
}

/// `command` / `entrypoint`: a list, or a string split as a shell would.
fn words(n: &Node, path: &str) -> anyhow::Result<Vec<String>> {
    match &n.value {
        Value::Scalar(s, _) => output::shell_words(s).map_err(|e| at(n, path, e)),
        _ => strings(n, path),
    }
}

fn parse<T: std::str::FromStr>(n: &Node, path: &str, what: &str) -> anyhow::Result<T> {
    string(n, path)?
        .trim()
        .parse()
        .map_err(|_| at(n, path, format!("expected {what}")))
}

fn boolean(n: &Node, path: &str) -> anyhow::Result<bool> {
    match string(n, path)?.as_str() {
        "true" | "True" | "yes" => Ok(true),
        "false" | "False" | "no" => Ok(false),
        _ => Err(at(n, path, "expected true or false")),
    }
}

/// One of the words the matching `service create` flag takes.
fn word<T: ValueEnum>(n: &Node, path: &str) -> anyhow::Result<T> {
    let s = string(n, path)?;
    T::from_str(&s, false).map_err(|_| {
        let words: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        at(n, path, format!("{s:?} is not one of {}", words.join(", ")))
    })
}

/// `KEY=VALUE` items from a list or a map; a map key without a value (or a list item without
/// `=`) takes `missing(key)`, and is dropped when that gives nothing.
fn kv(
    n: &Node,
    path: &str,
    missing: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    match &n.value {
        Value::Map(m) => {
            for (k, v) in m {
                match &v.value {
                    Value::Null => {
                        if let Some(val) = missing(&k.name) {
                            out.push(format!("{}={val}", k.name));
                        }
                    }
                    _ => out.push(format!("{}={}", k.name, string(v, &join(path, &k.name))?)),
                }
            }
        }
        _ => {
            for (i, s) in strings(n, path)?.into_iter().enumerate() {
                if s.contains('=') {
                    out.push(s);
                } else if s.is_empty() {
                    return Err(at(n, &format!("{path}[{i}]"), "an empty item"));
                } else if let Some(val) = missing(&s) {
                    out.push(format!("{s}={val}"));
                }
            }
        }
    }
    Ok(out)
}

/// A compose file's `env_file`: `KEY=VALUE` lines, `#` comments, blank lines.
fn env_file(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if line.contains('=') {
            out.push(line.to_string());
        } else if let Some(v) = env(line) {
            out.push(format!("{line}={v}"));
        }
    }
    Ok(out)
}

fn convert(
    root: &Node,
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Compose> {
    let mut compose = Compose {
        services: Vec::new(),
        networks: BTreeMap::new(),
        secrets: BTreeMap::new(),
        configs: BTreeMap::new(),
        volumes: BTreeMap::new(),
        file: root.file.clone(),
    };
    let mut services = None;
    for (_, v, p) in entries(
        root,
        "",
        &[
            "version", "services", "networks", "secrets", "configs", "volumes",
        ],
    )? {
        match p.as_str() {
            "services" => services = Some(v),
            "volumes" => {
                for (k, n, np) in all_entries(v, &p)? {
                    compose.volumes.insert(k.name.clone(), volume_def(n, &np)?);
                }
            }
            "networks" => {
                for (k, n, np) in all_entries(v, &p)? {
                    compose.networks.insert(k.name.clone(), network(n, &np)?);
                }
            }
            "secrets" | "configs" => {
                for (k, n, np) in all_entries(v, &p)? {
                    let d = file_def(k, n, &np, dir)?;
                    if p == "secrets" {
                        compose.secrets.insert(k.name.clone(), d);
                    } else {
                        compose.configs.insert(k.name.clone(), d);
                    }
                }
            }
            _ => {} // version: informative only, as in docker
        }
    }
    let Some(services) = services else {
        bail!(
            "{}:{}: no services: in the compose file",
            root.file,
            root.line
        );
    };
    for (k, n, p) in all_entries(services, "services")? {
        compose.services.push(service(k, n, &p, dir, env)?);
    }
    if compose.services.is_empty() {
        bail!("{}:{}: services: none given", services.file, services.line);
    }
    for s in &compose.services {
        for (what, refs, defs) in [
            ("secrets", &s.secrets, &compose.secrets),
            ("configs", &s.configs, &compose.configs),
        ] {
            if let Some(r) = refs.iter().find(|r| !defs.contains_key(&r.key)) {
                bail!(
                    "{}:{}: services.{}.{what}: {} is not declared under the top-level {what}:",
                    s.file,
                    r.line,
                    s.key,
                    r.key
                );
            }
        }
        for r in &s.volumes {
            let m = &r.mount;
            let named =
                m.kind == Some(shoal_runtime::volume::MountKind::Volume) && !m.source.is_empty();
            if named && !compose.volumes.contains_key(&m.source) {
                bail!(
                    "{}:{}: services.{}.volumes: volume {} is not declared under the top-level volumes:",
                    s.file,
                    r.line,
                    s.key,
                    m.source
                );
            }
        }
        for (net, _) in &s.networks {
            if net != "default" && !compose.networks.contains_key(net) {
                bail!(
                    "{}:{}: services.{}.networks: network {net} is not declared under the top-level networks:",
                    s.file,
                    s.line,
                    s.key
                );
            }
        }
    }
    Ok(compose)
}

/// Every entry of a map whose keys are names (services, networks), `x-` keys aside.
fn all_entries<'a>(n: &'a Node, path: &str) -> anyhow::Result<Vec<(&'a Key, &'a Node, String)>> {
    match &n.value {
        Value::Map(m) => Ok(m
            .iter()
            .filter(|(k, _)| !k.name.starts_with("x-"))
            .map(|(k, v)| (k, v, join(path, &k.name)))
            .collect()),
        Value::Null => Ok(Vec::new()),
        _ => Err(at(n, path, "expected a mapping")),
    }
}

fn network(n: &Node, path: &str) -> anyhow::Result<NetworkDef> {
    let mut d = NetworkDef::default();
    for (_, v, p) in entries(
        n,
        path,
        &[
            "driver",
            "attachable",
            "external",
            "name",
            "labels",
            "internal",
            "driver_opts",
        ],
    )? {
        match p.rsplit('.').next().unwrap_or_default() {
            "driver" => {
                let drv = string(v, &p)?;
                if drv != "overlay" {
                    return Err(at(
                        v,
                        &p,
                        format!("driver {drv}: a stack's networks are overlay networks"),
                    ));
                }
            }
            "attachable" => d.attachable = boolean(v, &p)?,
            "internal" => d.internal = boolean(v, &p)?,
            "external" => match &v.value {
                Value::Map(_) => {
                    d.external = true;
                    for (_, nv, np) in entries(v, &p, &["name"])? {
                        d.name = Some(string(nv, &np)?);
                    }
                }
                _ => d.external = boolean(v, &p)?,
            },
            "name" => d.name = Some(string(v, &p)?),
            "labels" => d.labels = kv(v, &p, &|_| Some(String::new()))?,
            "driver_opts" => {
                for (k, ov, op) in all_entries(v, &p)? {
                    d.driver_opts.insert(k.name.clone(), string(ov, &op)?);
                }
            }
            _ => unreachable!("entries() allows only these"),
        }
    }
    Ok(d)
}

/// A top-level volume: the node-local driver only, made on each node on first use (or
/// `external:`, expected there).
fn volume_def(n: &Node, path: &str) -> anyhow::Result<VolumeDef> {
    let mut d = VolumeDef::default();
    for (_, v, p) in entries(n, path, &["driver", "external", "name", "labels"])? {
        match p.rsplit('.').next().unwrap_or_default() {
            "driver" => {
                let drv = string(v, &p)?;
                if drv != "local" {
                    return Err(at(
                        v,
                        &p,
                        format!("driver {drv}: a stack's volumes are the nodes' local volumes"),
                    ));
                }
            }
            "external" => match &v.value {
                Value::Map(_) => {
                    d.external = true;
                    for (_, nv, np) in entries(v, &p, &["name"])? {
                        d.name = Some(string(nv, &np)?);
                    }
                }
                _ => d.external = boolean(v, &p)?,
            },
            "name" => d.name = Some(string(v, &p)?),
            "labels" => d.labels = kv(v, &p, &|_| Some(String::new()))?,
            _ => unreachable!("entries() allows only these"),
        }
    }
    Ok(d)
}

/// A host path as the compose file gives it: relative ones (`.`, `./x`, `../x`) are the
/// first file's directory's, `~` the user's home.
fn host_path(src: &str, dir: &Path) -> String {
    let rel = src == "." || src == ".." || src.starts_with("./") || src.starts_with("../");
    if rel {
        return std::path::absolute(dir.join(src))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| src.to_string());
    }
    if src == "~" || src.starts_with("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return format!("{}{}", home.to_string_lossy(), &src[1..]);
        }
    }
    src.to_string()
}

/// A service's `volumes:` list: `[SOURCE:]TARGET[:MODE]` as `-v` reads it, or the long form
/// `{type: volume|bind, source, target, read_only, volume: {nocopy}}`.
fn mount_refs(n: &Node, path: &str, dir: &Path) -> anyhow::Result<Vec<MountRef>> {
    use shoal_runtime::volume::{parse_volume_flag, validate, MountKind, MountSpec};
    let Value::Seq(items) = &n.value else {
        return Err(at(n, path, "expected a list"));
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ip = format!("{path}[{i}]");
        let mut mount = if let Value::Scalar(..) = &item.value {
            let raw = string(item, &ip)?;
            let raw = match raw.split_once(':') {
                Some((src, rest)) => format!("{}:{rest}", host_path(src, dir)),
                None => raw,
            };
            parse_volume_flag(&raw).map_err(|e| at(item, &ip, e))?
        } else {
            let mut m = MountSpec {
                kind: Some(MountKind::Volume),
                ..Default::default()
            };
            for (_, v, p) in entries(
                item,
                &ip,
                &["type", "source", "target", "read_only", "volume"],
            )? {
                match p.rsplit('.').next().unwrap_or_default() {
                    "type" => {
                        m.kind = Some(match string(v, &p)?.as_str() {
                            "volume" => MountKind::Volume,
                            "bind" => MountKind::Bind,
                            other => {
                                return Err(at(
                                    v,
                                    &p,
                                    format!("type {other}: shoal mounts volumes and binds"),
                                ))
                            }
                        })
                    }
                    "source" => m.source = string(v, &p)?,
                    "target" => m.target = string(v, &p)?,
                    "read_only" => m.read_only = boolean(v, &p)?,
                    "volume" => {
                        for (_, nv, np) in entries(v, &p, &["nocopy"])? {
                            m.nocopy = boolean(nv, &np)?;
                        }
                    }
                    _ => unreachable!("entries() allows only these"),
                }
            }
            if m.kind == Some(MountKind::Bind) {
                m.source = host_path(&m.source, dir);
            }
            validate(&m).map_err(|e| at(item, &ip, e))?;
            m
        };
        // A service's bind source must exist on the node that runs it (`--mount`'s rule).
        mount.create_source = false;
        out.push(MountRef {
            line: item.line,
            mount,
        });
    }
    Ok(out)
}

const SERVICE_KEYS: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "labels",
    "deploy",
    "ports",
    "networks",
    "user",
    "working_dir",
    "stop_grace_period",
    "hostname",
    "read_only",
    "healthcheck",
    "secrets",
    "configs",
    "volumes",
];

fn service(
    key: &Key,
    n: &Node,
    path: &str,
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<ServiceDef> {
    let image = n
        .get("image")
        .map(|i| string(i, &join(path, "image")))
        .transpose()?
        .ok_or_else(|| anyhow!("{}:{}: {path}: no image", n.file, key.line))?;
    let mut a = CreateArgs::defaults(&image)?;
    // An explicit empty environment replaces nothing: env_file first, environment over it.
    let mut from_files = Vec::new();
    let mut from_env = Vec::new();
    let mut networks = Vec::new();
    let mut networks_given = false;
    let (mut secrets, mut configs) = (Vec::new(), Vec::new());
    let mut volumes = Vec::new();
    for (k, v, p) in entries(n, path, SERVICE_KEYS)? {
        match k.name.as_str() {
            "image" => {}
            "command" => a.command = words(v, &p)?,
            "entrypoint" => a.entrypoint = words(v, &p)?,
            "environment" => from_env = kv(v, &p, env)?,
            "env_file" => {
                let files = match &v.value {
                    Value::Scalar(..) => vec![string(v, &p)?],
                    _ => strings(v, &p)?,
                };
                for f in files {
                    from_files.extend(
                        env_file(&dir.join(&f), env).map_err(|e| at(v, &p, format!("{e:#}")))?,
                    );
                }
            }
            "labels" => a.container_label = kv(v, &p, &|_| Some(String::new()))?,
            "deploy" => deploy(v, &p, &mut a)?,
            "ports" => {
                let Value::Seq(items) = &v.value else {
                    return Err(at(v, &p, "expected a list"));
                };
                for (i, item) in items.iter().enumerate() {
                    a.publish.push(port(item, &format!("{p}[{i}]"))?);
                }
            }
            "networks" => {
                networks_given = true;
                match &v.value {
                    Value::Map(_) => {
                        for (nk, nv, np) in all_entries(v, &p)? {
                            let mut aliases = Vec::new();
                            for (_, av, ap) in entries(nv, &np, &["aliases"])? {
                                aliases = strings(av, &ap)?;
                            }
                            networks.push((nk.name.clone(), aliases));
                        }
                    }
                    _ => {
                        for name in strings(v, &p)? {
                            networks.push((name, Vec::new()));
                        }
                    }
                }
            }
            "user" => a.user = Some(string(v, &p)?),
            "working_dir" => a.workdir = Some(string(v, &p)?),
            "stop_grace_period" => {
                let s = string(v, &p)?;
                output::parse_duration_ms(&s).map_err(|e| at(v, &p, e))?;
                a.stop_grace_period = s;
            }
            "hostname" => a.hostname = Some(string(v, &p)?),
            "read_only" => a.read_only = boolean(v, &p)?,
            "healthcheck" => healthcheck(v, &p, &mut a)?,
            "secrets" => secrets = file_refs(v, &p)?,
            "configs" => configs = file_refs(v, &p)?,
            "volumes" => volumes = mount_refs(v, &p, dir)?,
            _ => unreachable!("entries() allows only SERVICE_KEYS"),
        }
    }
    a.env = from_files;
    for e in from_env {
        let k = e.split('=').next().unwrap_or_default().to_string();
        a.env.retain(|x| x.split('=').next() != Some(k.as_str()));
        a.env.push(e);
    }
    if !networks_given {
        // Docker's: a service that names no network joins the stack's `default` one.
        networks.push(("default".to_string(), Vec::new()));
    }
    Ok(ServiceDef {
        key: key.name.clone(),
        file: n.file.clone(),
        line: key.line,
        args: a,
        networks,
        secrets,
        configs,
        volumes,
    })
}

/// A top-level secret or config: `file:` (created with the stack) or `external:`.
fn file_def(key: &Key, n: &Node, path: &str, dir: &Path) -> anyhow::Result<FileDef> {
    let mut d = FileDef {
        line: key.line,
        ..Default::default()
    };
    for (_, v, p) in entries(n, path, &["file", "external", "name", "labels"])? {
        match p.rsplit('.').next().unwrap_or_default() {
            "file" => d.file = Some(dir.join(string(v, &p)?)),
            "external" => match &v.value {
                Value::Map(_) => {
                    d.external = true;
                    for (_, nv, np) in entries(v, &p, &["name"])? {
                        d.name = Some(string(nv, &np)?);
                    }
                }
                _ => d.external = boolean(v, &p)?,
            },
            "name" => d.name = Some(string(v, &p)?),
            "labels" => d.labels = kv(v, &p, &|_| Some(String::new()))?,
            _ => unreachable!("entries() allows only these"),
        }
    }
    if d.external == d.file.is_some() {
        return Err(at(n, path, "give either file: or external: true"));
    }
    Ok(d)
}

/// A service's `secrets:`/`configs:` list: keys, or `{source, target, uid, gid, mode}`.
fn file_refs(n: &Node, path: &str) -> anyhow::Result<Vec<FileRef>> {
    let Value::Seq(items) = &n.value else {
        return Err(at(n, path, "expected a list"));
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ip = format!("{path}[{i}]");
        if let Value::Scalar(..) = &item.value {
            out.push(FileRef {
                key: string(item, &ip)?,
                line: item.line,
                ..Default::default()
            });
            continue;
        }
        let mut r = FileRef {
            line: item.line,
            ..Default::default()
        };
        for (_, v, p) in entries(item, &ip, &["source", "target", "uid", "gid", "mode"])? {
            match p.rsplit('.').next().unwrap_or_default() {
                "source" => r.key = string(v, &p)?,
                "target" => r.target = Some(string(v, &p)?),
                "uid" => r.uid = Some(parse::<u32>(v, &p, "a user id")?.to_string()),
                "gid" => r.gid = Some(parse::<u32>(v, &p, "a group id")?.to_string()),
                "mode" => {
                    // YAML 1.1 (docker's) reads 0440 as octal; a plain number is decimal.
                    let s = string(v, &p)?;
                    let m = if s.len() > 1 && s.starts_with('0') {
                        u32::from_str_radix(s.trim_start_matches("0o"), 8).ok()
                    } else {
                        s.parse::<u32>().ok()
                    }
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| at(v, &p, "expected a file mode (0440, or 288)"))?;
                    r.mode = Some(format!("0{m:o}"));
                }
                _ => unreachable!("entries() allows only these"),
            }
        }
        if r.key.is_empty() {
            return Err(at(item, &ip, "no source:"));
        }
        out.push(r);
    }
    Ok(out)
}

/// `healthcheck:` onto the `--health-*` flags: `test` as a string or `[CMD-SHELL, s]` (run by
/// /bin/sh -c), `[CMD, args…]` (quoted for that shell), `[NONE]` or `disable: true`.
fn healthcheck(n: &Node, path: &str, a: &mut CreateArgs) -> anyhow::Result<()> {
    let h = &mut a.health;
    for (_, v, p) in entries(
        n,
        path,
        &[
            "test",
            "interval",
            "timeout",
            "retries",
            "start_period",
            "disable",
        ],
    )? {
        let duration = |v: &Node| -> anyhow::Result<String> {
            let s = string(v, &p)?;
            output::parse_duration_ms(&s).map_err(|e| at(v, &p, e))?;
            Ok(s)
        };
        match p.rsplit('.').next().unwrap_or_default() {
            "test" => match &v.value {
                Value::Scalar(..) => h.health_cmd = Some(string(v, &p)?),
                _ => {
                    let t = strings(v, &p)?;
                    match t.first().map(String::as_str) {
                        Some("NONE") if t.len() == 1 => h.no_healthcheck = true,
                        Some("CMD-SHELL") if t.len() == 2 => h.health_cmd = Some(t[1].clone()),
                        Some("CMD") if t.len() > 1 => {
                            let quoted: Vec<String> = t[1..]
                                .iter()
                                .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
                                .collect();
                            h.health_cmd = Some(quoted.join(" "));
                        }
                        _ => {
                            return Err(at(
                                v,
                                &p,
                                "expected [\"CMD\", args…], [\"CMD-SHELL\", command], [\"NONE\"] or a string",
                            ))
                        }
                    }
                }
            },
            "interval" => h.health_interval = Some(duration(v)?),
            "timeout" => h.health_timeout = Some(duration(v)?),
            "start_period" => h.health_start_period = Some(duration(v)?),
            "retries" => h.health_retries = Some(parse::<u32>(v, &p, "a count")?.to_string()),
            "disable" => h.no_healthcheck = boolean(v, &p)?,
            _ => unreachable!("entries() allows only these"),
        }
    }
    if h.no_healthcheck && h.health_cmd.is_some() {
        return Err(at(n, path, "disable (or NONE) with a test: pick one"));
    }
    Ok(())
}

/// A `ports:` item, short (`"8080:80/udp"`) or long (`target:`, `published:`, …), as the
/// `--publish` value that says the same.
fn port(n: &Node, path: &str) -> anyhow::Result<String> {
    match &n.value {
        Value::Scalar(s, _) => Ok(s.clone()),
        Value::Map(_) => {
            let mut fields = Vec::new();
            for (k, v, p) in entries(n, path, &["target", "published", "protocol", "mode"])? {
                fields.push(format!("{}={}", k.name, string(v, &p)?));
            }
            Ok(fields.join(","))
        }
        _ => Err(at(n, path, "expected a port")),
    }
}

fn deploy(n: &Node, path: &str, a: &mut CreateArgs) -> anyhow::Result<()> {
    for (k, v, p) in entries(
        n,
        path,
        &[
            "mode",
            "replicas",
            "placement",
            "resources",
            "restart_policy",
            "update_config",
            "rollback_config",
            "endpoint_mode",
            "labels",
        ],
    )? {
        match k.name.as_str() {
            "mode" => a.mode = word::<ModeArg>(v, &p)?,
            "replicas" => a.replicas = Some(parse(v, &p, "a number of replicas")?),
            "placement" => {
                for (k, v, p) in entries(
                    v,
                    &p,
                    &["constraints", "preferences", "max_replicas_per_node"],
                )? {
                    match k.name.as_str() {
                        "constraints" => a.constraint = strings(v, &p)?,
                        "preferences" => {
                            let Value::Seq(items) = &v.value else {
                                return Err(at(v, &p, "expected a list"));
                            };
                            for (i, item) in items.iter().enumerate() {
                                let ip = format!("{p}[{i}]");
                                for (_, sv, sp) in entries(item, &ip, &["spread"])? {
                                    a.placement_pref
                                        .push(format!("spread={}", string(sv, &sp)?));
                                }
                            }
                        }
                        _ => a.replicas_max_per_node = parse(v, &p, "a number")?,
                    }
                }
            }
            "resources" => {
                for (k, v, p) in entries(v, &p, &["limits", "reservations"])? {
                    let limits = k.name == "limits";
                    let allowed: &[&str] = if limits {
                        &["cpus", "memory", "pids"]
                    } else {
                        &["cpus", "memory"]
                    };
                    for (k, v, p) in entries(v, &p, allowed)? {
                        let s = string(v, &p)?;
                        match (limits, k.name.as_str()) {
                            (true, "cpus") => a.limit_cpu = Some(s),
                            (true, "memory") => a.limit_memory = Some(s),
                            (false, "cpus") => a.reserve_cpu = Some(s),
                            (false, "memory") => a.reserve_memory = Some(s),
                            _ => a.limit_pids = parse(v, &p, "a number of processes")?,
                        }
                    }
                }
            }
            "restart_policy" => {
                for (k, v, p) in entries(v, &p, &["condition", "delay", "max_attempts", "window"])?
                {
                    match k.name.as_str() {
                        "condition" => a.restart_condition = word::<RestartArg>(v, &p)?,
                        "delay" => a.restart_delay = string(v, &p)?,
                        "max_attempts" => a.restart_max_attempts = parse(v, &p, "a number")?,
                        _ => a.restart_window = Some(string(v, &p)?),
                    }
                }
            }
            "update_config" | "rollback_config" => {
                update_config(v, &p, a, k.name == "update_config")?
            }
            "endpoint_mode" => {
                let m = string(v, &p)?;
                if m != "vip" && m != "dnsrr" {
                    return Err(at(v, &p, format!("{m:?} is not one of vip, dnsrr")));
                }
                a.endpoint_mode = m;
            }
            _ => a.label = kv(v, &p, &|_| Some(String::new()))?,
        }
    }
    Ok(())
}

fn update_config(n: &Node, path: &str, a: &mut CreateArgs, update: bool) -> anyhow::Result<()> {
    let c = &mut a.configs;
    for (k, v, p) in entries(
        n,
        path,
        &[
            "parallelism",
            "delay",
            "failure_action",
            "monitor",
            "max_failure_ratio",
            "order",
        ],
    )? {
        match (update, k.name.as_str()) {
            (true, "parallelism") => c.update_parallelism = parse(v, &p, "a number")?,
            (true, "delay") => c.update_delay = string(v, &p)?,
            (true, "failure_action") => c.update_failure_action = word::<FailureActionArg>(v, &p)?,
            (true, "monitor") => c.update_monitor = string(v, &p)?,
            (true, "max_failure_ratio") => c.update_max_failure_ratio = parse(v, &p, "a ratio")?,
            (true, _) => c.update_order = word::<OrderArg>(v, &p)?,
            (false, "parallelism") => c.rollback_parallelism = parse(v, &p, "a number")?,
            (false, "delay") => c.rollback_delay = string(v, &p)?,
            (false, "failure_action") => {
                c.rollback_failure_action = word::<RollbackActionArg>(v, &p)?
            }
            (false, "monitor") => c.rollback_monitor = string(v, &p)?,
            (false, "max_failure_ratio") => c.rollback_max_failure_ratio = parse(v, &p, "a ratio")?,
            (false, _) => c.rollback_order = word::<OrderArg>(v, &p)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "SET" => Some("v".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_forms() {
        let i = |s: &str| interpolate(s, &env);
        assert_eq!(i("a${SET}b $SET.x").unwrap(), "avb v.x");
        assert_eq!(i("${UNSET}").unwrap(), "");
        assert_eq!(i("${UNSET:-d}|${EMPTY:-d}|${SET:-d}").unwrap(), "d|d|v");
        assert_eq!(i("${UNSET-d}|${EMPTY-d}|${SET-d}").unwrap(), "d||v");
        assert_eq!(i("${UNSET:-${SET}x}").unwrap(), "vx");
        assert_eq!(
            i("${SET:+alt}|${EMPTY:+alt}|${EMPTY+alt}").unwrap(),
            "alt||alt"
        );
        assert_eq!(i("$$SET costs $$5").unwrap(), "$SET costs $5");
        assert_eq!(i("${SET:?no}${EMPTY?no}").unwrap(), "v");
        assert_eq!(
            i("${UNSET:?must be set}").unwrap_err(),
            "variable UNSET is required and not set: must be set"
        );
        assert_eq!(
            i("${EMPTY:?}").unwrap_err(),
            "variable EMPTY is required and not set"
        );
        assert_eq!(
            i("${UNSET?err}").unwrap_err(),
            "variable UNSET is required and not set: err"
        );
        assert_eq!(i("x${SET").unwrap_err(), "unclosed ${ in \"x${SET\"");
        assert!(i("${}").is_err());
        assert!(i("${1A}").is_err());
        assert!(i("a $ b").is_err());
    }

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn later_files_override_keys_and_merge_maps() {
        let d = tempfile::tempdir().unwrap();
        let a = write(
            d.path(),
            "a.yml",
            "services:\n  web:\n    image: busybox\n    command: [sleep, \"1\"]\n    environment:\n      - A=1\n      - B=2\n    deploy:\n      replicas: 2\n      labels: {x: \"1\"}\n  db:\n    image: busybox\n",
        );
        let b = write(
            d.path(),
            "b.yml",
            "services:\n  web:\n    command: sleep 2\n    environment:\n      B: three\n      C: ${SET}\n    deploy:\n      replicas: 5\nnetworks:\n  back:\n    attachable: true\n",
        );
        let c = load(&[a, b], &env).unwrap();
        let web = c.services.iter().find(|s| s.key == "web").unwrap();
        assert_eq!(web.args.command, ["sleep", "2"]);
        assert_eq!(web.args.env, ["A=1", "B=three", "C=v"]);
        assert_eq!(web.args.replicas, Some(5));
        assert_eq!(web.args.label, ["x=1"], "deploy keys merge one by one");
        assert_eq!(web.networks, [("default".to_string(), vec![])]);
        assert_eq!(c.services.len(), 2);
        assert!(c.networks["back"].attachable);
    }

    #[test]
    fn refusals_name_the_key_and_its_line() {
        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "c.yml",
            "services:\n  web:\n    image: busybox\n    deploy:\n      resources:\n        limits:\n          cpus: \"0.5\"\n          devices: []\n",
        );
        let e = load(std::slice::from_ref(&f), &env)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            format!("{f}:8: services.web.deploy.resources.limits.devices: not supported by shoal stack deploy")
        );
        let f = write(
            d.path(),
            "c.yml",
            "services:\n  web:\n    image: busybox\n    networks: [back]\n",
        );
        let e = load(std::slice::from_ref(&f), &env)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("network back is not declared"), "{e}");
    }

    #[test]
    fn a_service_maps_onto_the_create_flags() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "web.env", "# comment\nFROM_FILE=1\nA=file\n");
        let f = write(
            d.path(),
            "c.yml",
            r#"services:
  web:
    image: busybox
    entrypoint: ["/bin/sh", "-c"]
    command: "echo 'a b'"
    env_file: web.env
    environment: {A: env}
    labels: [c=1]
    user: "1000"
    working_dir: /tmp
    stop_grace_period: 3s
    ports:
      - "8080:80"
      - target: 53
        published: 5353
        protocol: udp
        mode: host
    networks:
      back:
        aliases: [w]
    deploy:
      mode: global
      endpoint_mode: dnsrr
      placement:
        constraints: [node.role==manager]
        preferences: [{spread: node.labels.zone}]
      resources:
        limits: {cpus: "0.5", memory: 64M}
        reservations: {memory: 32M}
      restart_policy: {condition: on-failure, delay: 2s, max_attempts: 3, window: 1m}
      update_config: {parallelism: 2, order: start-first, failure_action: rollback}
      rollback_config: {parallelism: 3, failure_action: continue}
networks:
  back:
    driver: overlay
"#,
        );
        let c = load(&[f], &env).unwrap();
        let a = &c.services[0].args;
        assert_eq!(a.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(a.command, ["echo", "a b"]);
        assert_eq!(a.env, ["FROM_FILE=1", "A=env"]);
        assert_eq!(
            a.publish,
            ["8080:80", "target=53,published=5353,protocol=udp,mode=host"]
        );
        assert_eq!(
            c.services[0].networks,
            [("back".to_string(), vec!["w".to_string()])]
        );
        let spec = crate::cmd::service::build_spec(a).unwrap();
        assert!(matches!(
            spec.mode,
            Some(shoal_proto::v1::service_spec::Mode::Global(_))
        ));
        assert_eq!(spec.endpoint_mode, "dnsrr");
        let t = spec.task.unwrap();
        assert_eq!(t.resources.unwrap().limits.unwrap().memory_bytes, 64 << 20);
        assert_eq!(t.restart.unwrap().max_attempts, 3);
        assert_eq!(spec.update.unwrap().parallelism, 2);
        assert_eq!(spec.rollback.unwrap().parallelism, 3);
        assert_eq!(spec.ports[1].publish_mode, "host");
        assert_eq!(t.container.unwrap().stop_grace_period_ms, 3000);
    }

    #[test]
    fn a_healthcheck_maps_onto_the_health_flags() {
        let d = tempfile::tempdir().unwrap();
        let svc = |h: &str| {
            let f = write(
                d.path(),
                "h.yml",
                &format!("services:\n  web:\n    image: busybox\n    healthcheck:\n{h}"),
            );
            load(std::slice::from_ref(&f), &env).map(|c| c.services[0].args.health.clone())
        };
        let h = svc("      test: [CMD, wget, -q, \"it's\"]\n      interval: 5s\n      timeout: 2s\n      retries: 4\n      start_period: 1m\n").unwrap();
        assert_eq!(h.health_cmd.as_deref(), Some(r"'wget' '-q' 'it'\''s'"));
        assert_eq!(h.health_interval.as_deref(), Some("5s"));
        assert_eq!(h.health_timeout.as_deref(), Some("2s"));
        assert_eq!(h.health_retries.as_deref(), Some("4"));
        assert_eq!(h.health_start_period.as_deref(), Some("1m"));
        let h = svc("      test: [CMD-SHELL, \"curl -f localhost || exit 1\"]\n").unwrap();
        assert_eq!(h.health_cmd.as_deref(), Some("curl -f localhost || exit 1"));
        assert!(svc("      test: [NONE]\n").unwrap().no_healthcheck);
        assert!(svc("      disable: true\n").unwrap().no_healthcheck);
        // And through the same spec builder as `service create --health-*`.
        let f = write(
            d.path(),
            "h.yml",
            "services:\n  web:\n    image: busybox\n    healthcheck:\n      test: true\n      interval: 5s\n",
        );
        let c = load(std::slice::from_ref(&f), &env).unwrap();
        let spec = crate::cmd::service::build_spec(&c.services[0].args).unwrap();
        let hc = spec.task.unwrap().container.unwrap().healthcheck.unwrap();
        assert_eq!(hc.interval_ms, 5000);
        for (bad, want) in [
            (
                "      test: [SHELL, x]\n",
                "services.web.healthcheck.test: expected",
            ),
            (
                "      interval: soon\n",
                "services.web.healthcheck.interval: invalid duration",
            ),
            (
                "      retries: many\n",
                "services.web.healthcheck.retries: expected a count",
            ),
            (
                "      test: x\n      disable: true\n",
                "services.web.healthcheck: disable",
            ),
            (
                "      tests: x\n",
                "services.web.healthcheck.tests: not supported",
            ),
        ] {
            let e = svc(bad).err().unwrap().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn secrets_and_configs_name_their_top_level_entry() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "pw.txt", "hunter2");
        let f = write(
            d.path(),
            "c.yml",
            "services:\n  web:\n    image: busybox\n    secrets:\n      - pw\n      - {source: ext, target: /run/secrets/other, uid: \"1000\", mode: 0400}\n    configs:\n      - source: conf\n        mode: 288\nsecrets:\n  pw: {file: pw.txt, labels: [a=b]}\n  ext: {external: true}\nconfigs:\n  conf: {file: pw.txt}\n",
        );
        let c = load(std::slice::from_ref(&f), &env).unwrap();
        let s = &c.services[0];
        assert_eq!(s.secrets[0].key, "pw");
        assert_eq!(s.secrets[1].target.as_deref(), Some("/run/secrets/other"));
        assert_eq!(s.secrets[1].uid.as_deref(), Some("1000"));
        assert_eq!(s.secrets[1].mode.as_deref(), Some("0400"));
        assert_eq!(s.configs[0].mode.as_deref(), Some("0440"));
        assert_eq!(c.secrets["pw"].file, Some(d.path().join("pw.txt")));
        assert!(c.secrets["ext"].external);
        assert_eq!(c.secrets["pw"].labels, ["a=b"]);
        for (text, want) in [
            (
                "services:\n  web:\n    image: busybox\n    secrets: [nope]\n",
                "c.yml:4: services.web.secrets: nope is not declared under the top-level secrets:",
            ),
            (
                "services:\n  web:\n    image: busybox\nsecrets:\n  pw: {}\n",
                "secrets.pw: give either file: or external: true",
            ),
            (
                "services:\n  web:\n    image: busybox\n    configs: [{source: c, mode: 0999}]\nconfigs:\n  c: {external: true}\n",
                "services.web.configs[0].mode: expected a file mode",
            ),
            (
                "services:\n  web:\n    image: busybox\nsecrets:\n  pw: {file: x, driver: y}\n",
                "secrets.pw.driver: not supported by shoal stack deploy",
            ),
        ] {
            let f = write(d.path(), "c.yml", text);
            let e = load(std::slice::from_ref(&f), &env).err().unwrap().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn volumes_name_their_top_level_entry_and_binds_the_files_dir() {
        use shoal_runtime::volume::MountKind;
        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "c.yml",
            "services:\n  db:\n    image: busybox\n    volumes:\n      - data:/var/lib/db\n      - ./conf:/conf:ro\n      - /scratch\n      - {type: volume, source: ext, target: /e, volume: {nocopy: true}}\n      - {type: bind, source: /srv, target: /srv, read_only: true}\nvolumes:\n  data: {labels: [a=b]}\n  ext: {external: true}\n",
        );
        let c = load(std::slice::from_ref(&f), &env).unwrap();
        let v: Vec<_> = c.services[0].volumes.iter().map(|r| &r.mount).collect();
        assert_eq!(v.len(), 5);
        assert_eq!(
            (v[0].kind, v[0].source.as_str()),
            (Some(MountKind::Volume), "data")
        );
        assert_eq!(v[1].kind, Some(MountKind::Bind));
        assert_eq!(
            Path::new(&v[1].source),
            std::path::absolute(d.path().join("conf")).unwrap()
        );
        assert!(v[1].read_only && !v[1].create_source);
        assert_eq!(
            (v[2].source.as_str(), v[2].target.as_str()),
            ("", "/scratch")
        );
        assert!(v[3].nocopy);
        assert!(v[4].read_only);
        assert_eq!(c.volumes["data"].labels, ["a=b"]);
        assert!(c.volumes["ext"].external);
        for (text, want) in [
            (
                "services:\n  web:\n    image: busybox\n    volumes: [nope:/x]\n",
                "c.yml:4: services.web.volumes: volume nope is not declared under the top-level volumes:",
            ),
            (
                "services:\n  web:\n    image: busybox\n    volumes: [\"data:rel\"]\nvolumes:\n  data: {}\n",
                "mount path must be absolute",
            ),
            (
                "services:\n  web:\n    image: busybox\n    volumes: [{type: tmpfs, target: /t}]\n",
                "type tmpfs",
            ),
            (
                "services:\n  web:\n    image: busybox\nvolumes:\n  data: {driver: nfs}\n",
                "volumes.data.driver: driver nfs",
            ),
            (
                "services:\n  web:\n    image: busybox\nvolumes:\n  data: {driver_opts: {a: b}}\n",
                "volumes.data.driver_opts: not supported by shoal stack deploy",
            ),
        ] {
            let f = write(d.path(), "c.yml", text);
            let e = load(std::slice::from_ref(&f), &env).err().unwrap().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
