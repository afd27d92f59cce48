//! The NixOS modules (`nix/modules`), the plain systemd units (`packaging/systemd`) and
//! the flake's packages, checked against the binaries they start.
//!
//! Drift: every flag a module or unit passes must be one the binary defines (read from
//! `--help` of the real built binary), every flag of the binary must be a module option
//! with the binary's default, and every flag must be reachable from the plain unit (on
//! its command line or through its environment file). A renamed flag fails here, not on
//! a host. The modules are evaluated without nixpkgs by `nix/tests/modules/eval.nix`.
//! Needs `nix-instantiate` and `systemd-analyze`, and the workspace's binaries built
//! (`cargo build --workspace --bins`, which `scripts/test` runs first).

mod support;
use support::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// What eval.nix gives an unset string option (spaces, a specifier and a variable, so
/// that the quoting of the command line is exercised).
const STR_SAMPLE: &str = "sample value with spaces, % and $";
/// Environment variables the units may set that are not flags.
const OTHER_ENV: &[&str] = &["NIXFLEET_LOG"];

/// One binary and what starts it.
struct Target {
    binary: &'static str,
    service: &'static str,
    module: &'static str,
    unit: &'static str,
    env_file: &'static str,
    /// Option names that differ from the flag in camelCase (a list for a repeated flag).
    renamed: &'static [(&'static str, &'static str)],
    /// Settings the harness needs for an evaluation with defaults only.
    required: fn() -> Value,
}

const CONTROL_PLANE: Target = Target {
    binary: "nixfleet-control-plane",
    service: "nixfleet-control-plane",
    module: "nix/modules/control-plane.nix",
    unit: "packaging/systemd/nixfleet-control-plane.service",
    env_file: "packaging/systemd/nixfleet-control-plane.env",
    renamed: &[],
    required: || json!({}),
};

const AGENT: Target = Target {
    binary: "nixfleet-agent",
    service: "nixfleet-agent",
    module: "nix/modules/agent.nix",
    unit: "packaging/systemd/nixfleet-agent.service",
    env_file: "packaging/systemd/nixfleet-agent.env",
    renamed: &[("substituter", "substituters")],
    required: || json!({"controlPlaneUrl": "https://cp.example.org:8443"}),
};

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ------------------------------------------------------------------ the binaries

/// A binary of this workspace next to the test executable's directory, as `cargo build
/// --workspace --bins` leaves it.
fn built(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{name} is not built: {} is missing; run `cargo build --workspace --bins` first \
             (scripts/test does)",
            path.display()
        ))
    }
}

/// One flag as `--help` shows it.
#[derive(Debug)]
struct Flag {
    takes_value: bool,
    env: Option<String>,
    default: Option<String>,
}

/// The flags of a binary, from its `--help` (without --help and --version).
fn cli_flags(binary: &str) -> BTreeMap<String, Flag> {
    let path = built(binary).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(&path)
        .arg("--help")
        // Set variables would show up in the help text as values.
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{binary} --help: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8(out.stdout).unwrap();

    // A flag's block runs from its line (`--name`, `-n, --name`) to the next flag or
    // section heading; a list item of possible values (`- nixos: …`) is description.
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let mut chars = trimmed.chars();
        let is_flag = chars.next() == Some('-')
            && chars
                .next()
                .is_some_and(|c| c == '-' || c.is_ascii_alphanumeric());
        if is_flag {
            blocks.push((trimmed.to_owned(), String::new()));
        } else if !line.is_empty() && !line.starts_with(' ') {
            blocks.push((String::new(), String::new()));
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push(' ');
            text.push_str(trimmed);
        }
    }
    // `[env: NAME=value]`, or `[env: NAME]` for a flag whose value --help hides.
    let bracket = |text: &str, open: &str, close: &[char]| {
        text.find(open).map(|at| {
            let rest = &text[at + open.len()..];
            rest[..rest.find(close).unwrap_or(rest.len())].to_owned()
        })
    };
    let mut flags = BTreeMap::new();
    for (head, text) in blocks {
        let Some(long) = head.split_whitespace().find(|w| w.starts_with("--")) else {
            continue;
        };
        let name = long.trim_end_matches(',').trim_start_matches("--");
        let name = name.split('=').next().unwrap().to_owned();
        if name == "help" || name == "version" {
            continue;
        }
        let all = format!("{head} {text}");
        flags.insert(
            name,
            Flag {
                takes_value: head.contains('<'),
                env: bracket(&all, "[env: ", &['=', ']']),
                default: bracket(&all, "[default: ", &[']']),
            },
        );
    }
    assert!(
        !flags.is_empty(),
        "no flags found in {binary} --help:\n{help}"
    );
    flags
}

// ------------------------------------------------------------------------ Nix

/// Evaluates a Nix expression (a function of the string `input`) to JSON.
fn eval(expr: &str, input: &Value) -> Value {
    let out = nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "--expr",
        expr,
        "--argstr",
        "input",
        &input.to_string(),
    ]);
    assert!(out.success, "nix-instantiate failed:\n{}", out.stderr);
    serde_json::from_str(&out.stdout).expect("nix-instantiate --json prints JSON")
}

/// A module evaluated by nix/tests/modules/eval.nix with the service enabled. `fill`
/// gives every unset option a sample value, so that every flag is on the command line.
fn eval_module(target: &Target, fill: bool, set: Value, trust: Value) -> Value {
    eval(
        &format!(
            r#"{{ input }}:
            let i = builtins.fromJSON input; in
            import ./nix/tests/modules/eval.nix {{
              module = ./{module};
              service = "{service}";
              inherit (i) fill set trust;
            }}"#,
            module = target.module,
            service = target.service,
        ),
        &json!({"fill": fill, "set": set, "trust": trust}),
    )
}

fn eval_defaults(target: &Target) -> Value {
    eval_module(target, false, (target.required)(), Value::Null)
}

// ----------------------------------------------------------- systemd syntax

/// Splits a command line the way systemd does: words separated by blanks, double or
/// single quotes, and backslash escapes (`\\`, `\"`, `\'`). Specifiers and variables are
/// left as written (`%%`, `$$`, `%d`).
fn split_command(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (Some('\''), c) => word.get_or_insert_with(String::new).push(c),
            (_, '\\') => match chars.next() {
                Some(e @ ('\\' | '"' | '\'')) => word.get_or_insert_with(String::new).push(e),
                other => return Err(format!("unexpected escape \\{other:?} in {line}")),
            },
            (_, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in {line}"));
    }
    words.extend(word);
    Ok(words)
}

