use nixfleet_trust::jcs::{
    canonicalize, format_number, sha256_hex, to_canonical, JcsError, MAX_DEPTH,
};
use proptest::prelude::*;
use serde_json::Value;

fn canon(text: &str) -> Result<String, JcsError> {
    canonicalize(text.as_bytes()).map(|b| String::from_utf8(b).expect("canonical output is UTF-8"))
}

#[test]
fn rfc8785_section_3_2_2_example() {
    let input = r#"{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"#;
    let expected = "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],\"string\":\"€$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}";
    assert_eq!(canon(input).unwrap(), expected);
}

#[test]
fn rfc8785_section_3_2_3_sorting() {
    let input = r#"{
  "\u20ac": "Euro Sign",
  "\r": "Carriage Return",
  "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One",
  "\ud83d\ude00": "Emoji: Grinning Face",
  "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"
}"#;
    let expected = concat!(
        "{\"\\r\":\"Carriage Return\",",
        "\"1\":\"One\",",
        "\"\u{80}\":\"Control\",",
        "\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",",
        "\"\u{20ac}\":\"Euro Sign\",",
        "\"\u{1f600}\":\"Emoji: Grinning Face\",",
        "\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
    );
    assert_eq!(canon(input).unwrap(), expected);
}

/// RFC 8785 Appendix B (finite entries).
const APPENDIX_B: &[(u64, &str)] = &[
    (0x0000000000000000, "0"),
    (0x8000000000000000, "0"),
    (0x0000000000000001, "5e-324"),
    (0x8000000000000001, "-5e-324"),
    (0x7fefffffffffffff, "1.7976931348623157e+308"),
    (0xffefffffffffffff, "-1.7976931348623157e+308"),
    (0x4340000000000000, "9007199254740992"),
    (0xc340000000000000, "-9007199254740992"),
    (0x4430000000000000, "295147905179352830000"),
    (0x44b52d02c7e14af5, "9.999999999999997e+22"),
    (0x44b52d02c7e14af6, "1e+23"),
    (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
    (0x444b1ae4d6e2ef4e, "999999999999999700000"),
    (0x444b1ae4d6e2ef4f, "999999999999999900000"),
    (0x444b1ae4d6e2ef50, "1e+21"),
    (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
    (0x3eb0c6f7a0b5ed8d, "0.000001"),
    (0x41b3de4355555553, "333333333.3333332"),
    (0x41b3de4355555554, "333333333.33333325"),
    (0x41b3de4355555555, "333333333.3333333"),
    (0x41b3de4355555556, "333333333.3333334"),
    (0x41b3de4355555557, "333333333.33333343"),
    (0xbecbf647612f3696, "-0.0000033333333333333333"),
    (0x43143ff3c1cb0959, "1424953923781206.2"),
];

#[test]
fn appendix_b_formatter() {
    for &(bits, expected) in APPENDIX_B {
        assert_eq!(
            format_number(f64::from_bits(bits)),
            expected,
            "bits {bits:#018x}"
        );
    }
}

#[test]
fn appendix_b_via_canonicalize() {
    for &(bits, expected) in APPENDIX_B {
        let f = f64::from_bits(bits);
        // Shortest round-trip form and a 17-significant-digit form must both parse back to f.
        for text in [format!("{f:e}"), format!("{f:.16e}")] {
            assert_eq!(canon(&text).unwrap(), expected, "input {text}");
            assert_eq!(
                canon(&format!("[{text}]")).unwrap(),
                format!("[{expected}]")
            );
        }
    }
}

#[test]
fn non_finite_numbers_refused() {
    // serde_json refuses overflowing literals itself; either way the input is rejected.
    for text in ["1e400", "-1e400", "NaN", "Infinity", "[1e999]"] {
        assert!(canon(text).is_err(), "{text}");
    }
}

#[test]
fn numbers_are_doubles() {
    assert_eq!(canon("9007199254740993").unwrap(), "9007199254740992");
    assert_eq!(
        canon("18446744073709551615").unwrap(),
        "18446744073709552000"
    );
    assert_eq!(
        canon("-9223372036854775808").unwrap(),
        "-9223372036854776000"
    );
    assert_eq!(canon("1.0").unwrap(), "1");
    assert_eq!(canon("-0").unwrap(), "0");
    assert_eq!(canon("-0.0").unwrap(), "0");
    assert_eq!(canon("1E2").unwrap(), "100");
    assert_eq!(canon(&format!("1{}", "0".repeat(300))).unwrap(), "1e+300");
    assert!(canon(&"9".repeat(400)).is_err(), "beyond the double range");
}

#[test]
fn string_escaping() {
    assert_eq!(
        canon(r#""\u0000\u0001\b\t\n\u000b\f\r\u001f \u007f\/é""#).unwrap(),
        "\"\\u0000\\u0001\\b\\t\\n\\u000b\\f\\r\\u001f \u{7f}/é\""
    );
}

#[test]
fn whitespace_and_structure() {
    assert_eq!(
        canon(" \n{ \"b\" : [ 1 , { } , [ ] ] , \"a\" : \"x\" } \r\n\t").unwrap(),
        r#"{"a":"x","b":[1,{},[]]}"#
    );
    assert_eq!(canon("true").unwrap(), "true");
    assert!(matches!(canon("1 2"), Err(JcsError::Parse(_))));
    assert!(matches!(canon(""), Err(JcsError::Parse(_))));
    assert!(matches!(canon("[1,]"), Err(JcsError::Parse(_))));
    let err = canon("{\n\"a\": tru}").unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn not_utf8_refused() {
    assert_eq!(canonicalize(b"\"\xff\""), Err(JcsError::NotUtf8));
    assert!(
        canonicalize(b"\xef\xbb\xbf{}").is_err(),
        "a BOM is not JSON"
    );
}

#[test]
fn duplicate_keys_refused() {
    assert_eq!(
        canon(r#"{"a":1,"a":2}"#),
        Err(JcsError::DuplicateKey("a".into()))
    );
    assert_eq!(
        canon(r#"{"a":1,"b":2,"a":1}"#),
        Err(JcsError::DuplicateKey("a".into()))
    );
    // Same key spelled with an escape is still the same key.
    assert_eq!(
        canon(r#"{"x":{"k":1,"\u006b":2}}"#),
        Err(JcsError::DuplicateKey("k".into()))
    );
    assert_eq!(
        canon(r#"[{"a":1},{"a":2}]"#).unwrap(),
        r#"[{"a":1},{"a":2}]"#
    );
}

#[test]
fn lone_surrogates_refused() {
    for text in [
        r#""\ud800""#,
        r#""\udc00""#,
        r#""\ud800x""#,
        r#"{"\ud83d":1}"#,
        r#"["\ude00\ud83d"]"#,
    ] {
        assert!(matches!(canon(text), Err(JcsError::Parse(_))), "{text}");
    }
    assert_eq!(canon(r#""\ud83d\ude00""#).unwrap(), "\"\u{1f600}\"");
}

#[test]
fn depth_limit() {
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    assert_eq!(canon(&nested(MAX_DEPTH)).unwrap(), nested(MAX_DEPTH));
    assert_eq!(canon(&nested(MAX_DEPTH + 1)), Err(JcsError::TooDeep));
    assert_eq!(canon(&"[".repeat(100_000)), Err(JcsError::TooDeep));
    assert_eq!(canon(&"{\"a\":".repeat(100_000)), Err(JcsError::TooDeep));
    assert_eq!(canon(&"[{\"a\":".repeat(50_000)), Err(JcsError::TooDeep));
}

#[test]
fn to_canonical_sorts_struct_fields() {
    #[derive(serde::Serialize)]
    struct S {
        zeta: u32,
        alpha: &'static str,
        mid: Vec<f64>,
    }
    let out = to_canonical(&S {
        zeta: 1,
        alpha: "a",
        mid: vec![0.5, 1e21],
    })
    .unwrap();
    assert_eq!(out, br#"{"alpha":"a","mid":[0.5,1e+21],"zeta":1}"#);
}

#[test]
fn sha256_hex_known_values() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn canonical_is_fixed_point(v in arb_json()) {
        let first = canonicalize(serde_json::to_string(&v).unwrap().as_bytes()).unwrap();
        prop_assert_eq!(&canonicalize(&first).unwrap(), &first);
        // Layout must not matter.
        prop_assert_eq!(&canonicalize(serde_json::to_string_pretty(&v).unwrap().as_bytes()).unwrap(), &first);
        prop_assert_eq!(&to_canonical(&v).unwrap(), &first);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = canonicalize(&bytes);
    }

    #[test]
    fn json_like_text_never_panics(text in r#"[\[\]{}:,"\\0-9eE.+\-tfnrulasu \n]{0,300}"#) {
        if let Ok(out) = canonicalize(text.as_bytes()) {
            prop_assert_eq!(canonicalize(&out).unwrap(), out);
        }
    }
}
