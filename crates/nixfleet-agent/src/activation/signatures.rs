//! Whether every path of a closure carries a signature by a pinned cache key (trust.json's
//! `cacheKeys`), from the local store's path-info (`nix path-info --json --recursive`).
//! Pure: the shell runs the command and hands the bytes here.
//!
//! `nix-store --realise` with `require-sigs` only checks what it substitutes; a path that is
//! already valid in the local store (built there, copied in by hand) passes it untouched.
//! This check covers both: a Nix binary-cache signature is ed25519 over the fingerprint
//! `1;<store path>;<narHash as sha256:base32>;<narSize>;<references, full store paths,
//! sorted, comma-separated>`, and every path must carry at least one that verifies against
//! a pinned key. Being "ultimate" (built locally) or content-addressed counts for nothing:
//! only a signature does.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use nixfleet_trust::cache;
use serde::Deserialize;

/// Nix's base-32 alphabet (no e, o, u, t).
const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";
const SHA256_LEN: usize = 32;
/// Key and signature names quoted in a reason, at most (a reason goes into a report).
const MAX_NAMES: usize = 4;
const MAX_NAME_CHARS: usize = 64;

pub use nixfleet_trust::cache::CacheKey;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheKeyError {
    #[error("the trust file pins no cacheKeys, so no closure can be verified; add the binary cache's public key (name:base64, as `nix key convert-secret-to-public` prints it) to cacheKeys")]
    NoKeys,
    #[error("cacheKeys entry {0:?} in the trust file is not a Nix binary-cache public key (name:base64 of 32 ed25519 key bytes); fix it in trust.json")]
    Invalid(String),
}

/// Parses trust.json's `cacheKeys` (`name:base64`).
pub fn parse_cache_keys(keys: &[String]) -> Result<Vec<CacheKey>, CacheKeyError> {
    if keys.is_empty() {
        return Err(CacheKeyError::NoKeys);
    }
    keys.iter()
        .map(|text| CacheKey::parse(text).ok_or_else(|| CacheKeyError::Invalid(text.clone())))
        .collect()
}

/// What the signature check needs of one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// Full store path.
    pub path: String,
    /// `sha256:<nix base32>`, as the fingerprint spells it.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Full store paths.
    pub references: Vec<String>,
    /// `name:base64` signatures recorded in the local store.
    pub signatures: Vec<String>,
}

impl PathInfo {
    /// The bytes a binary-cache signature of this path is over.
    pub fn fingerprint(&self) -> String {
        cache::fingerprint(
            &self.path,
            &self.nar_hash,
            self.nar_size,
            self.references.iter().map(String::as_str),
        )
    }

    /// The name of the first pinned key with a valid signature on this path.
    pub fn signed_by<'k>(&self, keys: &'k [CacheKey]) -> Option<&'k str> {
        cache::signed_by(&self.fingerprint(), &self.signatures, keys)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathInfoError {
    #[error("nix path-info printed no JSON path listing ({0}); is this Nix version supported?")]
    Json(String),
    #[error("nix path-info says {0} is not valid in the local store")]
    NotValid(String),
    #[error("nix path-info gave no {field} for {path}")]
    Missing { path: String, field: &'static str },
    #[error("narHash {hash:?} of {path} is not a SHA-256 hash in a form Nix prints")]
    NarHash { path: String, hash: String },
}

/// One entry as `nix path-info --json` prints it (list entries carry `path`; the map
/// form of later Nix versions keys entries by path).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPathInfo {
    path: Option<String>,
    valid: Option<bool>,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    references: Option<Vec<String>>,
    #[serde(default)]
    signatures: Vec<String>,
}

