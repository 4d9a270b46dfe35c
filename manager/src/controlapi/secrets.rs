//! Secrets and configs: their specs, and the files a service's containers get from them
//! (targets checked and defaulted here; names resolved to ids on the leader).

use shoal_proto::v1 as pb;

use super::validate::Invalid;
use crate::secrets::{check_name, MAX_DATA_BYTES};

/// Where a secret lands when the request names no target (docker's).
pub const SECRETS_DIR: &str = "/run/secrets";
/// The mode of a secret or config file when the request gives none (docker's).
pub const DEFAULT_MODE: u32 = 0o444;
/// Most secrets (and, apart, configs) one service may use.
pub const MAX_FILES_PER_SERVICE: usize = 128;
/// Longest target path.
const MAX_TARGET_LEN: usize = 4096;

/// A secret's or config's spec as `create` sends it: a docker name, at most 500 KiB of data.
pub fn spec(kind: &str, name: &str, data: &[u8]) -> Result<(), Invalid> {
    check_name(kind, name).map_err(Invalid)?;
    if data.len() > MAX_DATA_BYTES {
        return Err(Invalid(format!(
            "{kind} {name} is {} bytes: at most {MAX_DATA_BYTES} (500 KiB) are allowed",
            data.len()
        )));
    }
    Ok(())
}

/// Fills in the defaults of a service's secret and config files (target, mode) and checks
/// their targets: absolute, no `..`, none twice, none on a mount's target.
pub fn file_refs(c: &mut pb::ContainerSpec) -> Result<(), Invalid> {
    for (kind, refs) in [("secret", &mut c.secrets), ("config", &mut c.configs)] {
        if refs.len() > MAX_FILES_PER_SERVICE {
            return Err(Invalid(format!(
                "too many {kind}s (at most {MAX_FILES_PER_SERVICE})"
            )));
        }
        for r in refs.iter_mut() {
            let key = if r.name.is_empty() { &r.id } else { &r.name };
            if key.is_empty() {
                return Err(Invalid(format!("a {kind} reference names no {kind}")));
            }
            if r.target.is_empty() {
                r.target = match kind {
                    "secret" => format!("{SECRETS_DIR}/{key}"),
                    _ => format!("/{key}"),
                };
            } else if !r.target.starts_with('/') && kind == "secret" {
                // Docker's: a bare file name lands in /run/secrets.
                r.target = format!("{SECRETS_DIR}/{}", r.target);
            }
            if r.mode == 0 {
                r.mode = DEFAULT_MODE;
            }
            if r.mode > 0o7777 {
                return Err(Invalid(format!(
                    "{kind} {key}: mode {:o} is not a permission mode",
                    r.mode
                )));
            }
            target(kind, key, &r.target)?;
        }
    }
    let mut seen: Vec<(&str, String)> = c
        .mounts
        .iter()
        .map(|m| ("mount", clean(&m.target)))
        .collect();
    for (kind, refs) in [("secret", &c.secrets), ("config", &c.configs)] {
        for r in refs {
            let t = clean(&r.target);
            if let Some((other, _)) = seen.iter().find(|(_, s)| *s == t) {
                return Err(Invalid(format!(
                    "{kind} target {} is already the target of a {other}",
                    r.target
                )));
            }
            seen.push((kind, t));
        }
    }
    Ok(())
}

/// A target path: absolute, no `..` component, not `/`, no NUL.
fn target(kind: &str, key: &str, t: &str) -> Result<(), Invalid> {
    let bad = |why: &str| {
        Err(Invalid(format!(
            "{kind} {key}: invalid target {t:?}: {why}"
        )))
    };
    if !t.starts_with('/') {
        return bad("it must be an absolute path");
    }
    if t.len() > MAX_TARGET_LEN || t.contains('\0') {
        return bad("too long, or holds a NUL");
    }
    if t.split('/').any(|c| c == "..") {
        return bad("it must not hold '..'");
    }
    if clean(t) == "/" {
        return bad("it must name a file");
    }
    Ok(())
}

/// A path without `.` components, repeated or trailing slashes.
fn clean(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, target: &str) -> pb::FileReference {
        pb::FileReference {
            name: name.into(),
            target: target.into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_docker() {
        let mut c = pb::ContainerSpec {
            secrets: vec![r("db", ""), r("tls", "cert.pem")],
            configs: vec![r("app", "")],
            ..Default::default()
        };
        file_refs(&mut c).unwrap();
        assert_eq!(c.secrets[0].target, "/run/secrets/db");
        assert_eq!(c.secrets[1].target, "/run/secrets/cert.pem");
        assert_eq!(c.configs[0].target, "/app");
        assert!(c.secrets.iter().chain(&c.configs).all(|r| r.mode == 0o444));
    }

    #[test]
    fn bad_targets_are_refused_one_line_each() {
        for (t, want) in [
            ("/a/../etc/shadow", "'..'"),
            ("/", "name a file"),
            ("/run/secrets/x\0", "NUL"),
        ] {
            let mut c = pb::ContainerSpec {
                secrets: vec![r("s", t)],
                ..Default::default()
            };
            let e = file_refs(&mut c).unwrap_err().0;
            assert!(e.contains(want) && !e.contains('\n'), "{t}: {e}");
        }
        let mut c = pb::ContainerSpec {
            configs: vec![r("c", "etc/app.conf")],
            ..Default::default()
        };
        assert!(file_refs(&mut c).unwrap_err().0.contains("absolute"));
        let mut c = pb::ContainerSpec {
            secrets: vec![r("a", "/x/f"), r("b", "/x//f")],
            ..Default::default()
        };
        assert!(file_refs(&mut c)
            .unwrap_err()
            .0
            .contains("already the target of a secret"));
        let mut c = pb::ContainerSpec {
            configs: vec![r("a", "/data")],
            mounts: vec![pb::Mount {
                source: "/srv".into(),
                target: "/data/".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(file_refs(&mut c)
            .unwrap_err()
            .0
            .contains("already the target of a mount"));
    }

    #[test]
    fn specs_are_checked() {
        assert!(spec("secret", "db", b"x").is_ok());
        assert!(spec("secret", "bad name", b"x").is_err());
        let big = vec![0u8; MAX_DATA_BYTES + 1];
        assert!(spec("config", "c", &big).unwrap_err().0.contains("500 KiB"));
        assert!(spec("config", "c", &big[1..]).is_ok());
    }
}