/// The value a program receives for a word without specifiers: `%%` is `%`, `$$` is `$`.
fn unescape_specifiers(word: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '%' || c == '$' {
            if chars.peek() != Some(&c) {
                return Err(format!("{word:?} has a bare {c}: systemd would expand it"));
            }
            chars.next();
        }
        out.push(c);
    }
    Ok(out)
}

/// `--flag value` pairs of a command line (after the executable).
fn flag_pairs(words: &[String]) -> Vec<(String, Option<String>)> {
    let mut pairs = Vec::new();
    let mut rest = words.iter().skip(1).peekable();
    while let Some(word) = rest.next() {
        let Some(name) = word.strip_prefix("--") else {
            pairs.push((String::new(), Some(word.clone())));
            continue;
        };
        let value = match rest.peek() {
            Some(next) if !next.starts_with("--") => rest.next().cloned(),
            _ => None,
        };
        pairs.push((name.to_owned(), value));
    }
    pairs
}

/// A unit file: section -> (key, value) in order, continuation lines joined.
type Unit = BTreeMap<String, Vec<(String, String)>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        unit.entry(section.clone())
            .or_default()
            .push((key.trim().to_owned(), value.trim().to_owned()));
    }
    unit
}

fn unit_values<'a>(unit: &'a Unit, section: &str, key: &str) -> Vec<&'a str> {
    unit.get(section)
        .into_iter()
        .flatten()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A module's service written out as systemd would get it from NixOS, for
/// `systemd-analyze verify`; the executable is replaced by `exe`.
fn render_module_unit(module: &Value, exe: &Path) -> String {
    let service = &module["service"];
    let words = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(items) => items.iter().map(scalar).collect(),
            other => vec![scalar(other)],
        }
    };
    let mut text = format!("[Unit]\nDescription={}\n", scalar(&service["description"]));
    for (key, field) in [("After", "after"), ("Wants", "wants")] {
        let list = words(&service[field]);
        if !list.is_empty() {
            text += &format!("{key}={}\n", list.join(" "));
        }
    }
    if service["restartIfChanged"] == false {
        text += "X-RestartIfChanged=false\n";
    }
    text += "\n[Service]\n";
    for (name, value) in service["environment"].as_object().unwrap() {
        text += &format!("Environment=\"{name}={}\"\n", scalar(value));
    }
    for (key, value) in service["serviceConfig"].as_object().unwrap() {
        let mut lines = words(value);
        if key == "ExecStart" {
            let command = &lines[0];
            let rest = command.split_once(' ').map_or("", |(_, rest)| rest);
            lines = vec![format!("{} {rest}", exe.display())];
        }
        for line in lines {
            text += &format!("{key}={line}\n");
        }
    }
    text += &format!(
        "\n[Install]\nWantedBy={}\n",
        words(&service["wantedBy"]).join(" ")
    );
    text
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a unit value: {other}"),
    }
}

/// The option a flag is exposed as: the flag in camelCase, unless renamed.
fn option_of(target: &Target, flag: &str) -> String {
    if let Some((_, option)) = target.renamed.iter().find(|(f, _)| *f == flag) {
        return (*option).to_owned();
    }
    let mut out = String::new();
    let mut upper = false;
    for c in flag.chars() {
        if c == '-' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// An option default as the binary would print it.
fn default_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Array(items) if items.is_empty() => None,
        other => Some(scalar(other)),
    }
}

// ------------------------------------------------------------------ the drift

