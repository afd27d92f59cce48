//! Structure-aware mutations of a valid JSON document: a [`Plan`] of edits on the parsed
//! tree (which may put raw, invalid text in place of a value), a layout for writing it
//! back, then byte-level edits on the result. Plans print compactly (a 100,000-deep
//! nesting is `Nested { depth: 100000, .. }`), so a failing case stays readable.

use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::Value;

/// Follows a control character in every log-injection string the mutations send; a log
/// that has a raw control character (a new line, a carriage return, an escape) right
/// before it was forged.
pub const MARKER: &str = "FUZZ-INJECTED-LINE";

/// Text written in place of a value as it is, valid JSON or not.
#[derive(Debug, Clone)]
pub enum Raw {
    Text(&'static str),
    Bytes(&'static [u8]),
    /// `open` × depth, `inner`, `close` × depth: deep nesting, closed or not.
    Nested {
        open: &'static str,
        inner: &'static str,
        close: &'static str,
        depth: usize,
    },
    /// A string literal of `unit` × len (`unit` is JSON string content, escapes allowed).
    LongString {
        unit: &'static str,
        len: usize,
    },
    /// An array of `len` copies of `item`.
    ManyItems {
        item: &'static str,
        len: usize,
    },
}

impl Raw {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Raw::Text(t) => t.as_bytes().to_vec(),
            Raw::Bytes(b) => b.to_vec(),
            Raw::Nested {
                open,
                inner,
                close,
                depth,
            } => {
                let mut out = open.repeat(*depth).into_bytes();
                out.extend_from_slice(inner.as_bytes());
                out.extend_from_slice(close.repeat(*depth).as_bytes());
                out
            }
            Raw::LongString { unit, len } => format!("\"{}\"", unit.repeat(*len)).into_bytes(),
            Raw::ManyItems { item, len } => {
                let mut out = b"[".to_vec();
                for i in 0..*len {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(item.as_bytes());
                }
                out.push(b']');
                out
            }
        }
    }
}

/// Numbers at and past the limits of u32, u64, i64, f64 and of exact doubles.
pub const NUMBERS: &[&str] = &[
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "0.0",
    "1E+2",
    "1.5",
    "-1",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "123456789012345678901234567890123456789",
    "0.000000000000000000000000000000000001",
    "1.7976931348623157e308",
    "5e-324",
    "1e21",
];

/// Valid string literals that parsers and loggers get wrong: escapes, surrogates, odd
/// times and dates, log injection.
pub const STRINGS: &[&str] = &[
    "\"\"",
    "\"\\u0000\"",
    "\"\\ud83d\\ude00\"",
    "\"\\u00e9t\\u00e9\"",
    "\"9999-12-31T23:59:59-23:59\"",
    "\"0000-01-01T00:00:00+23:59\"",
    "\"2026-06-30T23:59:60Z\"",
    "\"2026-02-30T00:00:00Z\"",
    "\"2026-11-27T10:00:00.123456789123Z\"",
    "\"2026-11-27t10:00:00z\"",
    "\"-----BEGIN CERTIFICATE REQUEST-----\\n-----END CERTIFICATE REQUEST-----\\n\"",
    "\"AAAA\"",
    "\"====\"",
    "\"../../etc/passwd\"",
    "\"x\\nFUZZ-INJECTED-LINE\"",
    "\"x\\rFUZZ-INJECTED-LINE\"",
    "\"\\u001b[2K\\rFUZZ-INJECTED-LINE\"",
    "\"x\\u0085FUZZ-INJECTED-LINE\"",
    "\"x\\u2028FUZZ-INJECTED-LINE\"",
    "\"x\\r\\nFUZZ-INJECTED-LINE 2026-01-01T00:00:00.000000Z  INFO nixfleet_control_plane::api: checkin received forged-host\"",
];

