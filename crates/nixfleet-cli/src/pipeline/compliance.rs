//! Stage 3 of `nixfleet release --flake`: the static compliance gate. Every host of a
//! channel with compliance frameworks (and a mode other than disabled) is evaluated with
//! the fleet's own library, `<fleet attr>.compliance.evaluateHost`, against its
//! configuration (`--config-attr`), all in one `nix eval`. What to do with the results is
//! [`crate::compliance_gate`]'s decision, shared with the manual path.

use std::collections::BTreeMap;

use nixfleet_proto::FleetResolved;

use super::{fail, nix, progress, run, FlakeRelease, PipelineError, Stage};
use crate::compliance_gate::{self, Results};

/// Reads the input from the environment so that nothing user-given is spliced into Nix
/// code; attribute paths are walked name by name.
const EXPR: &str = r#"
let
  input = builtins.fromJSON (builtins.getEnv "NIXFLEET_COMPLIANCE_INPUT");
  flake = builtins.getFlake input.flake;
  at = path: builtins.foldl' (value: name:
    value.${name} or (throw "nixfleet: the flake has no attribute ${builtins.concatStringsSep "." path} (at ${builtins.toJSON name})")
  ) flake path;
  fleet = at input.fleet;
  library = fleet.compliance or (throw "nixfleet: ${builtins.concatStringsSep "." input.fleet} has no .compliance: its mkFleet comes from a nixfleet without the static compliance gate; update the flake's nixfleet input");
in
builtins.mapAttrs (host: h: library.evaluateHost {
  controls = library.controlsFor h.frameworks;
  config = at h.config;
}) input.hosts
"#;

/// An attribute path (`a."b.c".d`) as its names; `{host}` in a name is the host.
pub fn attr_path(template: &str, host: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut name = String::new();
    let mut quoted = false;
    for c in template.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => names.push(std::mem::take(&mut name)),
            c => name.push(c),
        }
    }
    names.push(name);
    names
        .into_iter()
        .map(|n| n.replace("{host}", host))
        .collect()
}

/// The results of every gated host, or None when no channel has the gate on.
pub fn evaluate(
    args: &FlakeRelease,
    reference: &str,
    fleet: &FleetResolved,
) -> Result<Option<Results>, PipelineError> {
    let gated = compliance_gate::gated_channels(fleet).map_err(|e| {
        fail(
            Stage::Compliance,
            format!("{e}; fix it in the fleet's channels (nothing was pushed or signed)"),
        )
    })?;
    if gated.is_empty() {
        progress("compliance: no channel has compliance frameworks with mode enforce or permissive; nothing to check");
        return Ok(None);
    }
    let mut hosts = serde_json::Map::new();
    for (channel, gate) in &gated {
        for (host, _) in fleet.channel_hosts(channel) {
            hosts.insert(
                host.to_owned(),
                serde_json::json!({
                    "frameworks": gate.frameworks,
                    "config": attr_path(&args.config_attr, host),
                }),
            );
        }
    }
    let summary: Vec<String> = gated
        .iter()
        .map(|(c, g)| format!("{c} ({}, {})", g.mode.as_str(), g.frameworks.join(" ")))
        .collect();
    progress(&format!(
        "compliance: evaluating {} host(s) of {}",
        hosts.len(),
        summary.join(", ")
    ));
    let input = serde_json::json!({
        "flake": reference,
        "fleet": attr_path(&args.fleet_attr, ""),
        "hosts": hosts,
    });
    let mut cmd = nix(&args.nix_options);
    cmd.args(["eval", "--json", "--impure", "--expr", EXPR])
        .env("NIXFLEET_COMPLIANCE_INPUT", input.to_string());
    let what = format!(
        "{}.compliance.evaluateHost on {}",
        args.fleet_attr, args.config_attr
    );
    let out =
        run::run(cmd, args.eval_timeout).map_err(|e| fail(Stage::Compliance, e.to_string()))?;
    if !out.success {
        return Err(fail(
            Stage::Compliance,
            format!(
                "nix eval of {what} exited with {}: {}; check --config-attr (a host's configuration, `{{host}}` for its name) and the channels' compliance.frameworks (nothing was pushed or signed)",
                out.status,
                out.last_lines(6)
            ),
        ));
    }
    if out.stdout_truncated {
        return Err(fail(
            Stage::Compliance,
            format!(
                "nix eval of {what} printed more than {} bytes",
                run::STDOUT_LIMIT
            ),
        ));
    }
    let results: Results = serde_json::from_slice(&out.stdout).map_err(|e| {
        fail(
            Stage::Compliance,
            format!("nix eval of {what} did not print evaluateHost's lists ({e}); is the fleet's compliance a nixfleet compliance library?"),
        )
    })?;
    let failed: BTreeMap<&str, usize> = results
        .iter()
        .map(|(h, r)| (h.as_str(), r.iter().filter(|c| !c.passed).count()))
        .collect();
    for (host, list) in &results {
        progress(&format!(
            "compliance: {host}: {} of {} control(s) passed",
            list.len() - failed.get(host.as_str()).copied().unwrap_or(0),
            list.len()
        ));
    }
    Ok(Some(results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_paths_split_at_unquoted_dots() {
        assert_eq!(
            attr_path("nixosConfigurations.{host}.config", "db.example.org"),
            ["nixosConfigurations", "db.example.org", "config"]
        );
        assert_eq!(
            attr_path(r#"hosts."a.b".{host}"#, "web-01"),
            ["hosts", "a.b", "web-01"]
        );
        assert_eq!(attr_path("fleet", ""), ["fleet"]);
    }
}
