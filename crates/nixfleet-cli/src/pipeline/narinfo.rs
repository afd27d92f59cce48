//! Reading back what a binary cache serves for a closure, and checking it as an agent
//! will: every path's narinfo is there and carries a signature by a key pinned in
//! trust.json's `cacheKeys`.
//!
//! A Nix binary-cache signature is ed25519 over the fingerprint
//! `1;<store path>;<NarHash>;<NarSize>;<references as full store paths, sorted, comma-separated>`,
//! the same check the agent makes on `nix path-info` (nixfleet-agent's
//! `activation/signatures.rs`); narinfo files already spell NarHash as `sha256:<base32>`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

const STORE_DIR: &str = "/nix/store";
/// A narinfo is a few hundred bytes; anything this large is not one.
const NARINFO_LIMIT: usize = 1 << 20;
/// Paths in one closure, at most (a NixOS system has a few thousand).
const MAX_PATHS: usize = 200_000;

pub use nixfleet_trust::cache::CacheKey;

/// Parses trust.json's `cacheKeys` with the trust crate's parser.
pub fn cache_keys(entries: &[String]) -> Result<Vec<CacheKey>, String> {
    if entries.is_empty() {
        return Err("the trust file pins no cacheKeys, so agents would accept no closure; add the cache's public key (nixfleet trust init --cache-key NAME:BASE64)".to_owned());
    }
    entries
        .iter()
        .map(|entry| {
            CacheKey::parse(entry).ok_or_else(|| format!("cacheKeys entry {entry:?} in the trust file is not NAME:BASE64 of a 32-byte ed25519 key"))
        })
        .collect()
}

/// The fields of a narinfo that its signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    /// Basenames, as the narinfo lists them.
    pub references: Vec<String>,
    pub sigs: Vec<String>,
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<NarInfo, String> {
        let (mut path, mut hash, mut size, mut refs) = (None, None, None, None);
        let mut sigs = Vec::new();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(": ") else {
                continue;
            };
            match key {
                "StorePath" => path = Some(value.trim().to_owned()),
                "NarHash" => hash = Some(value.trim().to_owned()),
                "NarSize" => size = value.trim().parse::<u64>().ok(),
                "References" => refs = Some(value.split_whitespace().map(str::to_owned).collect()),
                "Sig" => sigs.push(value.trim().to_owned()),
                _ => {}
            }
        }
        let missing = |field: &str| format!("the narinfo has no valid {field} line");
        Ok(NarInfo {
            store_path: path.ok_or_else(|| missing("StorePath"))?,
            nar_hash: hash.ok_or_else(|| missing("NarHash"))?,
            nar_size: size.ok_or_else(|| missing("NarSize"))?,
            references: refs.unwrap_or_default(),
            sigs,
        })
    }

    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self
            .references
            .iter()
            .map(|r| format!("{STORE_DIR}/{r}"))
            .collect();
        nixfleet_trust::cache::fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            refs.iter().map(String::as_str),
        )
    }

    /// The name of a pinned key whose signature on this narinfo verifies.
    pub fn signed_by<'k>(&self, keys: &'k [CacheKey]) -> Option<&'k str> {
        nixfleet_trust::cache::signed_by(&self.fingerprint(), &self.sigs, keys)
    }

    fn signer_names(&self) -> String {
        let names: Vec<&str> = self
            .sigs
            .iter()
            .map(|s| s.split_once(':').map_or("?", |(n, _)| n))
            .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }
}

/// Where narinfos are read from: a `file://` directory or an `http(s)://` cache.
pub enum CacheSource {
    Dir(PathBuf),
    Http(Box<HttpCache>),
}

pub struct HttpCache {
    base: String,
    runtime: tokio::runtime::Runtime,
    client: HttpClient,
    timeout: Duration,
}

impl CacheSource {
    /// `file:///srv/cache` or `http(s)://cache.example.org`; other Nix store URLs (s3://,
    /// ssh://) cannot be read back here: pass the HTTP URL the hosts use as --cache-url.
    pub fn open(url: &str, timeout: Duration) -> Result<CacheSource, String> {
        let url = url.split('?').next().unwrap_or(url);
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(CacheSource::Dir(PathBuf::from(path)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("could not start an HTTP client: {e}"))?;
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.enforce_http(false);
            http.set_connect_timeout(Some(timeout));
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_native_roots()
                .map_err(|e| format!("could not load the system's TLS roots: {e}"))?
                .https_or_http()
                .enable_http1()
                .wrap_connector(http);
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build(connector);
            return Ok(CacheSource::Http(Box::new(HttpCache {
                base: url.trim_end_matches('/').to_owned(),
                runtime,
                client,
                timeout,
            })));
        }
        Err(format!("cannot read narinfos back from {url:?}: pass --cache-url with the file:// or http(s):// URL your hosts fetch closures from"))
    }