/// Almost-JSON that a parser must refuse.
pub const INVALID: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "tru",
    "nul",
    "01",
    "1.",
    "-",
    ".5",
    "+1",
    "0x10",
    "'x'",
    "\"\\x41\"",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"unterminated",
    "\"tab\there\"",
    "[1,]",
    "{\"a\":1,}",
    "{\"a\"}",
    "{1:2}",
    "[1 2]",
    "",
];

/// Byte strings that are not UTF-8, or only almost.
pub const BYTES: &[&[u8]] = &[
    b"\"\xff\"",
    b"\"\xc0\xaf\"",
    b"\"\xed\xa0\x80\"",
    b"\"\xf4\x90\x80\x80\"",
    b"\xef\xbb\xbf{}",
    b"\x00",
];

/// Depths around the canonicaliser's limit (128), serde_json's (128) and far past both.
pub const DEPTHS: &[usize] = &[126, 127, 128, 129, 1_000, 100_000];

const NESTINGS: &[(&str, &str, &str)] = &[
    ("[", "0", "]"),
    ("[", "", ""),
    ("{\"a\":", "0", "}"),
    ("{\"a\":", "", ""),
    ("[{\"a\":", "0", "}]"),
    ("{\"a\":[", "0", "]}"),
];

pub fn raw() -> impl Strategy<Value = Raw> {
    prop_oneof![
        3 => select(NUMBERS).prop_map(Raw::Text),
        3 => select(STRINGS).prop_map(Raw::Text),
        2 => select(INVALID).prop_map(Raw::Text),
        1 => select(BYTES).prop_map(Raw::Bytes),
        2 => (select(NESTINGS), select(DEPTHS)).prop_map(|((open, inner, close), depth)| {
            Raw::Nested { open, inner, close, depth }
        }),
        1 => (
            select(&["a", "\\n", "\\u0000", "\\u00e9", "\\ud83d\\ude00", "\\\"", "\u{1d11e}"][..]),
            select(&[1_000usize, 70_000, 270_000][..])
        )
            .prop_map(|(unit, len)| Raw::LongString { unit, len }),
        1 => (
            select(&[
                "0",
                "[]",
                "{}",
                "\"\"",
                "null",
                "1e308",
                "[0]",
                "{\"\":0}",
                "[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]",
            ][..]),
            select(&[10_000usize, 100_000][..])
        )
            .prop_map(|(item, len)| Raw::ManyItems { item, len }),
    ]
}

/// Small JSON values of every type, for insertions and type swaps.
pub fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        "\\PC{0,16}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A member name: one the document already uses (anywhere), or a new one.
#[derive(Debug, Clone)]
pub enum Key {
    FromDoc(Index),
    New(String),
}

#[derive(Debug, Clone)]
pub enum NewValue {
    Value(Value),
    /// A copy of another node of the document.
    FromDoc(Index),
    Raw(Raw),
}

/// One edit; `Index` picks a node of the document in pre-order (the root first).
#[derive(Debug, Clone)]
pub enum Edit {
    /// Removes a member or element (the root: the whole document).
    Remove(Index),
    /// Adds a member to an object or an element to an array; replaces a scalar.
    Insert {
        at: Index,
        key: Key,
        value: NewValue,
    },
    /// The same member twice (a duplicate key), the same element twice, or (the root)
    /// the document twice.
    Duplicate(Index),
    /// Renames a member.
    Rename { at: Index, key: Key },
    /// Replaces a node: a type swap, a huge number, a long string, deep nesting...
    Replace { at: Index, value: NewValue },
}

/// How the edited tree is written back. Each option alone keeps the canonical form.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub pretty: bool,
    /// Every character but ASCII letters and digits as a `\uXXXX` escape.
    pub escape_strings: bool,
    pub reverse_members: bool,
    /// Integers as `n.0`.
    pub float_integers: bool,
}

