//! Structure-aware mutations of DER (certificates, CSRs): the input is read as a tree of
//! TLVs (descending into constructed values, and into OCTET and BIT STRINGs that hold
//! exactly one TLV, as extensions do), edited, and written back with consistent lengths
//! unless an edit asks for a broken length; byte-level edits come last.

use proptest::prelude::*;
use proptest::sample::{select, Index};

use crate::json::{apply_bytes, byte_edit, ByteEdit};

/// Deepest tree this reader builds; anything deeper stays opaque bytes.
const READ_DEPTH: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Prim {
        tag: u8,
        body: Vec<u8>,
    },
    Cons {
        tag: u8,
        items: Vec<Node>,
    },
    /// An OCTET STRING (prefix empty) or BIT STRING (prefix = unused-bits byte) holding
    /// one TLV.
    Wrapped {
        tag: u8,
        prefix: Vec<u8>,
        inner: Box<Node>,
    },
}

/// One TLV's header: tag, length, header size. Single-byte tags, definite lengths only.
fn header(input: &[u8]) -> Option<(u8, usize, usize)> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    if first < 0x80 {
        return Some((tag, usize::from(first), 2));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 || rest.len() < n {
        return None;
    }
    let len = rest[..n]
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    Some((tag, len, 2 + n))
}

fn read_all(mut input: &[u8], depth: usize) -> Option<Vec<Node>> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let (node, used) = read_one(input, depth)?;
        out.push(node);
        input = &input[used..];
    }
    Some(out)
}

fn read_one(input: &[u8], depth: usize) -> Option<(Node, usize)> {
    let (tag, len, hdr) = header(input)?;
    let body = input.get(hdr..hdr.checked_add(len)?)?;
    let node = if depth >= READ_DEPTH {
        Node::Prim {
            tag,
            body: body.to_vec(),
        }
    } else if tag & 0x20 != 0 {
        match read_all(body, depth + 1) {
            Some(items) => Node::Cons { tag, items },
            None => Node::Prim {
                tag,
                body: body.to_vec(),
            },
        }
    } else if tag == 0x04 || (tag == 0x03 && body.first() == Some(&0)) {
        let split = usize::from(tag == 0x03);
        match read_one(&body[split..], depth + 1) {
            Some((inner, used)) if split + used == body.len() => Node::Wrapped {
                tag,
                prefix: body[..split].to_vec(),
                inner: Box::new(inner),
            },
            _ => Node::Prim {
                tag,
                body: body.to_vec(),
            },
        }
    } else {
        Node::Prim {
            tag,
            body: body.to_vec(),
        }
    };
    Some((node, hdr + len))
}

/// How a node's length is written.
#[derive(Debug, Clone, Copy)]
pub enum Length {
    /// Long form where the short one would do (BER, not DER).
    NonMinimal,
    /// `0x80`: BER's indefinite length, forbidden in DER.
    Indefinite,
    /// The true length plus this (wrong) amount.
    Off(i8),
    /// A claimed length of about 4 GiB.
    Huge,
}

/// What replaces a node's content.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Vec<u8>),
    /// `depth` nested SEQUENCEs (or another constructed `tag`).
    Nested {
        tag: u8,
        depth: usize,
    },
    Zeros(usize),
    /// A copy of another node.
    FromDoc(Index),
}

#[derive(Debug, Clone)]
pub enum Edit {
    Remove(Index),
    Duplicate(Index),
    SetTag { at: Index, tag: u8 },
    Replace { at: Index, body: Body },
    Length { at: Index, length: Length },
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub edits: Vec<Edit>,
    pub bytes: Vec<ByteEdit>,
}

/// Tags worth trying: universal types, context tags, and constructed forms.
const TAGS: &[u8] = &[
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0c, 0x13, 0x16, 0x17, 0x18, 0x1e, 0x30, 0x31, 0x80, 0x82,
    0x86, 0xa0, 0xa3, 0x00, 0xff,
];

pub fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..16).prop_map(Body::Bytes),
        2 => (select(&[0x30u8, 0x31, 0xa0, 0xa3][..]), select(&[40usize, 64, 1_000, 100_000][..]))
            .prop_map(|(tag, depth)| Body::Nested { tag, depth }),
        1 => select(&[0usize, 255, 65_536, 300_000][..]).prop_map(Body::Zeros),
        2 => any::<Index>().prop_map(Body::FromDoc),
    ]
}