/// Parses `nix path-info --json` output: a list of entries (Nix 2.8) or a map from store
/// path to entry (later versions; `null` for an invalid path).
pub fn parse_path_info(json: &[u8]) -> Result<Vec<PathInfo>, PathInfoError> {
    let json_error = |e: serde_json::Error| PathInfoError::Json(e.to_string());
    let entries: Vec<(Option<String>, Option<RawPathInfo>)> =
        match json.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => serde_json::from_slice::<Vec<RawPathInfo>>(json)
                .map_err(json_error)?
                .into_iter()
                .map(|raw| (None, Some(raw)))
                .collect(),
            Some(b'{') => serde_json::from_slice::<BTreeMap<String, Option<RawPathInfo>>>(json)
                .map_err(json_error)?
                .into_iter()
                .map(|(path, raw)| (Some(path), raw))
                .collect(),
            _ => return Err(PathInfoError::Json("neither a list nor a map".to_owned())),
        };
    entries
        .into_iter()
        .map(|(key, raw)| {
            let Some(raw) = raw else {
                return Err(PathInfoError::NotValid(key.unwrap_or_default()));
            };
            let path = raw.path.or(key).ok_or(PathInfoError::Missing {
                path: "an entry".to_owned(),
                field: "path",
            })?;
            if raw.valid == Some(false) {
                return Err(PathInfoError::NotValid(path));
            }
            let missing = |field| PathInfoError::Missing {
                path: path.clone(),
                field,
            };
            let hash = raw.nar_hash.ok_or_else(|| missing("narHash"))?;
            let nar_size = raw.nar_size.ok_or_else(|| missing("narSize"))?;
            let references = raw.references.ok_or_else(|| missing("references"))?;
            let nar_hash = sha256_base32(&hash).ok_or_else(|| PathInfoError::NarHash {
                path: path.clone(),
                hash: hash.chars().take(MAX_NAME_CHARS * 2).collect(),
            })?;
            Ok(PathInfo {
                path,
                nar_hash,
                nar_size,
                references,
                signatures: raw.signatures,
            })
        })
        .collect()
}

/// `sha256:<nix base32>` from any form Nix prints a SHA-256 in: `sha256:<base32>`,
/// `sha256:<base16>` or SRI `sha256-<base64>`.
pub fn sha256_base32(hash: &str) -> Option<String> {
    let bytes = if let Some(sri) = hash.strip_prefix("sha256-") {
        base64::engine::general_purpose::STANDARD.decode(sri).ok()?
    } else {
        let digits = hash.strip_prefix("sha256:")?;
        match digits.len() {
            64 => decode_hex(digits)?,
            52 => decode_nix_base32(digits)?,
            _ => return None,
        }
    };
    let bytes: [u8; SHA256_LEN] = bytes.try_into().ok()?;
    Some(format!("sha256:{}", encode_nix_base32(&bytes)))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16);
    text.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(u8::try_from(digit(*hi)? * 16 + digit(*lo)?).ok()?),
            _ => None,
        })
        .collect()
}

/// Nix's base 32: the last character holds the lowest five bits.
pub fn encode_nix_base32(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8).div_ceil(5);
    (0..len)
        .rev()
        .map(|n| {
            let bit = n * 5;
            let (i, j) = (bit / 8, bit % 8);
            let low = u16::from(bytes[i]) >> j;
            let high = bytes.get(i + 1).map_or(0, |b| u16::from(*b) << (8 - j));
            NIX_BASE32[usize::from((low | high) & 0x1f)] as char
        })
        .collect()
}