#[derive(Debug, Clone)]
pub enum ByteEdit {
    Flip { at: Index, mask: u8 },
    Set { at: Index, byte: u8 },
    Truncate(Index),
    Insert { at: Index, bytes: Vec<u8> },
    Remove { at: Index, len: usize },
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub edits: Vec<Edit>,
    pub layout: Layout,
    pub bytes: Vec<ByteEdit>,
}

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![
        2 => any::<Index>().prop_map(Key::FromDoc),
        1 => "\\PC{0,12}".prop_map(Key::New),
        1 => select(&["", "__proto__", "schemaVersion", "signature", "meta", "x\ny"][..])
            .prop_map(|k| Key::New(k.to_owned())),
    ]
}

fn new_value() -> impl Strategy<Value = NewValue> {
    prop_oneof![
        4 => value().prop_map(NewValue::Value),
        2 => any::<Index>().prop_map(NewValue::FromDoc),
        4 => raw().prop_map(NewValue::Raw),
    ]
}

pub fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => any::<Index>().prop_map(Edit::Remove),
        2 => (any::<Index>(), key(), new_value())
            .prop_map(|(at, key, value)| Edit::Insert { at, key, value }),
        2 => any::<Index>().prop_map(Edit::Duplicate),
        1 => (any::<Index>(), key()).prop_map(|(at, key)| Edit::Rename { at, key }),
        5 => (any::<Index>(), new_value()).prop_map(|(at, value)| Edit::Replace { at, value }),
    ]
}

pub fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        3 => Just(Layout::default()),
        2 => (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(pretty, escape_strings, reverse_members, float_integers)| Layout {
                pretty,
                escape_strings,
                reverse_members,
                float_integers,
            }
        ),
    ]
}

/// Bytes that change how the rest of a document is read.
const TOKENS: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\"",
    b"\\",
    b"{",
    b"[",
    b"]",
    b"}",
    b",",
    b":",
    b"\n",
    b"\xef\xbb\xbf",
    b"\\u0000",
];

pub fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let token = select(TOKENS).prop_map(<[u8]>::to_vec);
    prop_oneof![
        3 => (any::<Index>(), 1..=255u8).prop_map(|(at, mask)| ByteEdit::Flip { at, mask }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| ByteEdit::Set { at, byte }),
        2 => any::<Index>().prop_map(ByteEdit::Truncate),
        2 => (
            any::<Index>(),
            prop_oneof![token, prop::collection::vec(any::<u8>(), 1..8)]
        )
            .prop_map(|(at, bytes)| ByteEdit::Insert { at, bytes }),
        1 => (any::<Index>(), 1..64usize).prop_map(|(at, len)| ByteEdit::Remove { at, len }),
    ]
}

/// Mostly tree edits (the result often still parses, so the checks behind the parser
/// are reached too), some layout-only plans (canonically equal documents), some
/// byte-level edits.
pub fn plan() -> impl Strategy<Value = Plan> {
    prop_oneof![
        6 => (prop::collection::vec(edit(), 1..4), layout()).prop_map(|(edits, layout)| Plan {
            edits,
            layout,
            bytes: vec![],
        }),
        1 => layout().prop_map(|layout| Plan {
            edits: vec![],
            layout,
            bytes: vec![],
        }),
        2 => prop::collection::vec(byte_edit(), 1..4).prop_map(|bytes| Plan {
            edits: vec![],
            layout: Layout::default(),
            bytes,
        }),
        1 => (
            prop::collection::vec(edit(), 1..3),
            prop::collection::vec(byte_edit(), 1..3)
        )
            .prop_map(|(edits, bytes)| Plan {
                edits,
                layout: Layout::default(),
                bytes,
            }),
    ]
}

/// A JSON tree that can also hold duplicate members and raw text.
#[derive(Debug, Clone)]
enum Node {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Node>),
    Obj(Vec<(String, Node)>),
    Raw(Vec<u8>),
}

impl From<&Value> for Node {
    fn from(v: &Value) -> Node {
        match v {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => Node::Num(n.clone()),
            Value::String(s) => Node::Str(s.clone()),
            Value::Array(items) => Node::Arr(items.iter().map(Node::from).collect()),
            Value::Object(m) => Node::Obj(m.iter().map(|(k, v)| (k.clone(), v.into())).collect()),
        }
    }
}

