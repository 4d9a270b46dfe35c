//! Arbitrary protobuf messages for the gRPC fuzz targets, directed by shoal's own `.proto`
//! files (read at test time, so a new field is fuzzed without touching this file).
//!
//! Generation is driven by a *choice tape* (a `Vec<u32>` proptest generates and shrinks): every
//! decision takes the next number from the tape, and an exhausted tape answers 0, which always
//! means "the smallest thing" (stop adding fields, empty string, zero). Shrinking the tape
//! therefore shrinks the message.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

/// Deepest message nesting generated; deeper fields are left out.
pub const MAX_DEPTH: usize = 5;
/// Most fields one generated message carries (a burst may repeat one field more).
const MAX_FIELDS: u32 = 8;
/// Longest run of one repeated or map field (a "deep map").
const MAX_BURST: u32 = 300;

/// What a field holds.
#[derive(Debug, Clone)]
pub enum Kind {
    String,
    Bytes,
    Bool,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Float,
    Double,
    Enum(String),
    Message(String),
    /// `map<string, string>` (the only map shoal uses).
    Map,
}

/// One field of a message.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub number: u32,
    pub kind: Kind,
    pub repeated: bool,
}

/// Every message of shoal's protos, with its fields.
#[derive(Debug, Default)]
pub struct Schema {
    pub messages: BTreeMap<String, Vec<Field>>,
    pub enums: BTreeMap<String, Vec<i32>>,
}

impl Schema {
    /// Parse every `.proto` under `dir`.
    pub fn load(dir: &Path) -> Schema {
        let mut s = Schema::default();
        let mut texts = Vec::new();
        for e in std::fs::read_dir(dir).expect("read proto dir") {
            let p = e.expect("proto entry").path();
            if p.extension().is_some_and(|x| x == "proto") {
                texts.push(std::fs::read_to_string(&p).expect("read proto"));
            }
        }
        // Enums first: a field's kind depends on whether its type names one.
        for t in &texts {
            s.parse_enums(t);
        }
        for t in &texts {
            s.parse_messages(t);
        }
        s
    }

    fn parse_enums(&mut self, text: &str) {
        let mut current: Option<String> = None;
        for line in text
            .lines()
            .map(|l| l.split("//").next().unwrap_or("").trim())
        {
            if let Some(rest) = line.strip_prefix("enum ") {
                let name = rest.trim_end_matches('{').trim().to_string();
                self.enums.insert(name.clone(), Vec::new());
                current = Some(name);
            } else if line.starts_with('}') {
                current = None;
            } else if let Some(name) = &current {
                if let Some((_, v)) = line.trim_end_matches(';').split_once('=') {
                    if let Ok(v) = v.trim().parse::<i32>() {
                        self.enums.get_mut(name).expect("enum").push(v);
                    }
                }
            }
        }
    }

    fn parse_messages(&mut self, text: &str) {
        let mut current: Option<String> = None;
        for line in text
            .lines()
            .map(|l| l.split("//").next().unwrap_or("").trim())
        {
            if let Some(rest) = line.strip_prefix("message ") {
                let name = rest
                    .split(|c: char| c.is_whitespace() || c == '{')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                self.messages.insert(name.clone(), Vec::new());
                // `message X {}` on one line has no body.
                current = if line.ends_with('}') {
                    None
                } else {
                    Some(name)
                };
                continue;
            }
            let Some(msg) = current.clone() else { continue };
            if line.starts_with("oneof ") {
                continue;
            }
            if line == "}" {
                // Closes a oneof or the message; oneofs never nest, so track by indentation-free
                // heuristics: a oneof's close is followed by more fields, which still land here.
                continue;
            }
            if line.starts_with("service ") || line.starts_with("enum ") {
                current = None;
                continue;
            }
            let Some((decl, number)) = line.trim_end_matches(';').split_once('=') else {
                continue;
            };
            let Ok(number) = number.trim().parse::<u32>() else {
                continue;
            };
            let words: Vec<&str> = decl.split_whitespace().collect();
            let (repeated, ty, name) = if decl.trim_start().starts_with("map<") {
                (true, "map", *words.last().expect("map name"))
            } else {
                match words.as_slice() {
                    ["repeated", ty, name] => (true, *ty, *name),
                    ["optional", ty, name] => (false, *ty, *name),
                    [ty, name] => (false, *ty, *name),
                    _ => continue,
                }
            };
            let kind = match ty {
                "map" => Kind::Map,
                "string" => Kind::String,
                "bytes" => Kind::Bytes,
                "bool" => Kind::Bool,
                "int32" => Kind::Int32,
                "int64" => Kind::Int64,
                "uint32" => Kind::Uint32,
                "uint64" => Kind::Uint64,
                "float" => Kind::Float,
                "double" => Kind::Double,
                t if self.enums.contains_key(t) => Kind::Enum(t.to_string()),
                t => Kind::Message(t.to_string()),
            };
            self.messages.get_mut(&msg).expect("message").push(Field {
                name: name.to_string(),
                number,
                kind,
                repeated,
            });
        }
    }
}

/// The proptest-generated decisions.
pub struct Tape<'a> {
    choices: &'a [u32],
    at: usize,
}