/// Every flag the module and the plain unit pass, and every flag of the binary, checked
/// against `<binary> --help`. Collects every mismatch before failing.
fn check_drift(target: &Target) {
    let cli = cli_flags(target.binary);
    let binary = target.binary;
    let mut failures = Vec::new();
    let unknown = |who: &str, flag: &str, failures: &mut Vec<String>| {
        failures.push(format!(
            "{who} passes --{flag}, which {binary} does not define (its flags: {})",
            cli.keys()
                .map(|f| format!("--{f}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    };

    // The module, with every option set: each flag it passes exists and gets a value
    // exactly when it takes one.
    let filled = eval_module(target, true, json!({}), Value::Null);
    let exec = filled["service"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    let words = split_command(exec).unwrap_or_else(|e| panic!("{}: {e}", target.module));
    let mut module_flags = BTreeSet::new();
    for (flag, value) in flag_pairs(&words) {
        if flag.is_empty() {
            failures.push(format!("{}: stray argument {value:?}", target.module));
            continue;
        }
        match cli.get(&flag) {
            None => unknown(target.module, &flag, &mut failures),
            Some(spec) if spec.takes_value != value.is_some() => failures.push(format!(
                "{} passes --{flag} {}, but --{flag} {} a value",
                target.module,
                value.as_deref().unwrap_or("without a value"),
                if spec.takes_value {
                    "takes"
                } else {
                    "takes no"
                }
            )),
            Some(_) => {}
        }
        module_flags.insert(flag);
    }

    // The other way round: each flag of the binary is an option of the module, on the
    // command line once set, defaulting to what the binary defaults to.
    let options = filled["options"].as_object().unwrap();
    for (flag, spec) in &cli {
        let option = option_of(target, flag);
        let Some(declared) = options.get(&option) else {
            failures.push(format!(
                "{binary} defines --{flag}, but {} has no option {option} for it",
                target.module
            ));
            continue;
        };
        if !module_flags.contains(flag) {
            failures.push(format!(
                "{} has an option {option}, but does not pass --{flag} when it is set",
                target.module
            ));
        }
        let module_default = default_text(&declared["default"]);
        if module_default != spec.default {
            failures.push(format!(
                "{}: option {option} defaults to {}, {binary} --{flag} to {}",
                target.module,
                module_default.as_deref().unwrap_or("nothing"),
                spec.default.as_deref().unwrap_or("nothing"),
            ));
        }
    }

    // The plain unit: each flag on ExecStart exists, and a path given for a flag with a
    // default is that default (the SPEC's layout); credentials (%d) excepted.
    let unit = parse_unit(&read(target.unit));
    let exec = unit_values(&unit, "Service", "ExecStart");
    assert_eq!(exec.len(), 1, "{}: one ExecStart", target.unit);
    let words = split_command(exec[0]).unwrap_or_else(|e| panic!("{}: {e}", target.unit));
    assert_eq!(
        words[0],
        format!("/usr/local/bin/{binary}"),
        "{}: the binary lives in /usr/local/bin",
        target.unit
    );
    let mut reachable = BTreeSet::new();
    for (flag, value) in flag_pairs(&words) {
        match cli.get(&flag) {
            None => unknown(target.unit, &flag, &mut failures),
            Some(spec) => {
                if spec.takes_value != value.is_some() {
                    failures.push(format!("{}: --{flag} and its value disagree", target.unit));
                }
                if let (Some(default), Some(value)) = (&spec.default, &value) {
                    if !value.starts_with("%d/") && value != default {
                        failures.push(format!(
                            "{}: --{flag} {value}, but {binary} defaults to {default}",
                            target.unit
                        ));
                    }
                }
            }
        }
        reachable.insert(flag);
    }

    // Its environment file: each variable is a flag's (values shown are the defaults),
    // and together with ExecStart every flag can be set.
    let env_text = read(target.env_file);
    let by_env: BTreeMap<&str, (&String, &Flag)> = cli
        .iter()
        .filter_map(|(name, spec)| spec.env.as_deref().map(|env| (env, (name, spec))))
        .collect();
    for line in env_text.lines() {
        let line = line.trim_start_matches('#').trim();
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if !name.starts_with("NIXFLEET_") || name.contains(' ') {
            continue;
        }
        if OTHER_ENV.contains(&name) {
            continue;
        }
        match by_env.get(name) {
            None => failures.push(format!(
                "{} sets {name}, which is no variable of {binary}",
                target.env_file
            )),
            Some((flag, spec)) => {
                if let Some(default) = &spec.default {
                    if value != default {
                        failures.push(format!(
                            "{} shows {name}={value}, but {binary} --{flag} defaults to {default}",
                            target.env_file
                        ));
                    }
                }
                reachable.insert((*flag).clone());
            }
        }
    }
    for flag in cli.keys().filter(|f| !reachable.contains(*f)) {
        failures.push(format!(
            "{binary} --{flag} is neither on {}'s ExecStart nor in {}",
            target.unit, target.env_file
        ));
    }

    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}

#[test]
fn control_plane_module_and_unit_flags_match_the_binary() {
    check_drift(&CONTROL_PLANE);
}

#[test]
fn agent_module_and_unit_flags_match_the_binary() {
    check_drift(&AGENT);
}

// ---------------------------------------------------------------- the units

/// Service settings compared between a module and its plain unit: everything but the
/// command line and how files and the environment get there.
const NOT_COMPARED: &[&str] = &[
    "ExecStart",
    "LoadCredential",
    "EnvironmentFile",
    "Environment",
    "ReadWritePaths",
];

fn normalise(value: &str) -> String {
    match value {
        "yes" | "true" | "on" | "1" => "yes".to_owned(),
        "no" | "false" | "off" | "0" => "no".to_owned(),
        other => other.to_owned(),
    }
}

#[test]
fn modules_and_plain_units_have_the_same_hardening() {
    let mut failures = Vec::new();
    for target in [&CONTROL_PLANE, &AGENT] {
        let module = eval_defaults(target);
        let service = &module["service"];
        let unit = parse_unit(&read(target.unit));

        let mut from_module: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, value) in service["serviceConfig"].as_object().unwrap() {
            let words: Vec<String> = match value {
                Value::Array(items) => items.iter().map(scalar).collect(),
                other => vec![scalar(other)],
            };
            from_module.insert(
                key.clone(),
                words
                    .iter()
                    .flat_map(|w| w.split_whitespace().map(normalise).collect::<Vec<_>>())
                    .collect(),
            );
        }
        let mut from_unit: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, value) in unit.get("Service").into_iter().flatten() {
            from_unit
                .entry(key.clone())
                .or_default()
                .extend(value.split_whitespace().map(normalise));
        }
        for map in [&mut from_module, &mut from_unit] {
            map.retain(|key, words| !NOT_COMPARED.contains(&key.as_str()) && !words.is_empty());
            for words in map.values_mut() {
                words.sort();
            }
        }
        // An empty setting (CapabilityBoundingSet=) is a setting.
        for (key, value) in service["serviceConfig"].as_object().unwrap() {
            if value == "" {
                from_module.insert(key.clone(), vec![]);
            }
        }
        for (key, value) in unit.get("Service").into_iter().flatten() {
            if value.is_empty() {
                from_unit.insert(key.clone(), vec![]);
            }
        }
        let keys: BTreeSet<&String> = from_module.keys().chain(from_unit.keys()).collect();
        for key in keys {
            let (m, u) = (from_module.get(key), from_unit.get(key));
            if m != u {
                failures.push(format!(
                    "{key}: {} has {m:?}, {} has {u:?}",
                    target.module, target.unit
                ));
            }
        }

        // Ordering and restart policy of the unit itself.
        let list = |v: &Value| -> Vec<String> {
            let mut items: Vec<String> = v.as_array().unwrap().iter().map(scalar).collect();
            items.sort();
            items
        };
        let unit_list = |section: &str, key: &str| -> Vec<String> {
            let mut items: Vec<String> = unit_values(&unit, section, key)
                .iter()
                .flat_map(|v| v.split_whitespace().map(str::to_owned))
                .collect();
            items.sort();
            items
        };
        for (section, key, field) in [
            ("Unit", "After", "after"),
            ("Unit", "Wants", "wants"),
            ("Install", "WantedBy", "wantedBy"),
        ] {
            if list(&service[field]) != unit_list(section, key) {
                failures.push(format!(
                    "{key}: {} has {:?}, {} has {:?}",
                    target.module,
                    list(&service[field]),
                    target.unit,
                    unit_list(section, key)
                ));
            }
        }
        let restarts_on_change = unit_values(&unit, "Unit", "X-RestartIfChanged") != ["false"];
        if service["restartIfChanged"] != restarts_on_change {
            failures.push(format!(
                "restartIfChanged: {} has {}, {} has X-RestartIfChanged={}",
                target.module, service["restartIfChanged"], target.unit, !restarts_on_change
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}

/// `systemd-analyze verify` on one unit file; the output must be empty (unknown keys and
/// bad values are only warnings to systemd). One unit per run: systemd loads a unit name
/// once, so a second file of the same name would go unchecked.
fn systemd_verify(unit: &Path) {
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(unit)
        .current_dir(unit.parent().unwrap())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "systemd-analyze is not installed; the unit tests need it: apt-get install -y systemd"
        ),
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {}: {}\n{said}\n{}",
        unit.display(),
        out.status,
        fs::read_to_string(unit).unwrap()
    );
}

/// An executable for ExecStart: the real binary when built, else any executable (verify
/// only checks that the file can be executed).
fn executable_for(binary: &str) -> PathBuf {
    built(binary).unwrap_or_else(|_| std::env::current_exe().unwrap())
}

#[test]
fn systemd_accepts_the_units_and_the_module_services() {
    let tmp = tempfile::tempdir().unwrap();
    for target in [&CONTROL_PLANE, &AGENT] {
        let exe = executable_for(target.binary);
        let file = format!("{}.service", target.service);

        let plain = read(target.unit).replace(
            &format!("/usr/local/bin/{}", target.binary),
            exe.to_str().unwrap(),
        );
        let plain_dir = tmp.path().join(format!("plain-{}", target.service));
        fs::create_dir_all(&plain_dir).unwrap();
        fs::write(plain_dir.join(&file), plain).unwrap();
        systemd_verify(&plain_dir.join(&file));

        // The module with every option set (quoted values, credentials, ...).
        let mut set = (target.required)();
        set["logLevel"] = json!("debug");
        let module = eval_module(target, true, set, Value::Null);
        let module_dir = tmp.path().join(format!("module-{}", target.service));
        fs::create_dir_all(&module_dir).unwrap();
        fs::write(module_dir.join(&file), render_module_unit(&module, &exe)).unwrap();
        systemd_verify(&module_dir.join(&file));
    }
}

#[test]
fn module_command_lines_survive_systemd_quoting() {
    // Each value reaches the binary as set: quoted where needed, no specifier or
    // variable left for systemd to expand.
    for target in [&CONTROL_PLANE, &AGENT] {
        let module = eval_module(target, true, json!({}), Value::Null);
        let exec = module["service"]["serviceConfig"]["ExecStart"]
            .as_str()
            .unwrap();
        let words = split_command(exec).unwrap();
        let values: Vec<String> = words[1..]
            .iter()
            .map(|w| unescape_specifiers(w).unwrap_or_else(|e| panic!("{}: {e}", target.module)))
            .collect();
        assert!(
            values.iter().any(|v| v == STR_SAMPLE),
            "{}: no value came through as {STR_SAMPLE:?}: {exec}",
            target.module
        );
    }

    let tricky = [
        "plain",
        "with space",
        "100%",
        "$HOME",
        "%d/x",
        r#"quote " and backslash \"#,
        "it's",
        "https://forge.example.org/a%20b?x=1&y=2;z",
    ];
    let escaped = eval(
        "{ input }: map (import ./nix/modules/cli.nix).escapeArg (builtins.fromJSON input)",
        &json!(tricky),
    );
    for (arg, word) in tricky.iter().zip(escaped.as_array().unwrap()) {
        let word = word.as_str().unwrap();
        let split = split_command(word).unwrap();
        assert_eq!(split.len(), 1, "{arg:?} escaped as {word:?} is one word");
        assert_eq!(unescape_specifiers(&split[0]).unwrap(), *arg, "{word:?}");
    }
    let broken = nix_instantiate(&[
        "--eval",
        "--strict",
        "--expr",
        r#"(import ./nix/modules/cli.nix).escapeArg "two\nlines""#,
    ]);
    assert!(
        !broken.success,
        "a line break cannot be passed on ExecStart"
    );
    assert!(broken.stderr.contains("line break"), "{}", broken.stderr);
}

// ------------------------------------------------------------- the services

fn exec_flags(module: &Value) -> BTreeMap<String, Vec<String>> {
    let exec = module["service"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    let mut flags: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (flag, value) in flag_pairs(&split_command(exec).unwrap()) {
        flags.entry(flag).or_default().extend(value);
    }
    flags
}

#[test]
fn control_plane_service_has_the_spec_defaults_and_hardening() {
    let module = eval_defaults(&CONTROL_PLANE);
    let flags = exec_flags(&module);
    for (flag, value) in [
        ("listen", "0.0.0.0:8443"),
        ("db-path", "/var/lib/nixfleet-cp/state.db"),
        ("audit-log", "/var/lib/nixfleet-cp/audit.log"),
        ("trust-file", "/etc/nixfleet/cp/trust.json"),
        ("tls-cert", "/etc/nixfleet/cp/server-cert.pem"),
        ("client-ca", "/etc/nixfleet/cp/ca.pem"),
        // Root-only keys go through systemd's credentials.
        (
            "tls-key",
            "/run/credentials/nixfleet-control-plane.service/tls-key",
        ),
    ] {
        assert_eq!(flags.get(flag), Some(&vec![value.to_owned()]), "--{flag}");
    }
    for unset in ["fleet-ca-key", "artifact", "channel-refs-artifact-url"] {
        assert!(
            !flags.contains_key(unset),
            "null options are not passed: --{unset}"
        );
    }

    let config = &module["service"]["serviceConfig"];
    for (key, value) in [
        ("ProtectSystem", json!("strict")),
        ("StateDirectory", json!("nixfleet-cp")),
        ("DynamicUser", json!(true)),
        ("NoNewPrivileges", json!(true)),
        ("PrivateTmp", json!(true)),
        ("ProtectHome", json!(true)),
        ("ProtectKernelTunables", json!(true)),
        ("ProtectKernelModules", json!(true)),
        ("ProtectKernelLogs", json!(true)),
        ("ProtectControlGroups", json!(true)),
        (
            "RestrictAddressFamilies",
            json!(["AF_INET", "AF_INET6", "AF_UNIX"]),
        ),
        ("RestrictNamespaces", json!(true)),
        ("LockPersonality", json!(true)),
        ("MemoryDenyWriteExecute", json!(true)),
        (
            "SystemCallFilter",
            json!(["@system-service", "~@privileged"]),
        ),
        ("CapabilityBoundingSet", json!("")),
        ("AmbientCapabilities", json!([])),
        ("Restart", json!("on-failure")),
        ("KillSignal", json!("SIGTERM")),
        ("TimeoutStopSec", json!("30s")),
        (
            "LoadCredential",
            json!(["tls-key:/etc/nixfleet/cp/server-key.pem"]),
        ),
        ("ReadWritePaths", json!([])),
    ] {
        assert_eq!(config[key], value, "{key}");
    }
    assert_eq!(
        module["etc"],
        json!({}),
        "no trust.json without nixfleet.trust"
    );
    assert_eq!(module["firewall"], json!([]));
    assert!(module["imports"][0]
        .as_str()
        .unwrap()
        .ends_with("nix/modules/trust.nix"));

    // Options change the unit around them: the stop timeout follows the drain timeout,
    // a port below 1024 gets exactly the capability to bind it, the firewall opens the
    // listen port, a database elsewhere gets its directory writable, and the fleet CA
    // key becomes a credential.
    let module = eval_module(
        &CONTROL_PLANE,
        false,
        json!({
            "drainTimeoutSecs": 100,
            "listen": "[::]:443",
            "openFirewall": true,
            "dbPath": "/srv/nixfleet/state.db",
            "fleetCaCert": "/etc/nixfleet/cp/fleet-ca-cert.pem",
            "fleetCaKey": "/etc/nixfleet/cp/fleet-ca-key.pem",
        }),
        Value::Null,
    );
    let config = &module["service"]["serviceConfig"];
    assert_eq!(config["TimeoutStopSec"], "120s");
    assert_eq!(config["CapabilityBoundingSet"], "CAP_NET_BIND_SERVICE");
    assert_eq!(
        config["AmbientCapabilities"],
        json!(["CAP_NET_BIND_SERVICE"])
    );
    assert_eq!(module["firewall"], json!([443]));
    assert_eq!(config["ReadWritePaths"], json!(["/srv/nixfleet"]));
    assert_eq!(
        config["LoadCredential"],
        json!([
            "fleet-ca-key:/etc/nixfleet/cp/fleet-ca-key.pem",
            "tls-key:/etc/nixfleet/cp/server-key.pem"
        ])
    );
    let flags = exec_flags(&module);
    assert_eq!(
        flags["fleet-ca-key"],
        ["/run/credentials/nixfleet-control-plane.service/fleet-ca-key"]
    );
    assert_eq!(
        flags["fleet-ca-cert"],
        ["/etc/nixfleet/cp/fleet-ca-cert.pem"]
    );
}

#[test]
fn agent_service_runs_as_root_and_survives_the_switch() {
    let module = eval_module(
        &AGENT,
        false,
        json!({
            "controlPlaneUrl": "https://cp.example.org:8443",
            "substituters": ["https://cache.example.org", "https://mirror.example.org"],
        }),
        Value::Null,
    );
    let service = &module["service"];
    assert_eq!(service["restartIfChanged"], false);
    assert_eq!(service["path"], json!(["nix"]));
    let config = &service["serviceConfig"];
    assert_eq!(config["Restart"], "always");
    assert_eq!(config["StateDirectory"], "nixfleet-agent");
    for key in [
        "User",
        "DynamicUser",
        "ProtectSystem",
        "CapabilityBoundingSet",
    ] {
        assert!(
            config.get(key).is_none(),
            "the agent switches the system: no {key}"
        );
    }
    let flags = exec_flags(&module);
    assert_eq!(
        flags["substituter"],
        ["https://cache.example.org", "https://mirror.example.org"],
        "one --substituter per cache"
    );
    for (flag, value) in [
        ("control-plane-url", "https://cp.example.org:8443"),
        ("trust-file", "/etc/nixfleet/agent/trust.json"),
        ("state-dir", "/var/lib/nixfleet-agent"),
        ("host-key", "/etc/ssh/ssh_host_ed25519_key"),
        ("activation", "nixos"),
        ("profile", "/nix/var/nix/profiles/system"),
        ("current-system-link", "/run/current-system"),
    ] {
        assert_eq!(flags.get(flag), Some(&vec![value.to_owned()]), "--{flag}");
    }
    for unset in ["hostname", "bootstrap-token-file", "health-command"] {
        assert!(
            !flags.contains_key(unset),
            "null options are not passed: --{unset}"
        );
    }
}

// ----------------------------------------------------------------- trust.json

fn slot(public: &str, algorithm: &str) -> Value {
    json!({"current": {"algorithm": algorithm, "public": public}, "previous": null, "rejectBefore": null})
}

#[test]
fn trust_json_from_nixfleet_trust_is_what_the_binaries_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let key = |algorithm: &str, out: &str| {
        ok(dir, &["keygen", "--algorithm", algorithm, "--out", out])
            .trim()
            .to_owned()
    };
    let ci = key("ecdsa-p256", "ci.pem");
    let org = key("ed25519", "org.pem");
    let cache = "fleet-cache-1:Ff8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    ok(
        dir,
        &[
            "trust",
            "init",
            "--ci-release-key",
            &ci,
            "--org-root-key",
            &org,
            "--cache-key",
            cache,
            "--out",
            "trust-init.json",
        ],
    );
    let expected: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("trust-init.json")).unwrap()).unwrap();

    let trust = json!({
        "ciReleaseKey": slot(&ci, "ecdsa-p256"),
        "orgRootKey": slot(&org, "ed25519"),
        "cacheKeys": [cache],
    });
    for (target, file) in [
        (&CONTROL_PLANE, "nixfleet/cp/trust.json"),
        (&AGENT, "nixfleet/agent/trust.json"),
    ] {
        let module = eval_module(target, false, (target.required)(), trust.clone());
        let written = &module["etc"][file];
        assert_eq!(
            written["mode"], "0644",
            "{}: not writable by others",
            target.module
        );
        let got: Value = serde_json::from_str(written["text"].as_str().unwrap()).unwrap();
        assert_eq!(
            got, expected,
            "{}: trust.json is what `nixfleet trust init` writes",
            target.module
        );
        assert_eq!(module["warnings"], json!([]));
        assert!(module["assertions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["assertion"] == true));
    }

    // Rotation and the compromise switch come through: a release signed with the
    // previous key verifies, until rejectBefore is past its signing time.
    let old = key("ed25519", "ci-old.pem");
    let signed_at = "2026-11-27T10:00:00Z";
    ok(
        dir,
        &[
            "release",
            "--fleet",
            repo().join("examples/fleet.json").to_str().unwrap(),
            "--closures",
            repo().join("examples/closures.json").to_str().unwrap(),
            "--ci-commit",
            "0123456789abcdef0123456789abcdef01234567",
            "--signed-at",
            signed_at,
            "--key",
            "ci-old.pem",
            "--out",
            "release",
        ],
    );
    for (reject_before, accepted) in [(Value::Null, true), (json!("2026-11-28T00:00:00Z"), false)] {
        let mut ci_slot = slot(&ci, "ecdsa-p256");
        ci_slot["previous"] = json!({"algorithm": "ed25519", "public": old});
        ci_slot["rejectBefore"] = reject_before;
        let trust =
            json!({"ciReleaseKey": ci_slot, "orgRootKey": slot(&org, "ed25519"), "cacheKeys": []});
        let module = eval_module(&CONTROL_PLANE, false, json!({}), trust);
        let text = module["etc"]["nixfleet/cp/trust.json"]["text"]
            .as_str()
            .unwrap();
        fs::write(dir.join("module-trust.json"), text).unwrap();
        let args = [
            "verify",
            "fleet",
            "release/fleet.resolved.json",
            "--trust-file",
            "module-trust.json",
            "--now",
            "2026-11-27T10:05:00Z",
        ];
        if accepted {
            ok(dir, &args);
        } else {
            assert!(fails(dir, &args).contains("rejectBefore"));
        }
    }

    // Half a set of roots is a mistake the module refuses.
    let half =
        json!({"ciReleaseKey": slot(&ci, "ecdsa-p256"), "orgRootKey": null, "cacheKeys": []});
    let module = eval_module(&CONTROL_PLANE, false, json!({}), half);
    assert_eq!(module["assertions"][0]["assertion"], false);
    assert_eq!(module["etc"], json!({}));
}

// -------------------------------------------------------------------- the flake

#[test]
fn flake_lists_modules_and_packages_without_nixpkgs() {
    // Every input throws, as in mkfleet.rs: only the package values may touch nixpkgs.
    let got = eval(
        r#"{ input }:
        let
          flake = import ./flake.nix;
          inputs = builtins.mapAttrs (name: _: throw "needs the flake input ${name}")
            (builtins.functionArgs flake.outputs);
          outputs = flake.outputs (inputs // { self = outputs; });
        in {
          modules = builtins.attrNames outputs.nixosModules;
          moduleFiles = builtins.mapAttrs (_: toString) outputs.nixosModules;
          systems = builtins.attrNames outputs.packages;
          packages = builtins.mapAttrs (_: builtins.attrNames) outputs.packages;
        }"#,
        &Value::Null,
    );
    assert_eq!(got["modules"], json!(["agent", "control-plane"]));
    let root = repo();
    assert_eq!(
        got["moduleFiles"],
        json!({
            "agent": root.join("nix/modules/agent.nix"),
            "control-plane": root.join("nix/modules/control-plane.nix"),
        })
    );
    assert_eq!(got["systems"], json!(["aarch64-linux", "x86_64-linux"]));
    for system in ["aarch64-linux", "x86_64-linux"] {
        assert_eq!(
            got["packages"][system],
            json!([
                "default",
                "nixfleet",
                "nixfleet-agent",
                "nixfleet-control-plane"
            ])
        );
    }
}

#[test]
fn flake_packages_build_each_binary_from_its_crate() {
    // nixpkgs stood in for by a rustPlatform that returns its arguments.
    let got = eval(
        r#"{ input }:
        let
          flake = import ./flake.nix;
          lib = {
            licenses = { mit = "MIT"; asl20 = "Apache-2.0"; };
            platforms.linux = [ "x86_64-linux" ];
          };
          pkgs = {
            callPackage = fn: args: import fn ({
              inherit lib;
              rustPlatform.buildRustPackage = attrs: attrs;
            } // args);
          };
          outputs = flake.outputs {
            self = outputs;
            nixpkgs.legacyPackages.x86_64-linux = pkgs;
          };
        in builtins.mapAttrs (_: p: {
          inherit (p) pname version cargoBuildFlags doCheck;
          lockFile = toString p.cargoLock.lockFile;
          inherit (p.meta) mainProgram license;
        }) outputs.packages.x86_64-linux"#,
        &Value::Null,
    );
    let version = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .map(|v| v.trim_end_matches('"').to_owned())
        .expect("workspace version");
    for (binary, krate) in [
        ("nixfleet", "nixfleet-cli"),
        ("nixfleet-agent", "nixfleet-agent"),
        ("nixfleet-control-plane", "nixfleet-control-plane"),
    ] {
        let package = &got[binary];
        assert_eq!(package["pname"], krate, "{binary}");
        assert_eq!(package["version"], version.as_str(), "{binary}");
        assert_eq!(package["cargoBuildFlags"], json!(["-p", krate]), "{binary}");
        assert_eq!(package["mainProgram"], binary, "{binary}");
        assert_eq!(
            package["lockFile"],
            repo().join("Cargo.lock").to_str().unwrap(),
            "{binary}"
        );
        // The crate exists and its binary has the name the package promises.
        let manifest = read(&format!("crates/{krate}/Cargo.toml"));
        assert!(
            manifest.contains(&format!("[[bin]]\nname = \"{binary}\"")),
            "crates/{krate}/Cargo.toml builds no binary {binary}"
        );
    }
    assert_eq!(got["default"]["mainProgram"], "nixfleet");
}

// ------------------------------------------------------------- the nix-darwin module

/// Evaluates a module without nixpkgs or nix-darwin (stand-ins for the lib functions the
/// agent modules use; launchd, system.activationScripts and environment.etc are plain
/// attributes, as the module defines them), with services.nixfleet-agent enabled. `fill`
/// and `set` as in nix/tests/modules/eval.nix; `darwin` also returns the daemon, the
/// activation scripts and /etc. Not nix-darwin: types are names, nothing is merged.
fn eval_agent_module(module: &str, darwin: bool, fill: bool, set: Value, trust: Value) -> Value {
    eval(
        &format!(
            r#"{{ input }}:
            let
              i = builtins.fromJSON input;
              type = name: sample: {{ inherit name sample; }};
              types = {{
                bool = type "bool" true;
                str = type "str" "sample value with spaces, % and $";
                path = type "path" "/sample/path";
                package = type "package" null;
                ints.positive = type "positive int" 7;
                ints.unsigned = type "unsigned int" 7;
                strMatching = regex: type "string matching ${{regex}}" "/sample/matching";
                enum = values: type "enum ${{builtins.concatStringsSep "," values}}" (builtins.head values);
                nullOr = t: type "null or ${{t.name}}" t.sample;
                listOf = t: type "list of ${{t.name}}" [ t.sample "${{toString t.sample}}-2" ];
                submodule = _: type "submodule" {{ }};
              }};
              mkIf = condition: content: {{ _type = "if"; inherit condition content; }};
              isFalseIf = v: builtins.isAttrs v && v._type or null == "if" && !v.condition;
              resolve = value:
                if builtins.isAttrs value && value._type or null == "if" then
                  (if value.condition then resolve value.content else {{ }})
                else if builtins.isAttrs value && !(value ? outPath) then
                  builtins.mapAttrs (_: resolve) (builtins.removeAttrs value
                    (builtins.filter (n: isFalseIf value.${{n}}) (builtins.attrNames value)))
                else value;
              lib = {{
                inherit types mkIf;
                mkOption = args: args // {{ _type = "option"; }};
                mkEnableOption = what: {{ _type = "option"; type = types.bool; default = false; }};
                literalExpression = text: {{ _type = "literalExpression"; inherit text; }};
                optional = cond: x: if cond then [ x ] else [ ];
                optionalAttrs = cond: attrs: if cond then attrs else {{ }};
                mapAttrs = builtins.mapAttrs;
                concatStringsSep = builtins.concatStringsSep;
                escapeShellArg = arg: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] arg + "'";
                getExe = pkg: "${{pkg}}/bin/${{pkg.meta.mainProgram}}";
              }};
              fakePackage = name: mainProgram: {{
                type = "derivation";
                inherit name;
                outPath = "/nix/store/00000000000000000000000000000000-${{name}}";
                meta = {{ inherit mainProgram; }};
              }};
              pkgs.callPackage = _fn: args: fakePackage args.crate args.mainProgram;
              evaluated = import ./{module} {{ inherit lib pkgs config; }};
              options = evaluated.options.services.nixfleet-agent;
              valueOf = name: option:
                let
                  default = option.default or null;
                  unset = default == null || default == [ ];
                in
                if i.fill && unset && option.type.sample != null then option.type.sample else default;
              config = {{
                services.nixfleet-agent = builtins.mapAttrs valueOf options // {{ enable = true; }} // i.set;
                nixfleet.trust = if i.trust == null
                  then {{ ciReleaseKey = null; orgRootKey = null; cacheKeys = [ ]; }}
                  else i.trust;
                nix.package = fakePackage "nix" "nix";
              }};
              out = resolve evaluated.config.content;
            in
            {{
              imports = map toString evaluated.imports;
              options = builtins.mapAttrs (_: o: {{
                type = o.type.name;
                default = if o.type.name == "package" then null else o.default or null;
              }}) options;
              etc = builtins.mapAttrs (_: f: {{ inherit (f) text; }}) (out.environment.etc or {{ }});
            }}
            // (if {darwin} then {{
              daemon = out.launchd.daemons.nixfleet-agent.serviceConfig;
              preActivation = out.system.activationScripts.preActivation.text;
              postActivation = out.system.activationScripts.postActivation.text;
              assertions = map (a: a.assertion) out.assertions;
            }} else {{ }})"#,
        ),
        &json!({"fill": fill, "set": set, "trust": trust}),
    )
}

const DARWIN_MODULE: &str = "nix/modules/darwin-agent.nix";

fn eval_darwin(fill: bool, set: Value, trust: Value) -> Value {
    eval_agent_module(DARWIN_MODULE, true, fill, set, trust)
}

/// The same drift check as the NixOS module's, on the launchd daemon's ProgramArguments:
/// every flag passed exists and gets a value exactly when it takes one, and every flag of
/// the binary is an option with the binary's default, on the command line once set. Only
/// `activation` defaults otherwise: to darwin, as the binary does on macOS.
#[test]
fn darwin_agent_module_program_arguments_match_the_binary() {
    let cli = cli_flags(AGENT.binary);
    let filled = eval_darwin(true, json!({}), Value::Null);
    let words: Vec<String> = filled["daemon"]["ProgramArguments"]
        .as_array()
        .expect("ProgramArguments is a list")
        .iter()
        .map(|w| w.as_str().expect("each argument a string").to_owned())
        .collect();
    assert_eq!(
        words[0],
        "/nix/store/00000000000000000000000000000000-nixfleet-agent/bin/nixfleet-agent"
    );
    let mut failures = Vec::new();
    let mut passed = BTreeSet::new();
    for (flag, value) in flag_pairs(&words) {
        match cli.get(&flag) {
            None => failures.push(format!(
                "{DARWIN_MODULE} passes --{flag} ({value:?}), which nixfleet-agent does not define"
            )),
            Some(spec) if spec.takes_value != value.is_some() => failures.push(format!(
                "{DARWIN_MODULE} passes --{flag} {value:?}, but its taking a value is {}",
                spec.takes_value
            )),
            Some(_) => {}
        }
        passed.insert(flag);
    }
    // Values are passed as they are (launchd runs no shell): the sample keeps its spaces.
    assert!(
        words.iter().any(|w| w == STR_SAMPLE),
        "a string value is one argument: {words:?}"
    );
    let options = filled["options"].as_object().unwrap();
    for (flag, spec) in &cli {
        let option = option_of(&AGENT, flag);
        let Some(declared) = options.get(&option) else {
            failures.push(format!(
                "nixfleet-agent defines --{flag}, but {DARWIN_MODULE} has no option {option}"
            ));
            continue;
        };
        if !passed.contains(flag) {
            failures.push(format!(
                "{DARWIN_MODULE} has an option {option}, but does not pass --{flag} when it is set"
            ));
        }
        let expected = if flag == "activation" {
            Some("darwin".to_owned())
        } else {
            spec.default.clone()
        };
        let module_default = default_text(&declared["default"]);
        if module_default != expected {
            failures.push(format!(
                "{DARWIN_MODULE}: option {option} defaults to {module_default:?}, expected {expected:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));

    // Defaults only: the backend is darwin, and unset options pass nothing.
    let defaults = eval_darwin(false, (AGENT.required)(), Value::Null);
    let words: Vec<&str> = defaults["daemon"]["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let pairs: Vec<(String, Option<String>)> =
        flag_pairs(&words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>());
    assert!(
        pairs.contains(&("activation".to_owned(), Some("darwin".to_owned()))),
        "{words:?}"
    );
    assert!(!pairs
        .iter()
        .any(|(f, _)| f == "bootstrap-token-file" || f == "health-command"));
}

/// One fleet's `services.nixfleet-agent` settings work on NixOS and nix-darwin alike: the
/// same option names with the same types and defaults, `activation` aside (it also
/// accepts darwin there, and defaults to it).
#[test]
fn darwin_agent_module_has_the_nixos_modules_option_tree() {
    let nixos = eval_agent_module(AGENT.module, false, false, (AGENT.required)(), Value::Null);
    let darwin = eval_darwin(false, (AGENT.required)(), Value::Null);
    let (nixos, darwin) = (
        nixos["options"].as_object().unwrap(),
        darwin["options"].as_object().unwrap(),
    );
    assert_eq!(
        nixos.keys().collect::<Vec<_>>(),
        darwin.keys().collect::<Vec<_>>()
    );
    for (name, option) in nixos {
        if name == "activation" {
            assert_eq!(option["type"], "enum nixos");
            assert_eq!(darwin[name]["type"], "enum darwin,nixos");
            assert_eq!(darwin[name]["default"], "darwin");
            continue;
        }
        assert_eq!(&darwin[name], option, "option {name}");
    }
}

#[test]
fn darwin_agent_daemon_is_kept_alive_finds_nix_and_restarts_after_activation() {
    let module = eval_darwin(
        false,
        json!({
            "controlPlaneUrl": "https://cp.example.org:8443",
            "stateDir": "/var/lib/nixfleet agent",
            "logLevel": "debug",
        }),
        Value::Null,
    );
    let daemon = &module["daemon"];
    assert_eq!(daemon["Label"], "org.nixos.nixfleet-agent");
    assert_eq!(daemon["KeepAlive"], true);
    assert_eq!(daemon["RunAtLoad"], true);
    assert_eq!(daemon["AbandonProcessGroup"], true);
    assert_eq!(daemon["Umask"], 0o077);
    assert_eq!(daemon["EnvironmentVariables"]["NIXFLEET_LOG"], "debug");
    let path: Vec<&str> = daemon["EnvironmentVariables"]["PATH"]
        .as_str()
        .unwrap()
        .split(':')
        .collect();
    for dir in [
        "/run/current-system/sw/bin",
        "/nix/var/nix/profiles/default/bin",
        "/usr/local/bin",
        "/bin",
        "/usr/bin",
        "/usr/sbin",
    ] {
        assert!(path.contains(&dir), "PATH lacks {dir}: {path:?}");
    }
    assert_eq!(
        module["imports"],
        json!([repo().join("nix/modules/trust.nix")])
    );
    // The state directory exists, private, before launchd starts the daemon (quoted).
    let pre = module["preActivation"].as_str().unwrap();
    assert!(pre.contains("mkdir -p '/var/lib/nixfleet agent'"), "{pre}");
    assert!(
        pre.contains("chmod 0700 '/var/lib/nixfleet agent'"),
        "{pre}"
    );
    // A restart after each activation.
    let post = module["postActivation"].as_str().unwrap();
    assert!(
        post.contains("launchctl kickstart -k system/org.nixos.nixfleet-agent"),
        "{post}"
    );
    assert_eq!(module["etc"], json!({}));
    assert_eq!(module["assertions"], json!([true]));

    // With nixfleet.trust set, trust.json is written from it, as on NixOS.
    let trust = json!({
        "ciReleaseKey": slot("AAAA", "ecdsa-p256"),
        "orgRootKey": slot("BBBB", "ed25519"),
        "cacheKeys": ["fleet-cache-1:Ff8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="],
    });
    let with_trust = eval_darwin(false, (AGENT.required)(), trust.clone());
    let nixos = eval_module(&AGENT, false, (AGENT.required)(), trust);
    assert_eq!(
        with_trust["etc"]["nixfleet/agent/trust.json"]["text"],
        nixos["etc"]["nixfleet/agent/trust.json"]["text"]
    );
}

#[test]
fn flake_exports_the_darwin_agent_module() {
    let got = eval(
        r#"{ input }:
        let
          flake = import ./flake.nix;
          inputs = builtins.mapAttrs (name: _: throw "needs the flake input ${name}")
            (builtins.functionArgs flake.outputs);
          outputs = flake.outputs (inputs // { self = outputs; });
        in builtins.mapAttrs (_: toString) outputs.darwinModules"#,
        &Value::Null,
    );
    assert_eq!(
        got,
        json!({ "agent": repo().join("nix/modules/darwin-agent.nix") })
    );
}

/// The agent modules write the channel's probe set into the closure
/// (`etc/nixfleet/compliance.json`, nixfleet_proto's ProbeSet) when the channel's
/// compliance is on, with the probes of `lib.compliance` for its frameworks, and nothing
/// otherwise.
#[test]
fn agent_modules_write_the_channels_probe_set() {
    let want = eval(
        r#"{ input }: let c = (import ./nix/lib).compliance; in map (p: p.id) (c.probesFor (c.controlsFor (builtins.fromJSON input)))"#,
        &json!(["cis"]),
    );
    assert!(
        want.as_array()
            .unwrap()
            .contains(&json!("ssh-root-login-key-only")),
        "{want}"
    );
    for (module, darwin) in [(AGENT.module, false), (DARWIN_MODULE, true)] {
        let mut set = (AGENT.required)();
        set["compliance"] = json!({"frameworks": ["cis"], "mode": "permissive"});
        let got = eval_agent_module(module, darwin, false, set.clone(), Value::Null);
        let text = got["etc"]["nixfleet/compliance.json"]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("{module}: no etc/nixfleet/compliance.json: {got}"));
        let probe_set: nixfleet_proto::compliance::ProbeSet =
            serde_json::from_str(text).expect("compliance.json is a ProbeSet");
        assert_eq!(
            probe_set.mode,
            nixfleet_proto::compliance::ComplianceMode::Permissive
        );
        assert_eq!(probe_set.frameworks, ["cis"]);
        let ids: Vec<Value> = probe_set.probes.iter().map(|p| json!(p.id)).collect();
        assert_eq!(Value::Array(ids), want, "{module}");
        assert!(probe_set
            .probes
            .iter()
            .all(|p| p.command[0].starts_with('/') && p.timeout_secs > 0));

        for off in [
            json!({"frameworks": ["cis"], "mode": "disabled"}),
            json!({"frameworks": [], "mode": "enforce"}),
        ] {
            set["compliance"] = off;
            let got = eval_agent_module(module, darwin, false, set.clone(), Value::Null);
            assert!(
                got["etc"].get("nixfleet/compliance.json").is_none(),
                "{module}: {got}"
            );
        }
        let defaults = eval_agent_module(module, darwin, false, (AGENT.required)(), Value::Null);
        assert!(defaults["etc"].get("nixfleet/compliance.json").is_none());
    }
}