impl Node {
    fn children(&self) -> usize {
        match self {
            Node::Arr(items) => items.len(),
            Node::Obj(members) => members.len(),
            _ => 0,
        }
    }

    fn child(&self, i: usize) -> Option<&Node> {
        match self {
            Node::Arr(items) => items.get(i),
            Node::Obj(members) => members.get(i).map(|(_, v)| v),
            _ => None,
        }
    }

    fn child_mut(&mut self, i: usize) -> Option<&mut Node> {
        match self {
            Node::Arr(items) => items.get_mut(i),
            Node::Obj(members) => members.get_mut(i).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Every node's path (child positions from the root), in pre-order.
fn paths(root: &Node) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut stack = vec![(root, Vec::new())];
    while let Some((node, path)) = stack.pop() {
        for i in (0..node.children()).rev() {
            if let Some(child) = node.child(i) {
                let mut p = path.clone();
                p.push(i);
                stack.push((child, p));
            }
        }
        out.push(path);
    }
    out
}

fn get<'a>(root: &'a Node, path: &[usize]) -> Option<&'a Node> {
    path.iter().try_fold(root, |node, &i| node.child(i))
}

fn get_mut<'a>(root: &'a mut Node, path: &[usize]) -> Option<&'a mut Node> {
    path.iter().try_fold(root, |node, &i| node.child_mut(i))
}

fn keys(root: &Node) -> Vec<String> {
    paths(root)
        .iter()
        .filter_map(|p| {
            let (last, parent) = p.split_last()?;
            match get(root, parent)? {
                Node::Obj(members) => members.get(*last).map(|(k, _)| k.clone()),
                _ => None,
            }
        })
        .collect()
}

fn resolve_key(root: &Node, key: &Key) -> String {
    match key {
        Key::New(k) => k.clone(),
        Key::FromDoc(i) => {
            let all = keys(root);
            if all.is_empty() {
                "x".to_owned()
            } else {
                all[i.index(all.len())].clone()
            }
        }
    }
}

fn resolve_value(root: &Node, value: &NewValue) -> Node {
    match value {
        NewValue::Value(v) => v.into(),
        NewValue::Raw(r) => Node::Raw(r.bytes()),
        NewValue::FromDoc(i) => {
            let all = paths(root);
            get(root, &all[i.index(all.len())])
                .cloned()
                .unwrap_or(Node::Null)
        }
    }
}

fn pick(root: &Node, at: &Index) -> Vec<usize> {
    let all = paths(root);
    all[at.index(all.len())].clone()
}

fn apply_edit(root: &mut Node, edit: &Edit) {
    match edit {
        Edit::Remove(at) => {
            let path = pick(root, at);
            match path.split_last() {
                None => *root = Node::Raw(Vec::new()),
                Some((&last, parent)) => match get_mut(root, parent) {
                    Some(Node::Arr(items)) => {
                        items.remove(last);
                    }
                    Some(Node::Obj(members)) => {
                        members.remove(last);
                    }
                    _ => {}
                },
            }
        }
        Edit::Insert { at, key, value } => {
            let path = pick(root, at);
            let key = resolve_key(root, key);
            let value = resolve_value(root, value);
            match get_mut(root, &path) {
                Some(Node::Obj(members)) => {
                    let pos = at.index(members.len() + 1);
                    members.insert(pos, (key, value));
                }
                Some(Node::Arr(items)) => {
                    let pos = at.index(items.len() + 1);
                    items.insert(pos, value);
                }
                Some(node) => *node = value,
                None => {}
            }
        }
        Edit::Duplicate(at) => {
            let path = pick(root, at);
            match path.split_last() {
                None => {
                    let mut text = Vec::new();
                    emit(root, &Layout::default(), 0, &mut text);
                    let once = text.clone();
                    text.extend_from_slice(&once);
                    *root = Node::Raw(text);
                }
                Some((&last, parent)) => match get_mut(root, parent) {
                    Some(Node::Arr(items)) => {
                        let copy = items[last].clone();
                        items.insert(last + 1, copy);
                    }
                    Some(Node::Obj(members)) => {
                        let copy = members[last].clone();
                        members.insert(last + 1, copy);
                    }
                    _ => {}
                },
            }
        }
        Edit::Rename { at, key } => {
            let path = pick(root, at);
            let key = resolve_key(root, key);
            if let Some((&last, parent)) = path.split_last() {
                if let Some(Node::Obj(members)) = get_mut(root, parent) {
                    members[last].0 = key;
                }
            }
        }
        Edit::Replace { at, value } => {
            let path = pick(root, at);
            let value = resolve_value(root, value);
            if let Some(node) = get_mut(root, &path) {
                *node = value;
            }
        }
    }
}

