//! Placement constraints: `node.id`, `node.hostname`, `node.role`, `node.labels.KEY`,
//! `node.platform.os`, `node.platform.arch`, each with `==` or `!=`.

use shoal_proto::v1::{Node, NodeRole};

/// Why a constraint does not parse.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ConstraintError {
    /// No `==` or `!=` in it.
    #[error("constraint {0:?}: expected KEY==VALUE or KEY!=VALUE")]
    NoOperator(String),
    /// A key shoal does not know.
    #[error("constraint {0:?}: unknown key (node.id, node.hostname, node.role, node.labels.KEY, node.platform.os, node.platform.arch)")]
    UnknownKey(String),
    /// `node.role` with something other than manager or worker.
    #[error("constraint {0:?}: node.role is manager or worker")]
    BadRole(String),
}

/// What a constraint looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// `node.id`
    NodeId,
    /// `node.hostname`
    Hostname,
    /// `node.role`
    Role,
    /// `node.labels.KEY` (the node spec's labels)
    Label(String),
    /// `node.platform.os`
    Os,
    /// `node.platform.arch`
    Arch,
}

/// One parsed placement constraint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constraint {
    /// What it looks at.
    pub key: Key,
    /// `true` for `==`, `false` for `!=`.
    pub equal: bool,
    /// The value compared with.
    pub value: String,
    /// The constraint as written, trimmed (for messages).
    pub text: String,
}

impl Constraint {
    /// Parses `KEY==VALUE` or `KEY!=VALUE` (spaces around the parts are ignored).
    pub fn parse(s: &str) -> Result<Constraint, ConstraintError> {
        let text = s.trim();
        let (at, equal) = match (text.find("=="), text.find("!=")) {
            (Some(e), Some(n)) if n < e => (n, false),
            (Some(e), _) => (e, true),
            (None, Some(n)) => (n, false),
            (None, None) => return Err(ConstraintError::NoOperator(text.into())),
        };
        let k = text[..at].trim();
        let value = text[at + 2..].trim().to_string();
        let key = match k.to_ascii_lowercase().as_str() {
            "node.id" => Key::NodeId,
            "node.hostname" => Key::Hostname,
            "node.role" => {
                if !value.eq_ignore_ascii_case("manager") && !value.eq_ignore_ascii_case("worker") {
                    return Err(ConstraintError::BadRole(text.into()));
                }
                Key::Role
            }
            "node.platform.os" => Key::Os,
            "node.platform.arch" => Key::Arch,
            _ => match k.strip_prefix("node.labels.") {
                Some(label) if !label.is_empty() => Key::Label(label.to_string()),
                _ => return Err(ConstraintError::UnknownKey(text.into())),
            },
        };
        Ok(Constraint {
            key,
            equal,
            value,
            text: format!(
                "{k}{}{}",
                if equal { "==" } else { "!=" },
                text[at + 2..].trim()
            ),
        })
    }

    /// Parses every constraint of a placement.
    pub fn parse_all(list: &[String]) -> Result<Vec<Constraint>, ConstraintError> {
        list.iter().map(|s| Constraint::parse(s)).collect()
    }

    /// True if `node` satisfies the constraint. A missing label equals nothing, so `!=`
    /// matches it.
    pub fn matches(&self, node: &Node) -> bool {
        let desc = node.description.as_ref();
        let found = match &self.key {
            Key::NodeId => node.meta.as_ref().is_some_and(|m| m.id == self.value),
            Key::Hostname => desc.is_some_and(|d| d.hostname.eq_ignore_ascii_case(&self.value)),
            Key::Role => {
                let role = if node.role == NodeRole::Manager as i32 {
                    "manager"
                } else {
                    "worker"
                };
                role.eq_ignore_ascii_case(&self.value)
            }
            Key::Label(k) => node
                .spec
                .as_ref()
                .and_then(|s| s.labels.get(k))
                .is_some_and(|v| *v == self.value),
            Key::Os => desc.is_some_and(|d| d.os.eq_ignore_ascii_case(&self.value)),
            Key::Arch => desc.is_some_and(|d| d.arch.eq_ignore_ascii_case(&self.value)),
        };
        found == self.equal
    }
}

/// Parses a `spread=node.labels.KEY` descriptor (the part after `spread=`), giving the label
/// key; `None` for descriptors shoal does not know (ignored, as docker ignores them).
pub fn spread_label(descriptor: &str) -> Option<&str> {
    descriptor
        .trim()
        .strip_prefix("node.labels.")
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::v1::{Meta, NodeDescription, NodeSpec};

    fn node() -> Node {
        Node {
            meta: Some(Meta {
                id: "n1".into(),
                ..Default::default()
            }),
            spec: Some(NodeSpec {
                labels: [("zone".to_string(), "east".to_string())].into(),
                ..Default::default()
            }),
            role: NodeRole::Manager as i32,
            description: Some(NodeDescription {
                hostname: "Host-1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn parses_and_matches() {
        let n = node();
        for (c, want) in [
            ("node.id==n1", true),
            ("node.id!=n1", false),
            ("node.hostname==host-1", true),
            (" node.role == manager ", true),
            ("node.role!=worker", true),
            ("node.labels.zone==east", true),
            ("node.labels.zone!=east", false),
            ("node.labels.rack==r1", false),
            ("node.labels.rack!=r1", true),
        ] {
            assert_eq!(Constraint::parse(c).unwrap().matches(&n), want, "{c}");
        }
        assert_eq!(
            Constraint::parse(" node.labels.zone == east").unwrap().text,
            "node.labels.zone==east"
        );
    }

    #[test]
    fn refuses_bad_constraints() {
        assert!(matches!(
            Constraint::parse("node.labels.zone=east"),
            Err(ConstraintError::NoOperator(_))
        ));
        assert!(matches!(
            Constraint::parse("engine.labels.x==y"),
            Err(ConstraintError::UnknownKey(_))
        ));
        assert!(matches!(
            Constraint::parse("node.labels.==y"),
            Err(ConstraintError::UnknownKey(_))
        ));
        assert!(matches!(
            Constraint::parse("node.role==boss"),
            Err(ConstraintError::BadRole(_))
        ));
        assert_eq!(spread_label("node.labels.zone"), Some("zone"));
        assert_eq!(spread_label("engine.labels.zone"), None);
    }
}