/// The inverse of [`encode_nix_base32`] for a SHA-256; `None` on a foreign character or
/// bits beyond 256.
fn decode_nix_base32(text: &str) -> Option<Vec<u8>> {
    let mut bytes = vec![0u8; SHA256_LEN];
    for (n, c) in text.bytes().rev().enumerate() {
        let digit = NIX_BASE32.iter().position(|d| *d == c)? as u16;
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let shifted = digit << j;
        *bytes.get_mut(i)? |= (shifted & 0xff) as u8;
        let carry = (shifted >> 8) as u8;
        match bytes.get_mut(i + 1) {
            Some(b) => *b |= carry,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(bytes)
}

/// Why a closure is refused or cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClosureError {
    /// A path lacks a signature by a pinned key: the closure is refused.
    #[error(
        "{path} carries no valid signature by a pinned cache key ({unsigned} of the {total} paths of the closure of {closure} lack one; cacheKeys trusted: {trusted}; signatures on it: {present}). Paths already in the local store (built on this host, copied in by hand) are checked like fetched ones: sign the closure with a pinned cache key (nix store sign --key-file <secret key> --recursive {closure}), or push it to the signed binary cache and delete the local copy so that it is fetched (docs/agent.md)"
    )]
    Unsigned {
        closure: String,
        path: String,
        unsigned: usize,
        total: usize,
        trusted: String,
        present: String,
    },
    /// The listing is not a closure of the path asked about (cannot be judged).
    #[error("nix path-info --recursive {closure} {problem}; the closure cannot be checked")]
    Incomplete { closure: String, problem: String },
}

impl ClosureError {
    /// Whether this refuses the closure (rather than failing to check it).
    pub fn refuses(&self) -> bool {
        matches!(self, ClosureError::Unsigned { .. })
    }
}

/// What passed: how many paths, and the pinned keys whose signatures were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub paths: usize,
    pub keys: Vec<String>,
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let all: Vec<&str> = names.collect();
    if all.is_empty() {
        return "none".to_owned();
    }
    let mut shown: Vec<String> = all
        .iter()
        .take(MAX_NAMES)
        .map(|n| n.chars().take(MAX_NAME_CHARS).collect())
        .collect();
    if all.len() > MAX_NAMES {
        shown.push(format!("and {} more", all.len() - MAX_NAMES));
    }
    shown.join(", ")
}

