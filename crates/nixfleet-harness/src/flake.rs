//! A fleet's flake for `nixfleet release --flake`, without nixpkgs: mkFleet from this
//! repository's `nix/lib` (copied into the flake), and per host a two-path "system"
//! (`bin/switch-to-configuration` and an `etc` it references) standing in for
//! `nixosConfigurations.<host>.config.system.build.toplevel`. The flake is a git
//! checkout with one commit, as CI sees it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// One host of the flake: its closure's name, its switch script, whether it fails to build.
pub struct FlakeHost {
    pub name: String,
    pub tags: Vec<String>,
    pub pubkey: Option<String>,
    /// The toplevel's derivation name, e.g. `nixos-system-web-01-1`.
    pub closure_name: String,
    /// `bin/switch-to-configuration`, `@out@` for the store path ([`crate::nix::Machine::switch_script`]).
    pub switch_script: String,
    pub broken: bool,
}

impl FlakeHost {
    /// A host whose switch script only logs (for releases no agent activates).
    pub fn plain(name: &str, tags: &[&str], generation: u32) -> FlakeHost {
        FlakeHost {
            name: name.to_owned(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            pubkey: None,
            closure_name: format!("nixos-system-{name}-{generation}"),
            switch_script: "#!/bin/sh\necho switching to @out@\n".to_owned(),
            broken: false,
        }
    }
}

const FLAKE_NIX: &str = r#"{
  description = "a test fleet";
  outputs = { self }:
    let
      lib = import ./nixfleet-lib;
      system = builtins.readFile ./system.txt;
      hosts = builtins.fromJSON (builtins.readFile ./hosts.json);
      sh = name: script: derivation {
        inherit name system;
        builder = "/bin/sh";
        PATH = "/bin:/usr/bin";
        args = [ "-c" script ];
      };
      toplevel = name: h:
        let etc = sh "etc-${h.closureName}" "echo ${h.closureName} > $out";
        in derivation {
          name = h.closureName;
          inherit system;
          builder = "/bin/sh";
          PATH = "/bin:/usr/bin";
          script = h.switchScript;
          broken = if h.broken then "1" else "";
          args = [ "-c" ''
            if [ -n "$broken" ]; then echo "the configuration of ${name} is broken on purpose" >&2; exit 1; fi
            mkdir -p $out/bin && ln -s ${etc} $out/etc
            printf '%s\n' "$script" | sed "s|@out@|$out|g" > $out/bin/switch-to-configuration
            chmod +x $out/bin/switch-to-configuration
          '' ];
        };
    in {
      fleet = lib.mkFleet (builtins.fromJSON (builtins.readFile ./fleet.json));
      nixosConfigurations = builtins.mapAttrs (name: h: {
        config.system.build.toplevel = toplevel name h;
      }) hosts;
    };
}
"#;

/// The flake directory, a git checkout.
pub struct ToyFlake {
    pub dir: PathBuf,
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=ci", "-c", "user.email=ci@example.org"])
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

impl ToyFlake {
    /// A flake at `dir` with `hosts` in channel `stable` (canary wave: tag `canary`, then
    /// everyone), committed.
    pub fn new(dir: &Path, hosts: &[FlakeHost]) -> ToyFlake {
        std::fs::create_dir_all(dir).unwrap();
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nix/lib");
        copy_dir(&lib, &dir.join("nixfleet-lib"));
        std::fs::write(dir.join("flake.nix"), FLAKE_NIX).unwrap();
        std::fs::write(
            dir.join("system.txt"),
            format!("{}-linux", std::env::consts::ARCH),
        )
        .unwrap();
        let flake = ToyFlake {
            dir: dir.to_path_buf(),
        };
        flake.write_hosts(hosts);
        git(dir, &["init", "-q"]);
        flake.commit("first");
        flake
    }

    /// Rewrites the fleet and the hosts' closures (not committed).
    pub fn write_hosts(&self, hosts: &[FlakeHost]) {
        let mut decl_hosts = serde_json::Map::new();
        let mut toplevels = serde_json::Map::new();
        for h in hosts {
            decl_hosts.insert(
                h.name.clone(),
                json!({"system": format!("{}-linux", std::env::consts::ARCH), "tags": h.tags,
                       "channel": "stable", "pubkey": h.pubkey}),
            );
            toplevels.insert(
                h.name.clone(),
                json!({"closureName": h.closure_name, "switchScript": h.switch_script, "broken": h.broken}),
            );
        }
        let fleet = json!({
            "hosts": Value::Object(decl_hosts),
            "channels": {"stable": {"rolloutPolicy": "canary", "reconcileIntervalMinutes": 1,
                                    "signingIntervalMinutes": 60, "freshnessWindow": 1440}},
            "rolloutPolicies": {"canary": {
                "strategy": "canary",
                "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": 0},
                          {"selector": {"all": true}, "soakMinutes": 0}],
                "healthGate": {"maxFailures": 0},
                "onHealthFailure": "rollback-and-halt"}}
        });
        std::fs::write(self.dir.join("fleet.json"), fleet.to_string()).unwrap();
        std::fs::write(
            self.dir.join("hosts.json"),
            Value::Object(toplevels).to_string(),
        )
        .unwrap();
    }

    /// Commits everything; returns the new HEAD.
    pub fn commit(&self, message: &str) -> String {
        git(&self.dir, &["add", "-A"]);
        git(&self.dir, &["commit", "-q", "-m", message]);
        self.head()
    }

    pub fn head(&self) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(["rev-parse", "HEAD"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// The nix settings a test run of `nixfleet release --flake` needs as root without a
/// daemon, build users or network: `--nix-option` flags.
pub const TEST_NIX_OPTIONS: [&str; 6] = [
    "--nix-option",
    "sandbox=false",
    "--nix-option",
    "build-users-group=",
    "--nix-option",
    "substituters=",
];
