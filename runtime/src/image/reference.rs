//! Image references: `name[:tag]`, validated like Docker's grammar (no registry defaulting).

use super::ImageError;

/// Longest tag Docker accepts.
const MAX_TAG_LEN: usize = 128;
/// Longest full name Docker accepts.
const MAX_NAME_LEN: usize = 255;
/// Tag used when a reference names none.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed `name:tag` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Repository, e.g. `busybox` or `registry.local:5000/team/app`.
    pub name: String,
    /// Tag, e.g. `latest`.
    pub tag: String,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

fn invalid(reference: &str, reason: &str) -> ImageError {
    ImageError::InvalidReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    }
}

impl Reference {
    /// Parse `name[:tag]`; a missing tag means `latest`. Digest references are not names.
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        if s.is_empty() {
            return Err(invalid(s, "empty reference"));
        }
        if s.contains('@') {
            return Err(invalid(s, "digest references are not supported as names"));
        }
        // The tag separator is the last ':' after the last '/', so `host:5000/app` has no tag.
        let last_slash = s.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match s[last_slash..].rfind(':') {
            Some(i) => (&s[..last_slash + i], &s[last_slash + i + 1..]),
            None => (s, DEFAULT_TAG),
        };
        validate_tag(s, tag)?;
        validate_name(s, name)?;
        Ok(Reference {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }
}

fn validate_tag(full: &str, tag: &str) -> Result<(), ImageError> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(invalid(full, "tag must be 1 to 128 characters"));
    }
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(invalid(
            full,
            "tag may hold only [A-Za-z0-9_.-] and not start with '.' or '-'",
        ));
    }
    Ok(())
}

fn validate_name(full: &str, name: &str) -> Result<(), ImageError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(invalid(full, "name must be 1 to 255 characters"));
    }
    for (i, component) in name.split('/').enumerate() {
        // The first component may be a registry host: dots, dashes, upper case, a port.
        let is_host = i == 0
            && name.contains('/')
            && (component.contains('.') || component.contains(':') || component == "localhost");
        let ok = if is_host {
            valid_host(component)
        } else {
            valid_path_component(component)
        };
        if !ok {
            return Err(invalid(
                full,
                &format!(
                    "name component {component:?} must be lowercase letters, digits and separators"
                ),
            ));
        }
    }
    Ok(())
}

fn valid_host(host: &str) -> bool {
    let (h, port) = match host.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host, None),
    };
    let host_ok = !h.is_empty()
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.chars().all(|c| c.is_ascii_digit()));
    host_ok && port_ok
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let sep_ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !sep_ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_and_tag() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!((r.name.as_str(), r.tag.as_str()), ("busybox", "latest"));
        let r = Reference::parse("registry.local:5000/team/app:v1.2").unwrap();
        assert_eq!(r.name, "registry.local:5000/team/app");
        assert_eq!(r.tag, "v1.2");
        let r = Reference::parse("localhost:5000/app").unwrap();
        assert_eq!(
            (r.name.as_str(), r.tag.as_str()),
            ("localhost:5000/app", "latest")
        );
        assert_eq!(
            Reference::parse("a__b-c.d:x").unwrap().to_string(),
            "a__b-c.d:x"
        );
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "",
            "Busybox",
            "a:",
            ":tag",
            "a:.x",
            "a/../b",
            "a//b",
            "a:b:c",
            "-a",
            "a-",
            "a@sha256:00",
            "a:b/c",
            "a..b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
