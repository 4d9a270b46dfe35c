//! A YAML document as a tree whose every node and key knows its file and line, so a compose
//! key shoal refuses is named with the line it is on. Built from yaml-rust2's event parser
//! (anchors, aliases and `<<` merge keys resolved here).

use std::collections::HashMap;
use std::rc::Rc;

use anyhow::bail;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    /// The text and whether it was quoted (a quoted `"3"` is still the string "3").
    Scalar(String, bool),
    Seq(Vec<Node>),
    /// Keys in file order; each key with its own line.
    Map(Vec<(Key, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub file: Rc<str>,
    pub line: usize,
    pub value: Value,
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(m) => m.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

enum Open {
    Seq(Vec<Node>, usize, usize),
    Map(Vec<(Key, Node)>, Option<Key>, usize, usize),
}

struct Builder {
    file: Rc<str>,
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    error: Option<String>,
}

impl Builder {
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Seq(items, ..)) => items.push(node),
            Some(Open::Map(entries, key, ..)) => match key.take() {
                None => match node.value {
                    Value::Scalar(name, _) => {
                        *key = Some(Key {
                            name,
                            line: node.line,
                        })
                    }
                    Value::Null => {
                        *key = Some(Key {
                            name: String::new(),
                            line: node.line,
                        })
                    }
                    _ => {
                        self.error.get_or_insert(format!(
                            "{}:{}: a mapping key must be a plain string",
                            self.file, node.line
                        ));
                    }
                },
                Some(k) => {
                    if entries.iter().any(|(e, _)| e.name == k.name) {
                        self.error.get_or_insert(format!(
                            "{}:{}: key {} is given twice",
                            self.file, k.line, k.name
                        ));
                    }
                    entries.push((k, node));
                }
            },
        }
    }
}

/// Applies `<<: *anchor` (or a list of them): the merged maps' keys that the map does not set.
fn merge_keys(entries: Vec<(Key, Node)>) -> Vec<(Key, Node)> {
    let mut out: Vec<(Key, Node)> = Vec::new();
    let mut merged: Vec<(Key, Node)> = Vec::new();
    for (k, v) in entries {
        if k.name != "<<" {
            out.push((k, v));
            continue;
        }
        let sources = match v.value {
            Value::Seq(items) => items,
            _ => vec![v],
        };
        for s in sources {
            if let Value::Map(m) = s.value {
                merged.extend(m);
            }
        }
    }
    for (k, v) in merged {
        if !out.iter().any(|(o, _)| o.name == k.name) {
            out.push((k, v));
        }
    }
    out
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, anchor, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                let value =
                    if !quoted && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                        Value::Null
                    } else {
                        Value::Scalar(text, quoted)
                    };
                let node = Node {
                    file: self.file.clone(),
                    line,
                    value,
                };
                self.push(node, anchor);
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(n) => {
                    let n = n.clone();
                    self.push(n, 0)
                }
                None => {
                    self.error
                        .get_or_insert(format!("{}:{line}: an alias to no anchor", self.file));
                }
            },
            Event::SequenceStart(anchor, _) => self.stack.push(Open::Seq(Vec::new(), anchor, line)),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Open::Map(Vec::new(), None, anchor, line))
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor, line) = match self.stack.pop() {
                    Some(Open::Seq(items, a, l)) => (Value::Seq(items), a, l),
                    Some(Open::Map(entries, _, a, l)) => (Value::Map(merge_keys(entries)), a, l),
                    None => return,
                };
                let node = Node {
                    file: self.file.clone(),
                    line,
                    value,
                };
                self.push(node, anchor);
            }
            _ => {}
        }
    }
}

/// Parses one YAML document; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> anyhow::Result<Node> {
    let mut b = Builder {
        file: Rc::from(file),
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        error: None,
    };
    let mut p = Parser::new_from_str(text);
    if let Err(e) = p.load(&mut b, false) {
        bail!("{file}:{}: not valid YAML: {}", e.marker().line(), e.info());
    }
    if let Some(e) = b.error {
        bail!("{e}");
    }
    Ok(b.root.unwrap_or(Node {
        file: Rc::from(file),
        line: 1,
        value: Value::Null,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_anchors_and_merge_keys() {
        let n = parse(
            "c.yml",
            "x-base: &base\n  image: busybox\n  user: nobody\nservices:\n  web:\n    <<: *base\n    user: root\n",
        )
        .unwrap();
        let web = n.get("services").unwrap().get("web").unwrap();
        assert_eq!(web.line, 6);
        let Value::Map(m) = &web.value else { panic!() };
        let names: Vec<_> = m.iter().map(|(k, _)| (k.name.as_str(), k.line)).collect();
        assert_eq!(names, [("user", 7), ("image", 2)]);
        assert_eq!(
            web.get("user").unwrap().value,
            Value::Scalar("root".into(), false)
        );
    }

    #[test]
    fn duplicate_keys_and_bad_yaml_name_their_line() {
        let e = parse("c.yml", "a: 1\nb: 2\na: 3\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "c.yml:3: key a is given twice");
        let e = parse("c.yml", "a: [1, 2\n").unwrap_err().to_string();
        assert!(e.starts_with("c.yml:"), "{e}");
    }
}