    /// The narinfo texts for store-path hash parts (None where the cache has none), in
    /// order; an HTTP cache is asked [`HTTP_CONCURRENCY`] at a time.
    fn narinfos(&self, hashes: &[String]) -> Vec<Result<Option<String>, String>> {
        match self {
            CacheSource::Dir(dir) => hashes.iter().map(|h| read_narinfo(dir, h)).collect(),
            CacheSource::Http(http) => http.get_all(hashes),
        }
    }
}

/// Requests in flight at once when reading an HTTP cache.
const HTTP_CONCURRENCY: usize = 16;

fn read_narinfo(dir: &std::path::Path, hash: &str) -> Result<Option<String>, String> {
    let path = dir.join(format!("{hash}.narinfo"));
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("could not read {}: {e}", path.display())),
        Ok(_) => {}
    }
    let bytes = crate::files::read_limited(&path, NARINFO_LIMIT).map_err(|e| e.to_string())?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| format!("{} is not text", path.display()))
}

impl HttpCache {
    fn get_all(&self, hashes: &[String]) -> Vec<Result<Option<String>, String>> {
        let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(HTTP_CONCURRENCY));
        self.runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for (index, hash) in hashes.iter().enumerate() {
                let url = format!("{}/{hash}.narinfo", self.base);
                let (client, timeout, semaphore) =
                    (self.client.clone(), self.timeout, semaphore.clone());
                tasks.spawn(async move {
                    let _permit = semaphore.acquire_owned().await;
                    (index, get(&client, &url, timeout).await)
                });
            }
            let mut out: Vec<Result<Option<String>, String>> = hashes
                .iter()
                .map(|_| Err("not fetched".to_owned()))
                .collect();
            while let Some(done) = tasks.join_next().await {
                if let Ok((index, result)) = done {
                    if let Some(slot) = out.get_mut(index) {
                        *slot = result;
                    }
                }
            }
            out
        })
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<hyper::body::Bytes>,
>;

async fn get(client: &HttpClient, url: &str, timeout: Duration) -> Result<Option<String>, String> {
    use http_body_util::BodyExt as _;
    let request = hyper::Request::get(url)
        .body(http_body_util::Empty::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("GET {url} failed: {e}"))?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), NARINFO_LIMIT)
            .collect()
            .await
            .map_err(|e| format!("GET {url}: the answer was cut off or too large: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("GET {url} took longer than {} s", timeout.as_secs()))??;
    match status {
        200 => String::from_utf8(body.to_vec())
            .map(Some)
            .map_err(|_| format!("{url} is not text")),
        404 | 403 => Ok(None),
        other => Err(format!("GET {url} answered HTTP {other}")),
    }
}

/// Why a closure cannot be released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Missing { path: String },
    Unsigned { path: String, signers: String },
    Unreadable { path: String, reason: String },
}

