//! Table-driven cases: `tests/fixtures/<name>/input.json` holds the fleet, manifests,
//! observed state, config and time; `expected.json` the plan. Adding a case needs no
//! code. Every case is also checked to be a fixpoint: after applying its plan, the same
//! input decides nothing more.
//!
//! `NIXFLEET_BLESS=1 cargo test -p nixfleet-reconciler --test fixtures` writes the
//! current plans to `expected.json`; review the diff before keeping it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use nixfleet_proto::{FleetResolved, RolloutManifest};
use nixfleet_reconciler::{apply, reconcile, Config, Observed, Plan};
use serde::Deserialize;
use time::OffsetDateTime;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Input {
    /// The sentence the case proves.
    about: String,
    #[serde(with = "time::serde::rfc3339")]
    now: OffsetDateTime,
    config: Config,
    fleet_resolved_hash: String,
    fleet: FleetResolved,
    manifests: BTreeMap<String, RolloutManifest>,
    observed: Observed,
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("input.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn run(input: &Input, observed: &Observed) -> Plan {
    reconcile(
        &input.fleet,
        &input.fleet_resolved_hash,
        &input.manifests,
        observed,
        &input.config,
        input.now,
    )
}

#[test]
fn fixtures() {
    let bless = std::env::var_os("NIXFLEET_BLESS").is_some();
    let dirs = cases();
    assert!(dirs.len() >= 40, "only {} fixtures", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(dir.join("input.json")).unwrap();
        let input: Input =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}/input.json: {e}"));
        assert!(!input.about.is_empty(), "{name}: say what the case proves");
        let plan = run(&input, &input.observed);
        assert_eq!(
            plan,
            run(&input, &input.observed),
            "{name}: not deterministic"
        );

        let mut after = input.observed.clone();
        apply(&plan, &mut after.stored, input.now);
        let again = run(&input, &after);
        if !again.actions.is_empty() {
            failures.push(format!(
                "{name}: not a fixpoint, after applying the plan it still decides {}",
                serde_json::to_string_pretty(&again.actions).unwrap()
            ));
        }

        let actual = serde_json::to_value(&plan).unwrap();
        let expected_path = dir.join("expected.json");
        if bless {
            let mut out = serde_json::to_string_pretty(&plan).unwrap();
            out.push('\n');
            fs::write(&expected_path, out).unwrap();
            continue;
        }
        let expected: serde_json::Value = match fs::read_to_string(&expected_path) {
            Ok(text) => {
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}/expected.json: {e}"))
            }
            Err(e) => {
                failures.push(format!("{name}: {e} (bless it with NIXFLEET_BLESS=1)"));
                continue;
            }
        };
        if actual != expected {
            failures.push(format!(
                "{name}: {}\nexpected {}\nactual {}",
                input.about,
                serde_json::to_string_pretty(&expected).unwrap(),
                serde_json::to_string_pretty(&actual).unwrap()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n\n")
    );
}
