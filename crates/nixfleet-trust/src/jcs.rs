//! RFC 8785 JSON Canonicalization Scheme (JCS).
//!
//! Signatures cover canonical bytes, so every signer and verifier must agree on one byte
//! sequence per JSON value. Input is I-JSON (RFC 7493): duplicate object keys, lone
//! surrogates and non-finite numbers are refused rather than guessed at.
//!
//! Numbers are IEEE-754 doubles, as RFC 8785 requires: an integer beyond ±2^53 becomes its
//! nearest double (`9007199254740993` canonicalises to `9007199254740992`). Artifacts that
//! need exact large integers must carry them as strings.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Most nested arrays/objects accepted; deeper input is refused instead of risking the stack.
pub const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JcsError {
    #[error("JSON input is not valid UTF-8; canonical JSON must be UTF-8 text")]
    NotUtf8,
    #[error("input is not valid JSON: {0}")]
    Parse(String),
    #[error("JSON object has the key {0:?} more than once; duplicate keys are refused because parsers disagree on which one wins")]
    DuplicateKey(String),
    #[error("JSON nests arrays/objects deeper than {MAX_DEPTH} levels; flatten the document")]
    TooDeep,
    #[error(
        "JSON contains a number that is not finite (NaN or infinity), which JSON cannot represent"
    )]
    NonFinite,
}

/// Parses `input` (UTF-8 JSON text, exactly one value, surrounding whitespace allowed) and
/// returns its RFC 8785 canonical form.
pub fn canonicalize(input: &[u8]) -> Result<Vec<u8>, JcsError> {
    let text = std::str::from_utf8(input).map_err(|_| JcsError::NotUtf8)?;
    let value = parse(text)?;
    let mut out = Vec::with_capacity(input.len());
    write_value(&value, &mut out);
    Ok(out)
}

/// Serialises `value` with serde_json, then canonicalises it.
///
/// serde_json writes a non-finite `f32`/`f64` as `null`, so such a field canonicalises to
/// `null`; artifact types should not carry floats.
pub fn to_canonical<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, JcsError> {
    let json = serde_json::to_vec(value).map_err(|e| JcsError::Parse(e.to_string()))?;
    canonicalize(&json)
}

/// The canonical form of the object `input` with only the top-level members named in
/// `keep` (those present). `input` is parsed as received, so the projection is of the
/// bytes a signature covers, never of a re-serialised struct.
pub fn canonical_members(input: &[u8], keep: &[&str]) -> Result<Vec<u8>, JcsError> {
    let text = std::str::from_utf8(input).map_err(|_| JcsError::NotUtf8)?;
    let value = match parse(text)? {
        Value::Object(members) => Value::Object(
            members
                .into_iter()
                .filter(|(k, _)| keep.contains(&k.as_str()))
                .collect(),
        ),
        _ => return Err(JcsError::Parse("expected a JSON object".to_owned())),
    };
    let mut out = Vec::with_capacity(input.len());
    write_value(&value, &mut out);
    Ok(out)
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

enum Value {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Value>),
    /// Members already sorted by UTF-16 code units, keys unique.
    Object(Vec<(String, Value)>),
}

fn parse(text: &str) -> Result<Value, JcsError> {
    // Our own errors travel through serde as strings, so the typed one is kept aside here.
    let failure = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    // The seed enforces MAX_DEPTH before recursing, so serde_json's fixed limit is redundant
    // and would otherwise turn depth errors into untyped parse errors.
    de.disable_recursion_limit();
    let result = ValueSeed {
        depth: 0,
        failure: &failure,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match (result, failure.into_inner()) {
        (_, Some(err)) => Err(err),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(JcsError::Parse(e.to_string())),
    }
}

#[derive(Clone, Copy)]
struct ValueSeed<'a> {
    /// Containers enclosing the value about to be read.
    depth: usize,
    failure: &'a RefCell<Option<JcsError>>,
}

impl ValueSeed<'_> {
    fn fail<E: de::Error>(&self, err: JcsError) -> E {
        let msg = err.to_string();
        *self.failure.borrow_mut() = Some(err);
        E::custom(msg)
    }

    fn enter<E: de::Error>(&self) -> Result<Self, E> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(self.fail(JcsError::TooDeep));
        }
        Ok(ValueSeed {
            depth,
            failure: self.failure,
        })
    }

    fn number<E: de::Error>(&self, n: f64) -> Result<Value, E> {
        if n.is_finite() {
            Ok(Value::Number(n))
        } else {
            Err(self.fail(JcsError::NonFinite))
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    // Integer -> f64 casts round to nearest, matching how a JSON parser reads the literal.
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.number(v as f64)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.number(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.number(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut members: Vec<(String, Value)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(inner)?;
            members.push((key, value));
        }
        // Stable sort, so equal keys end up adjacent and duplicates are found in one pass.
        members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
        if let Some(pair) = members.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(self.fail(JcsError::DuplicateKey(pair[0].0.clone())));
        }
        Ok(Value::Object(members))
    }
}

fn write_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(*n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_value(item, out);
            }
            out.push(b'}');
        }
    }
}

/// ECMAScript `Number.prototype.toString` of a finite double (RFC 8785 §3.2.2.3).
///
/// Only meaningful for finite values: NaN and infinities have no JSON form.
pub fn format_number(n: f64) -> String {
    number_str(n, &mut ryu_js::Buffer::new()).to_owned()
}

fn number_str(n: f64, buf: &mut ryu_js::Buffer) -> &str {
    if n == 0.0 {
        // Covers -0, which ECMAScript prints as "0".
        "0"
    } else {
        buf.format(n)
    }
}

fn write_number(n: f64, out: &mut Vec<u8>) {
    out.extend_from_slice(number_str(n, &mut ryu_js::Buffer::new()).as_bytes());
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}