fn emit_string(s: &str, layout: &Layout, out: &mut Vec<u8>) {
    if !layout.escape_strings {
        out.extend_from_slice(Value::String(s.to_owned()).to_string().as_bytes());
        return;
    }
    out.push(b'"');
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c as u8);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.extend_from_slice(format!("\\u{unit:04x}").as_bytes());
            }
        }
    }
    out.push(b'"');
}

fn newline(layout: &Layout, indent: usize, out: &mut Vec<u8>) {
    if layout.pretty {
        out.push(b'\n');
        out.extend(std::iter::repeat_n(b' ', indent * 2));
    }
}

fn emit(node: &Node, layout: &Layout, indent: usize, out: &mut Vec<u8>) {
    match node {
        Node::Null => out.extend_from_slice(b"null"),
        Node::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Node::Num(n) if layout.float_integers && (n.is_i64() || n.is_u64()) => {
            out.extend_from_slice(format!("{n}.0").as_bytes())
        }
        Node::Num(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Node::Str(s) => emit_string(s, layout, out),
        Node::Raw(bytes) => out.extend_from_slice(bytes),
        Node::Arr(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                newline(layout, indent + 1, out);
                emit(item, layout, indent + 1, out);
            }
            if !items.is_empty() {
                newline(layout, indent, out);
            }
            out.push(b']');
        }
        Node::Obj(members) => {
            out.push(b'{');
            let order: Vec<&(String, Node)> = if layout.reverse_members {
                members.iter().rev().collect()
            } else {
                members.iter().collect()
            };
            for (i, (k, v)) in order.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                newline(layout, indent + 1, out);
                emit_string(k, layout, out);
                out.extend_from_slice(if layout.pretty { b": " } else { b":" });
                emit(v, layout, indent + 1, out);
            }
            if !members.is_empty() {
                newline(layout, indent, out);
            }
            out.push(b'}');
        }
    }
}

fn apply_byte_edit(bytes: &mut Vec<u8>, edit: &ByteEdit) {
    let len = bytes.len();
    match edit {
        ByteEdit::Insert { at, bytes: ins } => {
            let pos = at.index(len + 1);
            bytes.splice(pos..pos, ins.iter().copied());
        }
        _ if len == 0 => {}
        ByteEdit::Flip { at, mask } => bytes[at.index(len)] ^= mask,
        ByteEdit::Set { at, byte } => bytes[at.index(len)] = *byte,
        ByteEdit::Truncate(at) => bytes.truncate(at.index(len)),
        ByteEdit::Remove { at, len: n } => {
            let start = at.index(len);
            let end = (start + n).min(len);
            bytes.drain(start..end);
        }
    }
}

/// Applies byte-level edits to any input (PEM text, DER, JSON).
pub fn apply_bytes(input: &[u8], edits: &[ByteEdit]) -> Vec<u8> {
    let mut out = input.to_vec();
    for e in edits {
        apply_byte_edit(&mut out, e);
    }
    out
}

/// The bytes of `seed` after `plan`.
pub fn apply(seed: &Value, plan: &Plan) -> Vec<u8> {
    let mut root = Node::from(seed);
    for edit in &plan.edits {
        apply_edit(&mut root, edit);
    }
    let mut out = Vec::new();
    emit(&root, &plan.layout, 0, &mut out);
    apply_bytes(&out, &plan.bytes)
}

