//! Text output of the operator commands. Pure: data, the time and a [`Style`] in, text
//! out. Everything fits `Style::width` columns; colour is only added when asked for,
//! after alignment is computed on the plain text.

use nixfleet_proto::api::{
    state_name, HostDetail, HostStatus, Provenance, RolloutEventRecord, RolloutStatus, StatusReport,
};
use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};

/// How to draw: how many columns, and whether to use ANSI colour.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub width: usize,
    pub colour: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tone {
    Plain,
    Good,
    Warn,
    Bad,
    Dim,
    Bold,
}

impl Style {
    fn paint(&self, tone: Tone, text: &str) -> String {
        let code = match tone {
            Tone::Plain => return text.to_owned(),
            Tone::Good => "32",
            Tone::Warn => "33",
            Tone::Bad => "31",
            Tone::Dim => "2",
            Tone::Bold => "1",
        };
        if self.colour && !text.is_empty() {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

fn width_of(text: &str) -> usize {
    text.chars().count()
}

/// `text` cut to `max` columns, ending in `…` when cut.
pub fn elide(text: &str, max: usize) -> String {
    if width_of(text) <= max {
        return text.to_owned();
    }
    if max == 0 {
        return String::new();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// `text` cut to `max` columns in the middle, keeping both ends (store paths).
pub fn elide_middle(text: &str, max: usize) -> String {
    let n = width_of(text);
    if n <= max || max < 5 {
        return elide(text, max);
    }
    let head = (max - 1) / 2;
    let tail = max - 1 - head;
    let chars: Vec<char> = text.chars().collect();
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[n - tail..]);
    out
}

/// Word-wraps `text` to `width`, indenting the first line by `first` spaces and the
/// rest by `rest`.
fn wrap(text: &str, width: usize, first: usize, rest: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = " ".repeat(first);
    let mut empty = true;
    for word in text.split_whitespace() {
        let indent = if lines.is_empty() { first } else { rest };
        let room = width.saturating_sub(indent).max(8);
        let word = elide_middle(word, room);
        if !empty && width_of(&line) + 1 + width_of(&word) > width {
            lines.push(std::mem::replace(&mut line, " ".repeat(rest)));
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(&word);
        empty = false;
    }
    if !empty || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// "12s ago", "5m ago", "3h ago", "2d ago".
pub fn ago(now: OffsetDateTime, then: OffsetDateTime) -> String {
    let secs = (now - then).whole_seconds();
    match secs {
        s if s < 1 => "just now".to_owned(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// RFC 3339 in UTC, to the second.
fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.to_offset(UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// `text` with the fractions of seconds dropped from the RFC 3339 times in it: the
/// control plane's reasons carry them, a reader does not need them.
pub fn tidy_times(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let after_seconds = i >= 3
            && chars[i - 3] == ':'
            && chars[i - 2].is_ascii_digit()
            && chars[i - 1].is_ascii_digit();
        if c == '.' && after_seconds {
            let mut j = i + 1;
            while j < chars.len() && chars[j].is_ascii_digit() {
                j += 1;
            }
            if j > i + 1 && chars.get(j).is_some_and(|c| matches!(c, 'Z' | '+' | '-')) {
                i = j;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// `11-27 10:00:01`, UTC.
fn short_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:02}-{:02} {:02}:{:02}:{:02}",
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The first 12 characters of a rollout id.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn store_hash(closure: &str) -> &str {
    let hash = closure.split('-').next().unwrap_or(closure);
    hash.get(..7).unwrap_or(hash)
}

/// Short forms of the current and declared closures: the store hash's first 7
/// characters, or, when two different closures share those, their last 7.
pub fn short_closures(current: Option<&str>, declared: Option<&str>) -> (String, String) {
    let tail = |c: &str| {
        let chars: Vec<char> = c.chars().collect();
        let start = chars.len().saturating_sub(7);
        format!("…{}", chars[start..].iter().collect::<String>())
    };
    match (current, declared) {
        (Some(c), Some(d)) if c != d && store_hash(c) == store_hash(d) => (tail(c), tail(d)),
        _ => (
            current.map_or_else(|| "-".to_owned(), |c| store_hash(c).to_owned()),
            declared.map_or_else(|| "-".to_owned(), |d| store_hash(d).to_owned()),
        ),
    }
}

/// One table cell: its text and how to colour it.
struct Cell {
    text: String,
    tone: Tone,
}

fn cell(text: impl Into<String>, tone: Tone) -> Cell {
    Cell {
        text: text.into(),
        tone,
    }
}

/// A table whose columns are as wide as their widest cell; when the total is wider than
/// the style allows, the `flexible` columns give way (their cells are elided).
struct Table {
    headers: Vec<&'static str>,
    flexible: Vec<usize>,
    rows: Vec<(Vec<Cell>, Vec<String>)>,
    /// Wrap the last column onto more lines instead of cutting it (reasons).
    wrap_last: bool,
}

const GAP: &str = "  ";
const MIN_FLEX: usize = 6;

impl Table {
    fn new(headers: &[&'static str], flexible: &[usize]) -> Table {
        Table {
            headers: headers.to_vec(),
            flexible: flexible.to_vec(),
            rows: Vec::new(),
            wrap_last: false,
        }
    }

    fn wrapping_last(mut self) -> Table {
        self.wrap_last = true;
        self
    }

    /// A row, and lines printed under it (already laid out).
    fn row(&mut self, cells: Vec<Cell>, notes: Vec<String>) {
        self.rows.push((cells, notes));
    }

    fn widths(&self, width: usize) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width_of(h)).collect();
        for (cells, _) in &self.rows {
            for (w, c) in widths.iter_mut().zip(cells) {
                *w = (*w).max(width_of(&c.text));
            }
        }
        let total = |ws: &[usize]| ws.iter().sum::<usize>() + GAP.len() * (ws.len() - 1);
        while total(&widths) > width {
            let Some(&widest) = self
                .flexible
                .iter()
                .filter(|&&i| widths[i] > MIN_FLEX)
                .max_by_key(|&&i| widths[i])
            else {
                break;
            };
            widths[widest] -= 1;
        }
        widths
    }

    fn render(&self, style: &Style) -> Vec<String> {
        let widths = self.widths(style.width);
        let last = widths.len() - 1;
        let line = |cells: Vec<(String, Tone)>| {
            let mut out = String::new();
            for (i, (text, tone)) in cells.into_iter().enumerate() {
                let text = elide(&text, widths[i]);
                let pad = widths[i] - width_of(&text);
                out.push_str(&style.paint(tone, &text));
                if i != last {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(GAP);
                }
            }
            out.trim_end().to_owned()
        };
        let mut out = vec![line(
            self.headers
                .iter()
                .map(|h| ((*h).to_owned(), Tone::Bold))
                .collect(),
        )];
        let last_start = widths[..last].iter().sum::<usize>() + GAP.len() * last;
        for (cells, notes) in &self.rows {
            let mut cells: Vec<(String, Tone)> =
                cells.iter().map(|c| (c.text.clone(), c.tone)).collect();
            let mut more = Vec::new();
            if self.wrap_last && width_of(&cells[last].0) > widths[last] {
                let mut lines = wrap(&cells[last].0, widths[last], 0, 0).into_iter();
                let tone = cells[last].1;
                cells[last].0 = lines.next().unwrap_or_default();
                more = lines
                    .map(|l| format!("{}{}", " ".repeat(last_start), style.paint(tone, &l)))
                    .collect();
            }
            out.push(line(cells));
            out.extend(more);
            out.extend(notes.iter().cloned());
        }
        out
    }
}

/// A plain aligned table (headers in bold); `flexible` columns give way when too wide.
pub fn table(
    headers: &[&'static str],
    flexible: &[usize],
    rows: &[Vec<String>],
    style: &Style,
) -> Vec<String> {
    let mut table = Table::new(headers, flexible);
    for row in rows {
        table.row(
            row.iter().map(|t| cell(t.clone(), Tone::Plain)).collect(),
            Vec::new(),
        );
    }
    table.render(style)
}

/// As [`table`], with the last column wrapped onto more lines instead of cut.
pub fn table_wrapping_last(
    headers: &[&'static str],
    flexible: &[usize],
    rows: &[Vec<String>],
    style: &Style,
) -> Vec<String> {
    let mut table = Table::new(headers, flexible).wrapping_last();
    for row in rows {
        table.row(
            row.iter().map(|t| cell(t.clone(), Tone::Plain)).collect(),
            Vec::new(),
        );
    }
    table.render(style)
}

/// `text` in bold when the style has colour (section titles).
pub fn bold(text: &str, style: &Style) -> String {
    style.paint(Tone::Bold, text)
}

fn host_state_tone(state: &str) -> Tone {
    match state {
        "converged" | "soaked" | "healthy" => Tone::Good,
        "failed" | "rollingBack" | "reverted" | "revoked" => Tone::Bad,
        "-" => Tone::Dim,
        _ => Tone::Warn,
    }
}

fn reason_tone(reason: &str) -> Tone {
    if reason.starts_with("failed")
        || reason.starts_with("held")
        || reason.starts_with("rolling")
        || reason.starts_with("revoked")
    {
        Tone::Bad
    } else if reason.starts_with("waiting") {
        Tone::Warn
    } else {
        Tone::Dim
    }
}

/// Green while online; yellow when offline for less than an hour; red after that, or
/// when never seen.
fn staleness(host: &HostStatus, now: OffsetDateTime) -> (String, Tone) {
    match host.last_checkin {
        None => ("never".to_owned(), Tone::Bad),
        Some(t) if host.online => (ago(now, t), Tone::Good),
        Some(t) if (now - t).whole_seconds() < 3600 => (ago(now, t), Tone::Warn),
        Some(t) => (ago(now, t), Tone::Bad),
    }
}

fn host_state(host: &HostStatus) -> String {
    if host.revoked.is_some() {
        return "revoked".to_owned();
    }
    match &host.rollout_state {
        Some(s) => s.clone(),
        None if host.converged => "converged".to_owned(),
        None => "-".to_owned(),
    }
}

/// Whether the host's reason is worth a line in the fleet table: always when it is not
/// converged, and while its rollout still has something to say about it.
fn shows_reason(host: &HostStatus) -> bool {
    !host.converged
        || !matches!(
            host.rollout_state.as_deref(),
            Some("converged" | "soaked") | None
        )
}

/// The fleet table (`nixfleet status`).
pub fn fleet(report: &StatusReport, style: &Style) -> String {
    let now = report.generated_at;
    let mut out = Vec::new();
    let signed = match report.fleet_signed_at {
        Some(t) => format!("fleet signed {} ({})", rfc3339(t), ago(now, t)),
        None => "no verified fleet yet".to_owned(),
    };
    out.push(elide(
        &format!("{}  {signed}", report.control_plane),
        style.width,
    ));
    if !report.rollouts.is_empty() {
        let mut rollouts = Table::new(&["CHANNEL", "ROLLOUT", "STATE"], &[0, 1, 2]).wrapping_last();
        for r in &report.rollouts {
            rollouts.row(
                vec![
                    cell(r.channel.clone(), Tone::Plain),
                    cell(
                        r.display_name
                            .clone()
                            .unwrap_or_else(|| short_id(&r.rollout_id).to_owned()),
                        Tone::Plain,
                    ),
                    cell(rollout_state_text(&r.state), rollout_tone(&r.state)),
                ],
                Vec::new(),
            );
        }
        out.extend(rollouts.render(style));
        out.push(String::new());
    }
    let mut table = Table::new(
        &[
            "HOST",
            "CHANNEL",
            "CURRENT",
            "DECLARED",
            "STATE",
            "LAST SEEN",
        ],
        &[0, 1, 4],
    );
    let mut hosts: Vec<&HostStatus> = report.hosts.iter().collect();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    for host in &hosts {
        let (current, declared) = short_closures(
            host.current_closure.as_deref(),
            host.declared_closure.as_deref(),
        );
        let current_tone = if host.converged {
            Tone::Good
        } else {
            Tone::Warn
        };
        let state = host_state(host);
        let (seen, seen_tone) = staleness(host, now);
        let notes = if shows_reason(host) {
            let reason = host.waiting.as_deref().map_or_else(
                || "waiting: the control plane gave no reason".to_owned(),
                tidy_times,
            );
            let tone = reason_tone(&reason);
            wrap(&reason, style.width, 2, 4)
                .into_iter()
                .map(|l| {
                    let indent = width_of(&l) - width_of(l.trim_start());
                    format!("{}{}", &l[..indent], style.paint(tone, l.trim_start()))
                })
                .collect()
        } else {
            Vec::new()
        };
        table.row(
            vec![
                cell(host.name.clone(), Tone::Plain),
                cell(host.channel.clone(), Tone::Plain),
                cell(current, current_tone),
                cell(declared, Tone::Plain),
                cell(state.clone(), host_state_tone(&state)),
                cell(seen, seen_tone),
            ],
            notes,
        );
    }
    out.extend(table.render(style));
    let converged = hosts.iter().filter(|h| h.converged).count();
    let offline = hosts.iter().filter(|h| !h.online).count();
    let revoked = hosts.iter().filter(|h| h.revoked.is_some()).count();
    out.push(elide(
        &format!(
            "{} host{}: {converged} converged, {} not converged, {offline} offline{}",
            hosts.len(),
            if hosts.len() == 1 { "" } else { "s" },
            hosts.len() - converged,
            if revoked > 0 {
                format!(", {revoked} revoked")
            } else {
                String::new()
            }
        ),
        style.width,
    ));
    out.join("\n") + "\n"
}

/// A decision's detail in a few words: its reason, or its other fields.
pub fn event_summary(detail: &Value) -> String {
    tidy_times(&match detail {
        Value::Object(map) => match map.get("reason") {
            Some(Value::String(reason)) => reason.clone(),
            _ => map
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "action" | "rollout" | "host"))
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k} {s}"),
                    other => format!("{k} {other}"),
                })
                .collect::<Vec<_>>()
                .join(", "),
        },
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

fn event_tone(kind: &str) -> Tone {
    match kind {
        "fail" | "halt" | "rollback" | "revert" => Tone::Bad,
        "converge" | "confirm" | "complete" | "soak" | "promoteWave" => Tone::Good,
        _ => Tone::Plain,
    }
}

fn events_table(events: &[RolloutEventRecord], with_host: bool, style: &Style) -> Vec<String> {
    let headers: &[&'static str] = if with_host {
        &["TIME", "HOST", "EVENT", "REASON"]
    } else {
        &["TIME", "ROLLOUT", "EVENT", "REASON"]
    };
    let mut table = Table::new(headers, &[1, 3]).wrapping_last();
    for e in events {
        let who = if with_host {
            e.hostname.clone().unwrap_or_else(|| "-".to_owned())
        } else {
            short_id(&e.rollout_id).to_owned()
        };
        table.row(
            vec![
                cell(short_time(e.at), Tone::Dim),
                cell(who, Tone::Plain),
                cell(e.kind.clone(), event_tone(&e.kind)),
                cell(event_summary(&e.detail), Tone::Plain),
            ],
            Vec::new(),
        );
    }
    table.render(style)
}

/// `nixfleet status --host H`.
pub fn host_detail(detail: &HostDetail, now: OffsetDateTime, style: &Style) -> String {
    let h = &detail.host;
    let mut out = vec![format!(
        "{}  channel {}{}",
        style.paint(Tone::Bold, &elide(&h.name, style.width.saturating_sub(50))),
        elide(&h.channel, 20),
        h.system
            .as_deref()
            .map(|s| format!("  {}", elide(s, 20)))
            .unwrap_or_default()
    )];
    let room = style.width.saturating_sub(13);
    let label = |name: &str, value: &str| format!("  {name:<10} {}", elide_middle(value, room));
    let state = host_state(h);
    let rollout = h
        .rollout
        .as_deref()
        .map(|r| format!(" (rollout {})", short_id(r)))
        .unwrap_or_default();
    out.push(format!(
        "  {:<10} {}{}",
        "state",
        style.paint(host_state_tone(&state), &elide(&state, 20)),
        rollout
    ));
    out.push(label(
        "declared",
        h.declared_closure.as_deref().unwrap_or("-"),
    ));
    out.push(label(
        "current",
        h.current_closure.as_deref().unwrap_or("-"),
    ));
    let (seen, tone) = staleness(h, now);
    let seen_line = match h.last_checkin {
        Some(t) => format!(
            "{} ({seen}, {})",
            rfc3339(t),
            if h.online { "online" } else { "offline" }
        ),
        None => "never".to_owned(),
    };
    out.push(format!(
        "  {:<10} {}",
        "last seen",
        style.paint(tone, &elide(&seen_line, room))
    ));
    if let Some(c) = &h.compliance {
        let tone = if c.failing.is_empty() {
            Tone::Good
        } else {
            Tone::Bad
        };
        let text = format!(
            "{} ({}, {})",
            h.compliance_text(),
            c.mode.as_str(),
            ago(now, c.collected_at)
        );
        out.push(format!(
            "  {:<10} {}",
            "compliance",
            style.paint(tone, &elide(&text, room))
        ));
    }
    match h.waiting.as_deref().map(tidy_times) {
        Some(reason) => {
            let lines = wrap(&reason, style.width, 13, 13);
            for (i, l) in lines.into_iter().enumerate() {
                let text = l.trim_start();
                let prefix = if i == 0 {
                    format!("  {:<10} ", "why")
                } else {
                    " ".repeat(13)
                };
                out.push(format!(
                    "{prefix}{}",
                    style.paint(reason_tone(&reason), text)
                ));
            }
        }
        None if h.converged => out.push(format!("  {:<10} {}", "why", "on its declared closure")),
        None => {}
    }
    out.push(String::new());
    if detail.events.is_empty() {
        out.push("No rollout events for this host yet.".to_owned());
    } else {
        out.push("Recent events, newest first:".to_owned());
        out.extend(events_table(&detail.events, false, style));
    }
    out.join("\n") + "\n"
}

/// `"halted: wave 0, 1 failure"`, `"wave 1 soaking"`, `"converged"`.
pub fn rollout_state_text(state: &Value) -> String {
    let name = state_name(state);
    let fields = state.get(&name);
    let num = |k: &str| fields.and_then(|f| f.get(k)).and_then(Value::as_u64);
    match name.as_str() {
        "executing" => format!(
            "wave {} {}",
            num("wave").unwrap_or(0),
            fields
                .and_then(|f| f.get("phase"))
                .and_then(Value::as_str)
                .unwrap_or("")
        )
        .trim_end()
        .to_owned(),
        "halted" | "reverting" | "reverted" => {
            let failures = num("failures").unwrap_or(0);
            format!(
                "{name}: wave {}, {failures} failure{}",
                num("wave").unwrap_or(0),
                if failures == 1 { "" } else { "s" }
            )
        }
        "pending" => match fields.and_then(|f| f.get("reason")).and_then(Value::as_str) {
            Some(reason) => format!("pending: {reason}"),
            None => name,
        },
        _ => name,
    }
}

fn rollout_tone(state: &Value) -> Tone {
    match state_name(state).as_str() {
        "converged" => Tone::Good,
        "halted" | "reverting" | "reverted" => Tone::Bad,
        "superseded" => Tone::Dim,
        _ => Tone::Warn,
    }
}

/// "2 converged, 1 failed" from a rollout's host states.
fn host_counts(rollout: &RolloutStatus) -> String {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for state in rollout.hosts.values() {
        *counts.entry(state_name(state)).or_default() += 1;
    }
    if counts.is_empty() {
        return "none dispatched".to_owned();
    }
    counts
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `nixfleet rollout list`, newest first.
pub fn rollouts(list: &[RolloutStatus], now: OffsetDateTime, style: &Style) -> String {
    if list.is_empty() {
        return "No rollouts yet: the control plane opens one per channel when a signed release arrives.\n"
            .to_owned();
    }
    let mut sorted: Vec<&RolloutStatus> = list.iter().collect();
    sorted.sort_by(|a, b| {
        b.opened_at
            .cmp(&a.opened_at)
            .then(a.rollout_id.cmp(&b.rollout_id))
    });
    // The state is what an operator reads this for: it is never cut.
    let mut table = Table::new(
        &["ROLLOUT", "NAME", "STATE", "OPENED", "SIGNED", "HOSTS"],
        &[1, 4, 5],
    );
    for r in sorted {
        table.row(
            vec![
                cell(short_id(&r.rollout_id), Tone::Plain),
                cell(
                    r.display_name.clone().unwrap_or_else(|| r.channel.clone()),
                    Tone::Plain,
                ),
                cell(rollout_state_text(&r.state), rollout_tone(&r.state)),
                cell(ago(now, r.opened_at), Tone::Dim),
                cell(signed_text(r, now), Tone::Dim),
                cell(host_counts(r), Tone::Plain),
            ],
            Vec::new(),
        );
    }
    table.render(style).join("\n") + "\n"
}

fn short_commit(p: &Provenance) -> String {
    p.ci_commit
        .as_deref()
        .map_or_else(|| "?".to_owned(), |c| c.chars().take(7).collect())
}

/// "3m ago" when the intent was first signed by the latest signature, else "first 2h,
/// latest 3m": a re-sign refreshes a rollout without making it a new one.
fn signed_text(r: &RolloutStatus, now: OffsetDateTime) -> String {
    let short = |t| {
        let text = ago(now, t);
        text.strip_suffix(" ago").map(str::to_owned).unwrap_or(text)
    };
    match (&r.introduced, &r.latest) {
        (Some(first), Some(latest)) if first.signed_at != latest.signed_at => format!(
            "first {}, latest {}",
            short(first.signed_at),
            short(latest.signed_at)
        ),
        (_, Some(latest)) => ago(now, latest.signed_at),
        (Some(first), None) => format!("first {}", ago(now, first.signed_at)),
        (None, None) => "-".to_owned(),
    }
}

/// The provenance line of a trace: the first release of the intent and its latest re-sign.
fn provenance_line(r: &RolloutStatus) -> Option<String> {
    let first = r.introduced.as_ref().map(|p| {
        format!(
            "first released {} at {}",
            short_commit(p),
            rfc3339(p.signed_at)
        )
    });
    let latest = r
        .latest
        .as_ref()
        .map(|p| format!("re-signed {} at {}", short_commit(p), rfc3339(p.signed_at)));
    match (first, latest) {
        (Some(a), Some(b)) => Some(format!("{a}, {b}")),
        (a, b) => a.or(b),
    }
}

/// `nixfleet rollout trace ID`: the rollout's head, then its events, oldest first.
pub fn trace(
    rollout_id: &str,
    rollout: Option<&RolloutStatus>,
    events: &[RolloutEventRecord],
    style: &Style,
) -> String {
    let mut out = Vec::new();
    let head = match rollout {
        Some(r) => format!(
            "rollout {}  {}  {}",
            short_id(rollout_id),
            r.display_name.as_deref().unwrap_or(&r.channel),
            rollout_state_text(&r.state)
        ),
        None => format!("rollout {}", short_id(rollout_id)),
    };
    out.push(elide(&head, style.width));
    if let Some(line) = rollout.and_then(provenance_line) {
        out.push(elide(&line, style.width));
    }
    if events.is_empty() {
        out.push("No events recorded for this rollout.".to_owned());
    } else {
        out.extend(events_table(events, true, style));
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);

    fn host(name: &str, converged: bool, waiting: Option<&str>) -> HostStatus {
        HostStatus {
            name: name.into(),
            channel: "stable".into(),
            system: Some("x86_64-linux".into()),
            declared_closure: Some("abcdef0123-nixos-system-x-2".into()),
            current_closure: Some(if converged {
                "abcdef0123-nixos-system-x-2".into()
            } else {
                "9876543210-nixos-system-x-1".into()
            }),
            last_checkin: Some(NOW - time::Duration::seconds(12)),
            online: true,
            converged,
            rollout: Some("f".repeat(64)),
            rollout_state: Some(if converged { "converged" } else { "queued" }.into()),
            waiting: waiting.map(str::to_owned),
            revoked: None,
            compliance: None,
        }
    }

    fn report(hosts: Vec<HostStatus>) -> StatusReport {
        StatusReport {
            control_plane: "https://cp.example.org:8443".into(),
            generated_at: NOW,
            version: Some("0.1.0".into()),
            fleet_signed_at: Some(NOW - time::Duration::minutes(5)),
            last_tick_at: Some(NOW),
            rollouts: vec![RolloutStatus {
                rollout_id: "f".repeat(64),
                channel: "stable".into(),
                display_name: Some("stable@1111111".into()),
                state: serde_json::json!({"executing": {"wave": 1, "phase": "active"}}),
                opened_at: NOW,
                hosts: Default::default(),
                introduced: None,
                latest: None,
            }],
            hosts,
        }
    }

    #[test]
    fn fleet_table_is_aligned_fits_and_explains_every_waiting_host() {
        let long = "waiting: budget \"a very long budget label that will not fit\" 1/1 in flight while the operator watches";
        let r = report(vec![
            host("web-01", true, Some("converged")),
            host("web-02", false, Some("waiting: wave 1 not reached")),
            host(&"db-".repeat(30), false, Some(long)),
        ]);
        let style = Style {
            width: 80,
            colour: false,
        };
        let text = fleet(&r, &style);
        for line in text.lines() {
            assert!(width_of(line) <= 80, "{line:?}");
        }
        assert!(text.contains("  waiting: wave 1 not reached"), "{text}");
        assert!(
            text.contains("in flight\n    while the operator watches"),
            "{text}"
        );
        assert!(!text.contains("\x1b["), "no colour when not asked");
        // The header and the rows start every column at the same offset.
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "stable   stable@1111111  wave 1 active", "{text}");
        let header = lines.iter().position(|l| l.starts_with("HOST")).unwrap();
        let state_col = lines[header].find("STATE").unwrap();
        let web02 = lines.iter().find(|l| l.starts_with("web-02")).unwrap();
        assert_eq!(&web02[state_col..state_col + 6], "queued");
        assert!(text.contains("3 hosts: 1 converged, 2 not converged, 0 offline"));
        let coloured = fleet(
            &r,
            &Style {
                width: 80,
                colour: true,
            },
        );
        assert!(coloured.contains("\x1b[32m"));
    }

    #[test]
    fn a_revoked_host_reads_as_revoked_not_converged() {
        let mut gone = host(
            "web-03",
            false,
            Some("revoked: key stolen; certificates enrolled before 2026-11-27T09:00:00Z are refused, enroll it again with a new bootstrap token"),
        );
        gone.current_closure = gone.declared_closure.clone();
        gone.rollout_state = Some("converged".into());
        gone.revoked = Some(nixfleet_proto::api::HostRevoked {
            not_before: NOW - time::Duration::hours(1),
            reason: Some("key stolen".into()),
            revoked_by: Some("ops".into()),
        });
        let r = report(vec![host("web-01", true, Some("converged")), gone]);
        let style = Style {
            width: 100,
            colour: false,
        };
        let text = fleet(&r, &style);
        let header = text.lines().find(|l| l.starts_with("HOST")).unwrap();
        let state_col = header.find("STATE").unwrap();
        let row = text.lines().find(|l| l.starts_with("web-03")).unwrap();
        assert_eq!(&row[state_col..state_col + 7], "revoked", "{text}");
        assert!(text.contains("  revoked: key stolen;"), "{text}");
        assert!(
            text.contains("2 hosts: 1 converged, 1 not converged, 0 offline, 1 revoked"),
            "{text}"
        );
    }

    #[test]
    fn closures_are_shortened_so_that_different_ones_look_different() {
        assert_eq!(
            short_closures(Some("abcdef0123-a-1"), Some("1234567890-a-2")),
            ("abcdef0".to_owned(), "1234567".to_owned())
        );
        assert_eq!(
            short_closures(Some("00000000-nixos-1"), Some("00000000-nixos-2")),
            ("…nixos-1".to_owned(), "…nixos-2".to_owned())
        );
        assert_eq!(
            short_closures(None, Some("abc")),
            ("-".to_owned(), "abc".to_owned())
        );
    }

    #[test]
    fn elision_and_wrapping_keep_within_the_width() {
        assert_eq!(elide("abcdef", 4), "abc…");
        assert_eq!(elide_middle("0123456789", 7), "012…789");
        let lines = wrap("one two three four five six", 12, 2, 4);
        assert_eq!(
            lines,
            ["  one two", "    three", "    four", "    five six"]
        );
        assert_eq!(ago(NOW, NOW - time::Duration::seconds(90)), "1m ago");
        assert_eq!(
            tidy_times("confirming: deadline 2026-11-27T05:13:54.974190835Z, v1.5"),
            "confirming: deadline 2026-11-27T05:13:54Z, v1.5"
        );
    }

    #[test]
    fn long_reasons_in_the_trail_wrap_under_their_column() {
        let event = |reason: &str| RolloutEventRecord {
            rollout_id: "r".repeat(64),
            hostname: Some("web-01".into()),
            kind: "requeue".into(),
            detail: serde_json::json!({"action": "requeue", "reason": reason}),
            at: NOW,
        };
        let long = "waiting: offline since 2026-11-27T09:00:00.123456789Z and more words to make it far too long for one line of eighty";
        let text = trace(
            &"r".repeat(64),
            None,
            &[event(long), event("short")],
            &Style {
                width: 80,
                colour: false,
            },
        );
        let lines: Vec<&str> = text.lines().collect();
        let column = lines[1].find("REASON").unwrap();
        assert!(
            lines[2].contains("waiting: offline since 2026-11-27T09:00:00Z"),
            "{text}"
        );
        assert_eq!(lines[3].find(|c: char| c != ' '), Some(column), "{text}");
        for line in &lines {
            assert!(width_of(line) <= 80, "{line:?}");
        }
        assert!(text.contains("eighty"), "nothing cut:\n{text}");
    }

    #[test]
    fn rollout_states_and_event_details_read_as_sentences() {
        let halted: Value = serde_json::json!({"halted": {"wave": 0, "failures": 1}});
        assert_eq!(rollout_state_text(&halted), "halted: wave 0, 1 failure");
        let exec: Value = serde_json::json!({"executing": {"wave": 1, "phase": "soaking"}});
        assert_eq!(rollout_state_text(&exec), "wave 1 soaking");
        let fail = serde_json::json!({"action": "fail", "reason": "confirm deadline passed", "at": "x", "rollout": "r", "host": "h"});
        assert_eq!(event_summary(&fail), "confirm deadline passed");
        let dispatch =
            serde_json::json!({"action": "dispatch", "wave": 0, "rollout": "r", "host": "h"});
        assert_eq!(event_summary(&dispatch), "wave 0");
    }

    #[test]
    fn a_re_signed_rollout_shows_its_first_release_and_its_latest_signature() {
        let signed = |commit: &str, minutes: i64| Provenance {
            ci_commit: Some(commit.into()),
            signed_at: NOW - time::Duration::minutes(minutes),
        };
        let r = RolloutStatus {
            rollout_id: "a".repeat(64),
            channel: "stable".into(),
            display_name: Some("stable@2222222".into()),
            state: serde_json::json!({"halted": {"wave": 0, "failures": 1}}),
            opened_at: NOW - time::Duration::hours(3),
            hosts: Default::default(),
            introduced: Some(signed("1111111aaaa", 180)),
            latest: Some(signed("2222222bbbb", 3)),
        };
        let style = Style {
            width: 120,
            colour: false,
        };
        let list = rollouts(std::slice::from_ref(&r), NOW, &style);
        assert!(list.contains("first 3h, latest 3m"), "{list}");
        assert!(list.contains("halted: wave 0, 1 failure"), "{list}");
        let narrow = rollouts(
            std::slice::from_ref(&r),
            NOW,
            &Style {
                width: 80,
                colour: false,
            },
        );
        assert!(narrow.contains("halted: wave 0, 1 failure"), "{narrow}");
        for line in narrow.lines() {
            assert!(width_of(line) <= 80, "{line:?}");
        }
        let trace = trace(&r.rollout_id, Some(&r), &[], &style);
        assert!(
            trace.contains("first released 1111111 at 2026-11-27T07:00:00Z, re-signed 2222222 at 2026-11-27T09:57:00Z"),
            "{trace}"
        );
    }
}