pub fn edit() -> impl Strategy<Value = Edit> {
    let length = prop_oneof![
        Just(Length::NonMinimal),
        Just(Length::Indefinite),
        (-3i8..=3).prop_map(Length::Off),
        Just(Length::Huge),
    ];
    prop_oneof![
        3 => any::<Index>().prop_map(Edit::Remove),
        2 => any::<Index>().prop_map(Edit::Duplicate),
        2 => (any::<Index>(), select(TAGS)).prop_map(|(at, tag)| Edit::SetTag { at, tag }),
        4 => (any::<Index>(), body()).prop_map(|(at, body)| Edit::Replace { at, body }),
        2 => (any::<Index>(), length).prop_map(|(at, length)| Edit::Length { at, length }),
    ]
}

pub fn plan() -> impl Strategy<Value = Plan> {
    prop_oneof![
        5 => prop::collection::vec(edit(), 1..4).prop_map(|edits| Plan { edits, bytes: vec![] }),
        3 => prop::collection::vec(byte_edit(), 1..4).prop_map(|bytes| Plan { edits: vec![], bytes }),
        1 => (prop::collection::vec(edit(), 1..3), prop::collection::vec(byte_edit(), 1..3))
            .prop_map(|(edits, bytes)| Plan { edits, bytes }),
    ]
}

fn children(node: &Node) -> usize {
    match node {
        Node::Cons { items, .. } => items.len(),
        Node::Wrapped { .. } => 1,
        Node::Prim { .. } => 0,
    }
}

fn child_mut(node: &mut Node, i: usize) -> Option<&mut Node> {
    match node {
        Node::Cons { items, .. } => items.get_mut(i),
        Node::Wrapped { inner, .. } if i == 0 => Some(inner),
        _ => None,
    }
}

fn child(node: &Node, i: usize) -> Option<&Node> {
    match node {
        Node::Cons { items, .. } => items.get(i),
        Node::Wrapped { inner, .. } if i == 0 => Some(inner),
        _ => None,
    }
}

fn paths(root: &Node) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut stack = vec![(root, Vec::new())];
    while let Some((node, path)) = stack.pop() {
        for i in (0..children(node)).rev() {
            if let Some(c) = child(node, i) {
                let mut p = path.clone();
                p.push(i);
                stack.push((c, p));
            }
        }
        out.push(path);
    }
    out
}

fn get<'a>(root: &'a Node, path: &[usize]) -> Option<&'a Node> {
    path.iter().try_fold(root, |n, &i| child(n, i))
}

fn get_mut<'a>(root: &'a mut Node, path: &[usize]) -> Option<&'a mut Node> {
    path.iter().try_fold(root, |n, &i| child_mut(n, i))
}

fn tag_of(node: &Node) -> u8 {
    match node {
        Node::Prim { tag, .. } | Node::Cons { tag, .. } | Node::Wrapped { tag, .. } => *tag,
    }
}

fn set_tag(node: &mut Node, new: u8) {
    match node {
        Node::Prim { tag, .. } | Node::Cons { tag, .. } | Node::Wrapped { tag, .. } => *tag = new,
    }
}

fn length_bytes(len: usize, form: Option<Length>) -> Vec<u8> {
    let len = match form {
        Some(Length::Indefinite) => return vec![0x80],
        Some(Length::Huge) => return vec![0x84, 0xff, 0xff, 0xff, 0xf0],
        Some(Length::Off(d)) => len.saturating_add_signed(isize::from(d)),
        _ => len,
    };
    if len < 0x80 && !matches!(form, Some(Length::NonMinimal)) {
        return vec![len as u8];
    }
    let bytes = (len as u64).to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count().min(7);
    let mut out = vec![0x80 | (8 - skip) as u8];
    out.extend_from_slice(&bytes[skip..]);
    out
}

/// DER of `depth` nested constructed `tag`s around nothing, built in one pass.
pub fn nested(tag: u8, depth: usize) -> Vec<u8> {
    // Content length of each level, innermost first.
    let mut lens = Vec::with_capacity(depth);
    let mut inner = 0usize;
    for _ in 0..depth {
        lens.push(inner);
        inner += 1 + length_bytes(inner, None).len();
    }
    let mut out = Vec::with_capacity(inner);
    for &len in lens.iter().rev() {
        out.push(tag);
        out.extend_from_slice(&length_bytes(len, None));
    }
    out
}

fn encode(node: &Node, forms: &[(Vec<usize>, Length)], path: &mut Vec<usize>, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    match node {
        Node::Prim { body: b, .. } => body.extend_from_slice(b),
        Node::Cons { items, .. } => {
            for (i, item) in items.iter().enumerate() {
                path.push(i);
                encode(item, forms, path, &mut body);
                path.pop();
            }
        }
        Node::Wrapped { prefix, inner, .. } => {
            body.extend_from_slice(prefix);
            path.push(0);
            encode(inner, forms, path, &mut body);
            path.pop();
        }
    }
    let form = forms.iter().find(|(p, _)| p == path).map(|(_, f)| *f);
    out.push(tag_of(node));
    out.extend_from_slice(&length_bytes(body.len(), form));
    out.extend_from_slice(&body);
}