impl<'a> Tape<'a> {
    pub fn new(choices: &'a [u32]) -> Tape<'a> {
        Tape { choices, at: 0 }
    }

    /// The next choice below `n` (0 once the tape is spent).
    pub fn below(&mut self, n: u32) -> u32 {
        let v = self.choices.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        if n == 0 {
            0
        } else {
            v % n
        }
    }

    fn raw(&mut self) -> u32 {
        self.below(u32::MAX)
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, number: u32, wire: u8) {
    varint(out, (u64::from(number) << 3) | u64::from(wire));
}

fn delimited(out: &mut Vec<u8>, number: u32, body: &[u8]) {
    key(out, number, 2);
    varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// Strings a client might send: empty, valid-looking names, odd unicode, control bytes,
/// paths, very long ones. (Invalid UTF-8 is the raw-bytes target's job: prost refuses it.)
pub const ODD_STRINGS: &[&str] = &[
    "",
    "web",
    "a",
    "busybox:1.36",
    "busybox@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "node.role==manager",
    "node.labels.zone!=east",
    "node.hostname==",
    "spread=node.labels.zone",
    "node.labels.",
    "==",
    "NAME=VALUE",
    "=x",
    "../../etc/passwd",
    "/",
    "\0",
    "a\0b",
    "\u{7f}\u{1b}[2J",
    "\u{202e}evil",
    "ü",
    "💥",
    " leading",
    "UPPER",
    "tcp",
    "udp",
    "sctp",
    "127.0.0.1:4242",
    "[::1]:4242",
    "999.0.0.1:99999",
    "SHOAL-1-abc-def",
    "-1",
    "manager",
    "worker",
];

fn string(t: &mut Tape<'_>) -> Vec<u8> {
    match t.below(8) {
        0..=4 => ODD_STRINGS[t.below(ODD_STRINGS.len() as u32) as usize]
            .as_bytes()
            .to_vec(),
        5 => {
            let len = [64usize, 255, 256, 4097, 70_000][t.below(5) as usize];
            "x".repeat(len).into_bytes()
        }
        6 => format!("id-{}", t.below(8)).into_bytes(),
        _ => {
            // Printable ASCII of the tape's choosing.
            let len = t.below(24);
            (0..len).map(|_| 0x20 + t.below(0x5f) as u8).collect()
        }
    }
}

fn number(t: &mut Tape<'_>, kind: &Kind, enums: &BTreeMap<String, Vec<i32>>) -> u64 {
    let interesting: [u64; 12] = [
        0,
        1,
        u64::MAX, // -1 as a signed varint
        i64::MIN as u64,
        i64::MAX as u64,
        u32::MAX as u64,
        (i32::MIN as i64) as u64,
        1 << 31,
        1 << 53,
        100_000,
        100_001,
        65_536,
    ];
    match kind {
        Kind::Bool => u64::from(t.below(3)),
        Kind::Enum(name) => {
            let known = &enums[name];
            match t.below(4) {
                0..=2 if !known.is_empty() => {
                    known[t.below(known.len() as u32) as usize] as i64 as u64
                }
                _ => [99u64, u64::MAX, 1 << 31, 7][t.below(4) as usize],
            }
        }
        _ => match t.below(3) {
            0 => u64::from(t.below(10)),
            1 => interesting[t.below(interesting.len() as u32) as usize],
            _ => u64::from(t.raw()) << t.below(33),
        },
    }
}

/// One value of `f` appended to `out`.
fn field(schema: &Schema, f: &Field, t: &mut Tape<'_>, depth: usize, out: &mut Vec<u8>) {
    match &f.kind {
        Kind::String | Kind::Bytes => {
            let body = if matches!(f.kind, Kind::Bytes) && t.below(2) == 1 {
                (0..t.below(64)).map(|_| t.below(256) as u8).collect()
            } else {
                string(t)
            };
            delimited(out, f.number, &body);
        }
        Kind::Float => {
            key(out, f.number, 5);
            let v = [
                0.0f32,
                0.5,
                1.0,
                -1.0,
                f32::NAN,
                f32::INFINITY,
                f32::MAX,
                1.0001,
            ][t.below(8) as usize];
            out.extend_from_slice(&v.to_le_bytes());
        }
        Kind::Double => {
            key(out, f.number, 1);
            let v = [0.0f64, -1.0, f64::NAN, f64::MAX][t.below(4) as usize];
            out.extend_from_slice(&v.to_le_bytes());
        }
        Kind::Map => {
            let mut entry = Vec::new();
            delimited(&mut entry, 1, &string(t));
            delimited(&mut entry, 2, &string(t));
            delimited(out, f.number, &entry);
        }
        Kind::Message(name) => {
            let body = if depth >= MAX_DEPTH {
                Vec::new()
            } else {
                message(schema, name, t, depth + 1)
            };
            delimited(out, f.number, &body);
        }
        k => {
            key(out, f.number, 0);
            varint(out, number(t, k, &schema.enums));
        }
    }
}

/// The wire bytes of an arbitrary `name` message.
pub fn message(schema: &Schema, name: &str, t: &mut Tape<'_>, depth: usize) -> Vec<u8> {
    let fields = schema
        .messages
        .get(name)
        .unwrap_or_else(|| panic!("no message {name} in the protos"));
    let mut out = Vec::new();
    if fields.is_empty() {
        return out;
    }
    let count = t.below(MAX_FIELDS + 1);
    for _ in 0..count {
        let f = &fields[t.below(fields.len() as u32) as usize];
        let runs = if f.repeated && t.below(6) == 0 {
            1 + t.below(MAX_BURST)
        } else {
            1
        };
        for _ in 0..runs {
            field(schema, f, t, depth, &mut out);
        }
        // Now and then a field number no proto declares (must be skipped, not refused).
        if t.below(12) == 0 {
            key(&mut out, 1000 + t.below(100), 0);
            varint(&mut out, u64::from(t.raw()));
        }
    }
    out
}

/// The schema of shoal's protos (`proto/shoal/v1`).
pub fn schema() -> Schema {
    Schema::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/shoal/v1"))
}

/// Cases per target: `default` in CI, `PROPTEST_CASES` for a longer local run.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