/// Walks the closure of `closure` (a full store path) through the cache's narinfos, a
/// level of references at a time; returns how many paths it checked (those not already
/// in `seen`), or the first refusal.
pub fn check_closure(
    cache: &CacheSource,
    closure: &str,
    keys: &[CacheKey],
    seen: &mut BTreeSet<String>,
) -> Result<usize, Refusal> {
    let mut frontier = vec![closure.to_owned()];
    let mut count = 0;
    while !frontier.is_empty() {
        let level: Vec<String> = std::mem::take(&mut frontier)
            .into_iter()
            .filter(|p| seen.insert(p.clone()))
            .collect();
        count += level.len();
        if seen.len() > MAX_PATHS {
            return Err(Refusal::Unreadable {
                path: closure.to_owned(),
                reason: format!("more than {MAX_PATHS} paths; is this a system closure?"),
            });
        }
        let mut hashes = Vec::with_capacity(level.len());
        for path in &level {
            let base = path.strip_prefix("/nix/store/").unwrap_or(path);
            let hash = base.get(..32).ok_or_else(|| Refusal::Unreadable {
                path: path.clone(),
                reason: "not a store path".to_owned(),
            })?;
            hashes.push(hash.to_owned());
        }
        let texts = cache.narinfos(&hashes);
        for (path, text) in level.iter().zip(texts) {
            let unreadable = |reason: String| Refusal::Unreadable {
                path: path.clone(),
                reason,
            };
            let text = text
                .map_err(unreadable)?
                .ok_or_else(|| Refusal::Missing { path: path.clone() })?;
            let info = NarInfo::parse(&text).map_err(unreadable)?;
            if &info.store_path != path {
                return Err(unreadable(format!(
                    "its narinfo names {} instead",
                    info.store_path
                )));
            }
            if info.signed_by(keys).is_none() {
                return Err(Refusal::Unsigned {
                    path: path.clone(),
                    signers: info.signer_names(),
                });
            }
            frontier.extend(
                info.references
                    .iter()
                    .map(|r| format!("{STORE_DIR}/{r}"))
                    .filter(|full| !seen.contains(full)),
            );
        }
        frontier.sort();
        frontier.dedup();
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use nixfleet_proto::Algorithm;
    use nixfleet_trust::keys::PrivateKey;

    fn signed(key: &PrivateKey, name: &str, info: &NarInfo) -> String {
        let sig = key.sign(info.fingerprint().as_bytes());
        format!(
            "{name}:{}",
            base64::engine::general_purpose::STANDARD.encode(sig)
        )
    }

    #[test]
    fn narinfo_signatures_verify_only_over_the_fingerprint_and_by_name() {
        let text = "StorePath: /nix/store/lyvpg1h15kynvgy9qxs282qpdx1r2gw4-top\nURL: nar/x.nar.xz\nCompression: xz\nNarHash: sha256:1nxzgr16d70iblm9mc91bdnzs2anrkrlrzc53mirfsgbkpljn3xk\nNarSize: 336\nReferences: 6ws76qay78yz8ihin00y1hsp4c0bvhjh-dep lyvpg1h15kynvgy9qxs282qpdx1r2gw4-top\n";
        let mut info = NarInfo::parse(text).unwrap();
        assert_eq!(info.fingerprint(), "1;/nix/store/lyvpg1h15kynvgy9qxs282qpdx1r2gw4-top;sha256:1nxzgr16d70iblm9mc91bdnzs2anrkrlrzc53mirfsgbkpljn3xk;336;/nix/store/6ws76qay78yz8ihin00y1hsp4c0bvhjh-dep,/nix/store/lyvpg1h15kynvgy9qxs282qpdx1r2gw4-top");
        let key = PrivateKey::generate(Algorithm::Ed25519);
        let pinned = cache_keys(&[format!("c1:{}", key.public_key().to_base64())]).unwrap();
        info.sigs = vec![signed(&key, "c1", &info)];
        assert_eq!(info.signed_by(&pinned), Some("c1"));
        let mut renamed = info.clone();
        renamed.sigs = vec![signed(&key, "c2", &info)];
        assert_eq!(renamed.signed_by(&pinned), None);
        let mut tampered = info.clone();
        tampered.nar_size += 1;
        assert_eq!(tampered.signed_by(&pinned), None);
        assert!(NarInfo::parse("StorePath: /nix/store/x\n").is_err());
        assert!(cache_keys(&[]).is_err());
        assert!(cache_keys(&["c1:AAAA".to_owned()]).is_err());
    }

    fn write_narinfo(
        dir: &std::path::Path,
        key: &PrivateKey,
        name: &str,
        path: &str,
        refs: &[&str],
    ) {
        let mut info = NarInfo {
            store_path: format!("/nix/store/{path}"),
            nar_hash: "sha256:1nxzgr16d70iblm9mc91bdnzs2anrkrlrzc53mirfsgbkpljn3xk".to_owned(),
            nar_size: 120,
            references: refs.iter().map(|r| (*r).to_owned()).collect(),
            sigs: Vec::new(),
        };
        info.sigs.push(signed(key, name, &info));
        let text = format!(
            "StorePath: {}\nURL: nar/x.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: {}\nSig: {}\n",
            info.store_path,
            info.nar_hash,
            info.nar_size,
            info.references.join(" "),
            info.sigs[0]
        );
        std::fs::write(dir.join(format!("{}.narinfo", &path[..32])), text).unwrap();
    }

    #[test]
    fn the_whole_closure_is_walked_and_each_path_must_be_there_and_signed() {
        const TOP: &str = "lyvpg1h15kynvgy9qxs282qpdx1r2gw4-top";
        const DEP: &str = "6ws76qay78yz8ihin00y1hsp4c0bvhjh-dep";
        let tmp = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate(Algorithm::Ed25519);
        let other = PrivateKey::generate(Algorithm::Ed25519);
        let pinned = cache_keys(&[format!("c1:{}", key.public_key().to_base64())]).unwrap();
        let cache = CacheSource::open(
            &format!("file://{}", tmp.path().display()),
            Duration::from_secs(5),
        )
        .unwrap();
        let top = format!("/nix/store/{TOP}");
        let check = |seen: &mut BTreeSet<String>| check_closure(&cache, &top, &pinned, seen);

        write_narinfo(tmp.path(), &key, "c1", TOP, &[DEP, TOP]);
        assert_eq!(
            check(&mut BTreeSet::new()),
            Err(Refusal::Missing {
                path: format!("/nix/store/{DEP}")
            })
        );
        write_narinfo(tmp.path(), &other, "c1", DEP, &[]);
        assert!(
            matches!(check(&mut BTreeSet::new()), Err(Refusal::Unsigned { path, .. }) if path.ends_with(DEP))
        );
        write_narinfo(tmp.path(), &key, "c1", DEP, &[]);
        let mut seen = BTreeSet::new();
        assert_eq!(check(&mut seen), Ok(2));
        // A second host sharing the paths costs nothing more.
        assert_eq!(check(&mut seen), Ok(0));
        assert!(CacheSource::open("s3://bucket", Duration::from_secs(1)).is_err());
    }
}