fn pick(root: &Node, at: &Index) -> Vec<usize> {
    let all = paths(root);
    all[at.index(all.len())].clone()
}

/// The bytes of `seed` (one DER value) after `plan`; an unreadable seed gets only the
/// byte-level edits.
pub fn apply(seed: &[u8], plan: &Plan) -> Vec<u8> {
    let Some((mut root, used)) = read_one(seed, 0).filter(|(_, used)| *used == seed.len()) else {
        return apply_bytes(seed, &plan.bytes);
    };
    debug_assert_eq!(used, seed.len());
    let mut forms: Vec<(Vec<usize>, Length)> = Vec::new();
    let mut whole_removed = false;
    for edit in &plan.edits {
        match edit {
            Edit::Remove(at) => {
                let path = pick(&root, at);
                match path.split_last() {
                    None => whole_removed = true,
                    Some((&last, parent)) => match get_mut(&mut root, parent) {
                        Some(Node::Cons { items, .. }) => {
                            items.remove(last);
                        }
                        Some(node @ Node::Wrapped { .. }) => {
                            let tag = tag_of(node);
                            *node = Node::Prim {
                                tag,
                                body: Vec::new(),
                            };
                        }
                        _ => {}
                    },
                }
            }
            Edit::Duplicate(at) => {
                let path = pick(&root, at);
                if let Some((&last, parent)) = path.split_last() {
                    if let Some(Node::Cons { items, .. }) = get_mut(&mut root, parent) {
                        let copy = items[last].clone();
                        items.insert(last + 1, copy);
                    }
                }
            }
            Edit::SetTag { at, tag } => {
                let path = pick(&root, at);
                if let Some(node) = get_mut(&mut root, &path) {
                    set_tag(node, *tag);
                }
            }
            Edit::Replace { at, body } => {
                let path = pick(&root, at);
                let new = match body {
                    Body::Bytes(b) => b.clone(),
                    Body::Nested { tag, depth } => nested(*tag, *depth),
                    Body::Zeros(n) => vec![0; *n],
                    Body::FromDoc(i) => {
                        let from = pick(&root, i);
                        let mut out = Vec::new();
                        if let Some(n) = get(&root, &from) {
                            encode(n, &[], &mut Vec::new(), &mut out);
                        }
                        out
                    }
                };
                if let Some(node) = get_mut(&mut root, &path) {
                    let tag = tag_of(node);
                    *node = Node::Prim { tag, body: new };
                }
            }
            Edit::Length { at, length } => forms.push((pick(&root, at), *length)),
        }
    }
    let mut out = Vec::new();
    if !whole_removed {
        encode(&root, &forms, &mut Vec::new(), &mut out);
    }
    apply_bytes(&out, &plan.bytes)
}

/// `seed` once per node, that node's content replaced by `depth` nested `tag`s (with
/// every enclosing length fixed up).
pub fn each_node_nested(seed: &[u8], tag: u8, depth: usize) -> Vec<Vec<u8>> {
    each_node_replaced(seed, &nested(tag, depth))
}

/// `seed` once per node, that node's content replaced by `content` (with every
/// enclosing length fixed up).
pub fn each_node_replaced(seed: &[u8], content: &[u8]) -> Vec<Vec<u8>> {
    let Some((root, _)) = read_one(seed, 0).filter(|(_, used)| *used == seed.len()) else {
        return Vec::new();
    };
    paths(&root)
        .into_iter()
        .map(|path| {
            let mut copy = root.clone();
            if let Some(node) = get_mut(&mut copy, &path) {
                let tag = tag_of(node);
                *node = Node::Prim {
                    tag,
                    body: content.to_vec(),
                };
            }
            let mut out = Vec::new();
            encode(&copy, &[], &mut Vec::new(), &mut out);
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_back_unchanged() {
        let der = [
            0x30, 0x0b, 0x02, 0x01, 0x05, 0x04, 0x06, 0x30, 0x04, 0x0c, 0x02, b'h', b'i',
        ];
        assert_eq!(apply(&der, &Plan::default()), der);
        let (root, _) = read_one(&der, 0).unwrap();
        assert_eq!(paths(&root).len(), 5, "{root:?}");
    }

    #[test]
    fn deep_nesting_is_built_in_one_pass() {
        let der = nested(0x30, 100_000);
        assert_eq!(header(&der).map(|(t, _, _)| t), Some(0x30));
        let (_, len, hdr) = header(&der).unwrap();
        assert_eq!(len + hdr, der.len());
        assert_eq!(nested(0x30, 2), [0x30, 0x02, 0x30, 0x00]);
    }
}