/// Whether a plan only re-lays out the document (its canonical form is unchanged).
pub fn layout_only(plan: &Plan) -> bool {
    plan.edits.is_empty() && plan.bytes.is_empty()
}

/// `depth` nested arrays, unclosed when `closed` is false: `[[[[…`.
pub fn nested_arrays(depth: usize, closed: bool) -> Vec<u8> {
    Raw::Nested {
        open: "[",
        inner: if closed { "0" } else { "" },
        close: if closed { "]" } else { "" },
        depth,
    }
    .bytes()
}

/// `depth` nested objects: `{"a":{"a":…0}}`.
pub fn nested_objects(depth: usize, closed: bool) -> Vec<u8> {
    Raw::Nested {
        open: "{\"a\":",
        inner: if closed { "0" } else { "" },
        close: if closed { "}" } else { "" },
        depth,
    }
    .bytes()
}

/// One of each kind of log injection: [`MARKER`] after a new line, a carriage return, a
/// terminal escape, NEL, U+2028 / U+2029, DEL, a NUL, and a whole forged line.
pub fn injections() -> Vec<String> {
    let mut all: Vec<String> = STRINGS
        .iter()
        .filter(|s| s.contains(MARKER))
        .filter_map(|s| serde_json::from_str::<String>(s).ok())
        .collect();
    for c in ['\u{2029}', '\u{7f}', '\u{0}', '\t', '\u{c}', '\u{b}'] {
        all.push(format!("x{c}{MARKER}"));
    }
    all
}

/// Text meant to forge a log line: a control character or a line separator (raw, once
/// decoded) right before [`MARKER`].
pub fn injection() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => select(injections()),
        1 => (
            "\\PC{0,8}",
            prop_oneof![
                any::<char>().prop_filter("a control or separator", |c| c.is_control()
                    || matches!(c, '\u{2028}' | '\u{2029}')),
                select(&['\n', '\r', '\u{1b}', '\u{85}', '\u{2028}', '\u{2029}', '\u{0}'][..]),
            ]
        )
            .prop_map(|(prefix, c)| format!("{prefix}{c}{MARKER}")),
    ]
}

/// Where in `log` a raw control character or line separator comes right before
/// [`MARKER`]: each is a line (or terminal state) an input forged. Escaped text
/// (`\n`, `\u{1b}`) does not count.
pub fn forged_markers(log: &str) -> Vec<usize> {
    log.match_indices(MARKER)
        .filter(|(at, _)| {
            log[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
        })
        .map(|(at, _)| at)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;

    #[test]
    fn an_empty_plan_writes_the_document_back() {
        let doc = serde_json::json!({"b": [1, "x\ny", null], "a": {"c": 1.5}});
        let out = apply(&doc, &Plan::default());
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), doc);
    }

    #[test]
    fn layouts_keep_the_value() {
        let doc = serde_json::json!({"b": [1, "é\u{1f600}\n", null], "a": {"c": -7}});
        let mut runner = TestRunner::deterministic();
        for _ in 0..64 {
            let layout = layout().new_tree(&mut runner).unwrap().current();
            let out = apply(
                &doc,
                &Plan {
                    layout: layout.clone(),
                    ..Plan::default()
                },
            );
            let back: Value = serde_json::from_slice(&out).unwrap();
            if layout.float_integers {
                assert_eq!(back["a"]["c"], -7.0, "{layout:?}");
            } else {
                assert_eq!(back, doc, "{layout:?}");
            }
        }
    }

    #[test]
    fn forged_markers_are_found_and_escaped_ones_are_not() {
        assert_eq!(forged_markers(&format!("a\n{MARKER}")), [2]);
        assert!(forged_markers(&format!("a\\n{MARKER} {MARKER}")).is_empty());
        for text in injections() {
            assert_eq!(forged_markers(&text).len(), 1, "{text:?}");
            assert!(forged_markers(&format!("{text:?}")).is_empty(), "{text:?}");
        }
    }
}