/// Checks that `infos` is the closure of `closure` (a full store path) and that every
/// path in it carries a valid signature by one of `keys`. The closure itself is named
/// first when it is unsigned, else the first unsigned path of the listing.
pub fn check_closure(
    closure: &str,
    infos: &[PathInfo],
    keys: &[CacheKey],
) -> Result<Verified, ClosureError> {
    let incomplete = |problem: String| ClosureError::Incomplete {
        closure: closure.to_owned(),
        problem,
    };
    let listed: BTreeSet<&str> = infos.iter().map(|i| i.path.as_str()).collect();
    if !listed.contains(closure) {
        return Err(incomplete("did not list the closure itself".to_owned()));
    }
    if let Some((info, reference)) = infos.iter().find_map(|info| {
        info.references
            .iter()
            .find(|r| !listed.contains(r.as_str()))
            .map(|r| (info, r))
    }) {
        return Err(incomplete(format!(
            "listed {} but not its reference {reference}",
            info.path
        )));
    }
    let mut used = BTreeSet::new();
    let mut unsigned = Vec::new();
    // The closure itself first, so that it is the path named when it is unsigned.
    let ordered = infos
        .iter()
        .filter(|i| i.path == closure)
        .take(1)
        .chain(infos.iter().filter(|i| i.path != closure));
    for info in ordered {
        match info.signed_by(keys) {
            Some(name) => {
                used.insert(name.to_owned());
            }
            None => unsigned.push(info),
        }
    }
    match unsigned.first() {
        None => Ok(Verified {
            paths: listed.len(),
            keys: used.into_iter().collect(),
        }),
        Some(first) => Err(ClosureError::Unsigned {
            closure: closure.to_owned(),
            path: first.path.clone(),
            unsigned: unsigned.len(),
            total: listed.len(),
            trusted: names(keys.iter().map(|k| k.name.as_str())),
            present: names(
                first
                    .signatures
                    .iter()
                    .map(|s| s.split_once(':').map_or("?", |(name, _)| name)),
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real output of Nix 2.8: `nix-build` of a two-path closure (top references dep), then
    // `nix store sign --key-file k1.sec --recursive top`, `nix store sign --key-file k2.sec
    // top`, then `nix path-info --json --recursive --sigs top`.
    const K1: &str = "k1:4gNYJuLfcNywAhM2yJXuAGHJ7I6augueuASc8Wct6no=";
    const K2: &str = "k2:WH2XxK0cVbbykQ3lVE3zCaqjgSAkPiMdtw+7HU7WFz8=";
    const TOP: &str = "/nix/store/lyvpg1h15kynvgy9qxs282qpdx1r2gw4-top-exp1";
    const DEP: &str = "/nix/store/6ws76qay78yz8ihin00y1hsp4c0bvhjh-dep-exp1";
    const LISTING: &str = r#"[{"path":"/nix/store/6ws76qay78yz8ihin00y1hsp4c0bvhjh-dep-exp1","narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":[],"deriver":"/nix/store/lafcp0jlbsdinjy8kgvsn19mnjj4cm67-dep-exp1.drv","registrationTime":1796372632,"ultimate":true,"signatures":["k1:198eUTTOZWBG8RKpfhUXYzmvpbPZOxP3ojIOtpEiZ6IPDnSvOFIcDx49/Xq1CimpuryiLXjAMqhG6qLu0XZsAg=="]},{"path":"/nix/store/lyvpg1h15kynvgy9qxs282qpdx1r2gw4-top-exp1","narHash":"sha256-sw8r6Z3raZdjHYX9TPPMVgn9bVshsZoqXRGcZkJ+v9s=","narSize":336,"references":["/nix/store/6ws76qay78yz8ihin00y1hsp4c0bvhjh-dep-exp1"],"deriver":"/nix/store/r7gdm3jy5r4g7hxlw8lhj0n4cy56277b-top-exp1.drv","registrationTime":1796372632,"ultimate":true,"signatures":["k1:SvmZy4Anp0MAaATYBWNzws5tp7+jP8Xle1N7r340HhS3ilW30TT6fP8/L5vG5c2Zqh1DMK+YOAn286v7kwsgAQ==","k2:hQetOOTR6Q5ya2n1DhBb0cIkYNBX40MU3/J1liWRGy58PNAsN5TAbiryB8cFgYL4thFSQom07z+ga3M6I4c5Dw=="]}]"#;

    fn keys(keys: &[&str]) -> Vec<CacheKey> {
        parse_cache_keys(&keys.iter().map(|k| k.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn listing() -> Vec<PathInfo> {
        parse_path_info(LISTING.as_bytes()).unwrap()
    }

    #[test]
    fn nix_base32_matches_nix_hash_to_base32() {
        // `nix hash to-base32 sha256-sw8r…` and `nix hash to-base16` of the same hash.
        let expected = "sha256:1nxzgr16d70iblm9mc91bdnzs2anrkrlrzc53mirfsgbkpljn3xk";
        for form in [
            "sha256-sw8r6Z3raZdjHYX9TPPMVgn9bVshsZoqXRGcZkJ+v9s=",
            "sha256:b30f2be99deb6997631d85fd4cf3cc5609fd6d5b21b19a2a5d119c66427ebfdb",
            expected,
        ] {
            assert_eq!(sha256_base32(form).as_deref(), Some(expected), "{form}");
        }
        assert_eq!(
            sha256_base32("sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=").as_deref(),
            Some("sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h")
        );
    }

    #[test]
    fn nix_base32_round_trips_and_refuses_what_nix_would() {
        for seed in 0u8..=255 {
            let bytes: Vec<u8> = (0..32u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let text = encode_nix_base32(&bytes);
            assert_eq!(text.len(), 52);
            assert_eq!(decode_nix_base32(&text), Some(bytes));
        }
        // 'e' is not in the alphabet; a leading 'z' sets bits beyond 256.
        let valid = "1nxzgr16d70iblm9mc91bdnzs2anrkrlrzc53mirfsgbkpljn3xk";
        assert!(decode_nix_base32(&valid.replace('x', "e")).is_none());
        assert!(decode_nix_base32(&format!("z{}", &valid[1..])).is_none());
        for bad in [
            "md5:1nxzgr16d70iblm9mc91bdnzs2anrkrlrzc53mirfsgbkpljn3xk",
            "sha256:abc",
            "sha256:zz0f2be99deb6997631d85fd4cf3cc5609fd6d5b21b19a2a5d119c66427ebfdb",
            "sha256-AAAA",
            "sha512-sw8r6Z3raZdjHYX9TPPMVgn9bVshsZoqXRGcZkJ+v9s=",
            "",
        ] {
            assert_eq!(sha256_base32(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_nix_2_8_path_info_and_builds_the_signed_fingerprint() {
        let infos = listing();
        assert_eq!(infos.len(), 2);
        let top = infos.iter().find(|i| i.path == TOP).unwrap();
        assert_eq!(
            top.fingerprint(),
            format!(
                "1;{TOP};sha256:1nxzgr16d70iblm9mc91bdnzs2anrkrlrzc53mirfsgbkpljn3xk;336;{DEP}"
            )
        );
        assert_eq!(top.signatures.len(), 2);
        assert_eq!(top.signed_by(&keys(&[K2])), Some("k2"));
        assert_eq!(top.signed_by(&keys(&[K1])), Some("k1"));
    }

    #[test]
    fn parses_the_map_form_of_later_nix_versions() {
        let map = format!(
            r#"{{"{TOP}": {{"narHash":"sha256:1nxzgr16d70iblm9mc91bdnzs2anrkrlrzc53mirfsgbkpljn3xk","narSize":336,"references":["{DEP}"],"signatures":["k2:hQetOOTR6Q5ya2n1DhBb0cIkYNBX40MU3/J1liWRGy58PNAsN5TAbiryB8cFgYL4thFSQom07z+ga3M6I4c5Dw=="],"ultimate":false}}}}"#
        );
        let infos = parse_path_info(map.as_bytes()).unwrap();
        assert_eq!(infos[0].path, TOP);
        assert_eq!(infos[0].signed_by(&keys(&[K2])), Some("k2"));
    }

    #[test]
    fn invalid_paths_and_malformed_listings_are_errors() {
        let invalid = format!(r#"[{{"path":"{TOP}","valid":false}}]"#);
        assert_eq!(
            parse_path_info(invalid.as_bytes()),
            Err(PathInfoError::NotValid(TOP.into()))
        );
        let null = format!(r#"{{"{TOP}": null}}"#);
        assert_eq!(
            parse_path_info(null.as_bytes()),
            Err(PathInfoError::NotValid(TOP.into()))
        );
        let no_size = format!(
            r#"[{{"path":"{TOP}","narHash":"sha256-sw8r6Z3raZdjHYX9TPPMVgn9bVshsZoqXRGcZkJ+v9s=","references":[]}}]"#
        );
        assert!(matches!(
            parse_path_info(no_size.as_bytes()),
            Err(PathInfoError::Missing {
                field: "narSize",
                ..
            })
        ));
        let md5 = format!(r#"[{{"path":"{TOP}","narHash":"md5:x","narSize":1,"references":[]}}]"#);
        assert!(matches!(
            parse_path_info(md5.as_bytes()),
            Err(PathInfoError::NarHash { .. })
        ));
        for junk in ["", "error: nope", "[1]", "{\"a\": 3}", "[{\"path\": 3}]"] {
            assert!(parse_path_info(junk.as_bytes()).is_err(), "{junk}");
        }
    }

    #[test]
    fn a_closure_signed_throughout_by_a_pinned_key_passes() {
        let verified = check_closure(TOP, &listing(), &keys(&[K1])).unwrap();
        assert_eq!(
            verified,
            Verified {
                paths: 2,
                keys: vec!["k1".into()]
            }
        );
        // Another pinned key beside it changes nothing.
        assert!(check_closure(TOP, &listing(), &keys(&[K2, K1])).is_ok());
    }

    #[test]
    fn a_dependency_without_a_pinned_signature_refuses_the_closure() {
        // k2 signed the top only: the dependency is named.
        let err = check_closure(TOP, &listing(), &keys(&[K2])).unwrap_err();
        assert!(err.refuses());
        let ClosureError::Unsigned {
            path,
            unsigned,
            total,
            trusted,
            present,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!((path.as_str(), *unsigned, *total), (DEP, 1, 2));
        assert_eq!(trusted, "k2");
        assert_eq!(present, "k1");
        let text = err.to_string();
        assert!(
            text.contains(DEP) && text.contains("nix store sign"),
            "{text}"
        );
    }

    #[test]
    fn an_unsigned_closure_names_the_closure_itself_first() {
        let mut infos = listing();
        for info in &mut infos {
            info.signatures.clear();
        }
        let err = check_closure(TOP, &infos, &keys(&[K1])).unwrap_err();
        let ClosureError::Unsigned {
            path,
            unsigned,
            present,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!((path.as_str(), *unsigned), (TOP, 2));
        assert_eq!(present, "none");
    }

    #[test]
    fn a_signature_over_other_data_or_a_key_of_another_name_does_not_count() {
        let tampers: [fn(&mut PathInfo); 4] = [
            |i: &mut PathInfo| i.nar_size += 1,
            |i: &mut PathInfo| i.references.clear(),
            |i: &mut PathInfo| {
                i.nar_hash = sha256_base32(&format!("sha256:{}", "0".repeat(64))).unwrap()
            },
            |i: &mut PathInfo| i.path = i.path.replace("top-exp1", "top-exp2"),
        ];
        for tamper in tampers {
            let mut info = listing().into_iter().find(|i| i.path == TOP).unwrap();
            tamper(&mut info);
            assert_eq!(info.signed_by(&keys(&[K1, K2])), None, "{info:?}");
        }
        // k1's signature presented under k2's name, and k2's key named k1.
        let mut info = listing().into_iter().find(|i| i.path == TOP).unwrap();
        info.signatures = vec![info.signatures[0].replacen("k1:", "k2:", 1)];
        assert_eq!(info.signed_by(&keys(&[K2])), None);
        let renamed = K2.replacen("k2:", "k1:", 1);
        assert_eq!(info.signed_by(&keys(&[&renamed])), None);
        // Garbage signatures are ignored, not fatal.
        info.signatures = vec!["k1".into(), "k1:!!".into(), "k1:AAAA".into()];
        assert_eq!(info.signed_by(&keys(&[K1])), None);
    }

    #[test]
    fn a_listing_that_is_not_the_closure_cannot_be_checked() {
        let infos = listing();
        let err = check_closure(
            "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
            &infos,
            &keys(&[K1]),
        )
        .unwrap_err();
        assert!(!err.refuses());
        let top_only: Vec<PathInfo> = infos.into_iter().filter(|i| i.path == TOP).collect();
        let err = check_closure(TOP, &top_only, &keys(&[K1])).unwrap_err();
        assert!(!err.refuses());
        assert!(err.to_string().contains(DEP), "{err}");
    }

    #[test]
    fn cache_keys_parse_or_say_which_entry_is_wrong() {
        assert_eq!(parse_cache_keys(&[]).unwrap_err(), CacheKeyError::NoKeys);
        let parsed = keys(&[K1, K2]);
        assert_eq!(parsed[1].name, "k2");
        for bad in [
            "k1",
            ":4gNYJuLfcNywAhM2yJXuAGHJ7I6augueuASc8Wct6no=",
            "k1:AAAA",
            "k1:!!",
        ] {
            assert_eq!(
                parse_cache_keys(&[bad.to_owned()]).unwrap_err(),
                CacheKeyError::Invalid(bad.into())
            );
        }
    }

    #[test]
    fn reasons_stay_short_whatever_the_key_names() {
        let long = "x".repeat(500);
        let shown = names(std::iter::repeat_n(long.as_str(), 50));
        assert!(
            shown.len() < MAX_NAMES * (MAX_NAME_CHARS + 2) + 20,
            "{shown}"
        );
        assert!(shown.ends_with("and 46 more"));
    }
}
