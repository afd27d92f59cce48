//! `nixfleet mint-token --out FILE`: a bootstrap token is a secret until it is used, so
//! the file is 0600 whatever the umask, written atomically, and never replaces a file.

mod support;
use support::*;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `nixfleet` in `dir` under umask 000, where a plain `> FILE` makes a 0666 file.
fn nixfleet_umask_000(dir: &Path, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_nixfleet"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run nixfleet")
}

/// An org root key, a trust file pinning it, and a host key; in `dir`.
fn setup(dir: &Path) {
    let ci = ok(dir, &["keygen", "--out", "ci.pem"]);
    let org = ok(dir, &["keygen", "--out", "org.pem"]);
    ok(
        dir,
        &[
            "trust",
            "init",
            "--ci-release-key",
            ci.trim(),
            "--org-root-key",
            org.trim(),
            "--out",
            "trust.json",
        ],
    );
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@web-01", "-f"])
        .arg(dir.join("host_key"))
        .status()
        .unwrap();
    assert!(status.success());
}

const MINT: &[&str] = &[
    "mint-token",
    "--hostname",
    "web-01",
    "--pubkey-file",
    "host_key.pub",
    "--org-root-key",
    "org.pem",
    "--out",
];

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn mint_token_out_writes_a_0600_file_under_umask_000_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    fs::create_dir(dir.join("tokens")).unwrap();
    fs::set_permissions(dir.join("tokens"), fs::Permissions::from_mode(0o777)).unwrap();

    let args = [MINT, &["tokens/web-01.token"]].concat();
    let out = nixfleet_umask_000(dir, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.join("tokens/web-01.token");
    assert_eq!(mode(&file), 0o600, "the token file must be 0600");
    // The secret goes to the file only; stdout says where it went.
    let token: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
    let signature = token["signature"].as_str().unwrap();
    assert!(!stdout.contains(signature), "{stdout}");
    assert!(
        stdout.contains("tokens/web-01.token") && stdout.contains("web-01"),
        "{stdout}"
    );
    // Nothing else is left in the directory (no temporary file).
    let names: Vec<String> = fs::read_dir(dir.join("tokens"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["web-01.token"]);

    let verified = ok(
        dir,
        &[
            "verify",
            "token",
            "tokens/web-01.token",
            "--trust-file",
            "trust.json",
        ],
    );
    assert!(
        verified.starts_with("ok: bootstrap token for web-01"),
        "{verified}"
    );
}

#[test]
fn mint_token_out_never_replaces_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let first = [MINT, &["web-01.token"]].concat();
    ok(dir, &first);
    let before = fs::read(dir.join("web-01.token")).unwrap();

    // Not a second token over the first, nor over anything else (a key, say).
    let err = fails(dir, &first);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(fs::read(dir.join("web-01.token")).unwrap(), before);
    let err = fails(dir, &[MINT, &["org.pem"]].concat());
    assert!(err.contains("already exists"), "{err}");
    assert!(fs::read_to_string(dir.join("org.pem"))
        .unwrap()
        .contains("PRIVATE KEY"));

    // A dangling symlink is not followed either.
    std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join("link.token")).unwrap();
    let err = fails(dir, &[MINT, &["link.token"]].concat());
    assert!(err.contains("already exists"), "{err}");
    assert!(!dir.join("elsewhere").exists());
}

#[test]
fn mint_token_without_out_still_prints_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let token = ok(dir, &MINT[..MINT.len() - 1]);
    let value: serde_json::Value = serde_json::from_str(&token).unwrap();
    assert_eq!(value["claims"]["hostname"], "web-01");
}
