//! The dashboard's HTML and SVG. Pure: data from the control plane in, a page out. Every
//! string that comes from the API goes through [`esc`] (text and attribute values alike)
//! or, inside a URL, through [`url_part`] and then [`esc`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use nixfleet_proto::api::{
    state_name, ChannelStatus, Healthz, HostDetail, HostStatus, RolloutEventRecord, RolloutStatus,
};
use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};

use crate::operator::render::{
    ago, event_summary, rollout_state_text, short_closures, short_id, tidy_times,
};

/// `text` safe as HTML text and as a quoted attribute value.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` percent-encoded for a path segment or a query value.
pub fn url_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Where a host stands, as the dashboard shows it. Every state has a name, so the page
/// reads the same without colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    Queued,
    Dispatched,
    Confirming,
    Healthy,
    Soaked,
    Converged,
    Failed,
    RollingBack,
    RolledBack,
    Revoked,
    Unknown,
}

impl State {
    pub const ALL: [State; 11] = [
        State::Queued,
        State::Dispatched,
        State::Confirming,
        State::Healthy,
        State::Soaked,
        State::Converged,
        State::Failed,
        State::RollingBack,
        State::RolledBack,
        State::Revoked,
        State::Unknown,
    ];

    /// The reconciler's name of a host state (`confirmWindow`, `rollingBack`, …).
    pub fn from_name(name: &str) -> State {
        match name {
            "queued" => State::Queued,
            "dispatched" => State::Dispatched,
            "confirmWindow" => State::Confirming,
            "healthy" => State::Healthy,
            "soaked" => State::Soaked,
            "converged" => State::Converged,
            "failed" => State::Failed,
            "rollingBack" => State::RollingBack,
            "reverted" => State::RolledBack,
            _ => State::Unknown,
        }
    }

    /// The form used in URLs, CSS classes and `data-state`.
    pub fn slug(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Dispatched => "dispatched",
            State::Confirming => "confirming",
            State::Healthy => "healthy",
            State::Soaked => "soaked",
            State::Converged => "converged",
            State::Failed => "failed",
            State::RollingBack => "rolling-back",
            State::RolledBack => "rolled-back",
            State::Revoked => "revoked",
            State::Unknown => "none",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            State::RollingBack => "rolling back",
            State::RolledBack => "rolled back",
            State::Unknown => "no rollout",
            other => other.slug(),
        }
    }

    pub fn from_slug(slug: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.slug() == slug)
    }
}

/// A host's state: revoked first, then its state in its channel's newest rollout.
pub fn host_state(host: &HostStatus) -> State {
    if host.revoked.is_some() {
        return State::Revoked;
    }
    match &host.rollout_state {
        Some(name) => State::from_name(name),
        None if host.converged => State::Converged,
        None => State::Unknown,
    }
}

/// What every page shows around its view.
pub struct Chrome<'a> {
    pub control_plane: &'a str,
    pub now: OffsetDateTime,
    /// Seconds between refreshes; 0 for none.
    pub refresh_secs: u64,
    /// Counts the pages this dashboard rendered (the refresh test reads it).
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Fleet,
    Hosts,
    Rollouts,
    None,
}

/// A whole page: head, navigation, `controls` (kept across refreshes: the filter form)
/// and `main`, the part the refresh replaces.
pub fn page(chrome: &Chrome, nav: Nav, title: &str, controls: &str, main: &str) -> String {
    let mut out = String::with_capacity(main.len() + 2048);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(out, "<title>{} · nixfleet</title>", esc(title));
    out.push_str("<link rel=\"stylesheet\" href=\"/dashboard.css\">\n");
    if chrome.refresh_secs > 0 {
        out.push_str("<script src=\"/dashboard.js\" defer></script>\n");
        out.push_str(&refresh_fallback(chrome.refresh_secs));
    }
    out.push_str("</head>\n<body>\n<a class=\"skip\" href=\"#live\">Skip to the content</a>\n");
    out.push_str("<header>\n<nav aria-label=\"Views\">\n");
    for (which, href, label) in [
        (Nav::Fleet, "/", "Fleet"),
        (Nav::Hosts, "/hosts", "Hosts"),
        (Nav::Rollouts, "/rollouts", "Rollouts"),
    ] {
        let current = if which == nav {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = writeln!(out, "<a href=\"{href}\"{current}>{label}</a>");
    }
    let _ = writeln!(
        out,
        "</nav>\n<p class=\"cp\">control plane <span class=\"mono\">{}</span> · read-only</p>\n</header>",
        esc(chrome.control_plane)
    );
    let _ = writeln!(out, "<h1>{}</h1>", esc(title));
    out.push_str(controls);
    let _ = writeln!(
        out,
        "<main id=\"live\" tabindex=\"-1\" data-refresh=\"{}\">",
        chrome.refresh_secs
    );
    out.push_str(main);
    let _ = writeln!(
        out,
        "<p class=\"updated\" data-seq=\"{}\">Updated {}{}</p>\n</main>\n</body>\n</html>",
        chrome.seq,
        stamp(chrome.now),
        if chrome.refresh_secs > 0 {
            format!("; refreshes every {} s", chrome.refresh_secs)
        } else {
            String::new()
        }
    );
    out
}

/// Without JavaScript the page reloads itself: a meta refresh with no URL reloads the
/// same URL, query string (the filters) included.
pub fn refresh_fallback(secs: u64) -> String {
    format!("<noscript><meta http-equiv=\"refresh\" content=\"{secs}\"></noscript>\n")
}

/// The red banner shown instead of a view when the control plane does not answer.
pub fn error_banner(error: &str) -> String {
    format!(
        "<div class=\"banner error\" role=\"alert\"><strong>Error:</strong> {}</div>\n",
        esc(error)
    )
}

/// `2026-11-27 10:00:01 UTC`.
pub fn stamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `10:00:01`.
fn hms(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}

fn time_tag(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let iso = t
        .to_offset(UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(
        "<time datetime=\"{}\" title=\"{}\">{}</time>",
        esc(&iso),
        esc(&stamp(t)),
        esc(&ago(now, t))
    )
}

fn state_badge(state: State) -> String {
    format!(
        "<span class=\"st st-{}\">{}</span>",
        state.slug(),
        state.label()
    )
}

fn host_link(name: &str) -> String {
    format!(
        "<a href=\"/hosts/{}\">{}</a>",
        esc(&url_part(name)),
        esc(name)
    )
}

fn rollout_link(id: &str, label: &str) -> String {
    format!(
        "<a href=\"/rollouts/{}\">{}</a>",
        esc(&url_part(id)),
        esc(label)
    )
}

fn rollout_name(r: &RolloutStatus) -> String {
    r.display_name
        .clone()
        .unwrap_or_else(|| short_id(&r.rollout_id).to_owned())
}

fn is_halted(state: &Value) -> bool {
    matches!(
        state_name(state).as_str(),
        "halted" | "reverting" | "reverted"
    )
}

// ---------------------------------------------------------------------------------------
// Fleet

/// One channel and its newest rollout, with that rollout's trail.
pub struct ChannelView {
    pub name: String,
    pub status: Option<ChannelStatus>,
    pub rollout: Option<RolloutStatus>,
    pub trace: Vec<RolloutEventRecord>,
}

pub struct FleetData {
    pub health: Healthz,
    pub hosts: Vec<HostStatus>,
    pub channels: Vec<ChannelView>,
}

/// Count of hosts per state, every state listed (zeros too), as text.
fn state_counts(states: &[State], id: &str) -> String {
    let mut counts: BTreeMap<State, usize> = BTreeMap::new();
    for s in states {
        *counts.entry(*s).or_default() += 1;
    }
    let mut out = format!("<ul class=\"counts\" id=\"{id}\">\n");
    for s in State::ALL {
        let n = counts.get(&s).copied().unwrap_or(0);
        if n == 0 && matches!(s, State::Unknown | State::Revoked) {
            continue;
        }
        let _ = writeln!(
            out,
            "<li data-state=\"{slug}\" data-count=\"{n}\"><a href=\"/hosts?state={slug}\"><span class=\"st st-{slug}\">{label}</span> <b>{n}</b></a></li>",
            slug = s.slug(),
            label = s.label()
        );
    }
    out.push_str("</ul>\n");
    out
}

/// Which part of a rollout's bar a host is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WaveKey {
    /// The wave the reconciler dispatched the host in.
    Wave(u64),
    /// Past queued, but no dispatch in the trail (a host that already ran the target
    /// when its state was recovered, e.g. after the control plane's state was wiped).
    Unrecorded,
    /// Queued: no wave has reached it yet.
    Pending,
}

impl WaveKey {
    fn label(self) -> String {
        match self {
            WaveKey::Wave(w) => format!("Wave {w}"),
            WaveKey::Unrecorded => "Wave not recorded".to_owned(),
            WaveKey::Pending => "Not yet dispatched".to_owned(),
        }
    }
}

/// The hosts of each wave of a rollout, from its `dispatch` decisions, then the hosts
/// with no dispatch in the trail.
pub fn waves(
    rollout: &RolloutStatus,
    hosts: &[HostStatus],
    trace: &[RolloutEventRecord],
) -> BTreeMap<WaveKey, Vec<(String, State)>> {
    let mut wave_of: BTreeMap<String, u64> = BTreeMap::new();
    for e in trace {
        if e.kind == "dispatch" {
            if let (Some(host), Some(wave)) =
                (&e.hostname, e.detail.get("wave").and_then(Value::as_u64))
            {
                wave_of.insert(host.clone(), wave);
            }
        }
    }
    let mut names: BTreeSet<String> = rollout.hosts.keys().cloned().collect();
    names.extend(
        hosts
            .iter()
            .filter(|h| h.channel == rollout.channel)
            .map(|h| h.name.clone()),
    );
    let mut out: BTreeMap<WaveKey, Vec<(String, State)>> = BTreeMap::new();
    for name in names {
        let state = match rollout.hosts.get(&name) {
            Some(s) => State::from_name(&state_name(s)),
            None => State::Queued,
        };
        let key = match wave_of.get(&name) {
            Some(w) => WaveKey::Wave(*w),
            None if state == State::Queued => WaveKey::Pending,
            None => WaveKey::Unrecorded,
        };
        out.entry(key).or_default().push((name, state));
    }
    out
}

/// A rollout as one bar: a segment per wave, sized by its hosts, split by state. The
/// list under it says the same in words.
fn rollout_bar(groups: &BTreeMap<WaveKey, Vec<(String, State)>>) -> String {
    let total: usize = groups.values().map(Vec::len).sum();
    if total == 0 {
        return "<p>No hosts in this rollout.</p>\n".to_owned();
    }
    let width = 1000.0_f64;
    let gap = 6.0;
    let usable = width - gap * (groups.len().saturating_sub(1)) as f64;
    let mut svg = String::from(
        "<svg class=\"bar\" viewBox=\"0 0 1000 28\" preserveAspectRatio=\"none\" aria-hidden=\"true\" focusable=\"false\">\n",
    );
    let mut list = String::from("<ul class=\"waves\">\n");
    let mut x = 0.0;
    // Waves in order, then the hosts without a recorded wave (`WaveKey` order).
    for (wave, members) in groups {
        let label = wave.label();
        let mut by_state: BTreeMap<State, Vec<&str>> = BTreeMap::new();
        for (name, state) in members {
            by_state.entry(*state).or_default().push(name);
        }
        let seg = usable * members.len() as f64 / total as f64;
        let mut sx = x;
        for (state, names) in &by_state {
            let w = seg * names.len() as f64 / members.len() as f64;
            let _ = writeln!(
                svg,
                "<rect class=\"f-{}\" x=\"{sx:.1}\" y=\"0\" width=\"{w:.1}\" height=\"28\"><title>{}: {} {}</title></rect>",
                state.slug(),
                esc(&label),
                names.len(),
                state.label()
            );
            sx += w;
        }
        x += seg + gap;
        let parts: Vec<String> = by_state
            .iter()
            .map(|(state, names)| {
                format!(
                    "<span class=\"st st-{}\" data-state=\"{}\" data-count=\"{}\">{} {}</span>",
                    state.slug(),
                    state.slug(),
                    names.len(),
                    names.len(),
                    state.label()
                )
            })
            .collect();
        let _ = writeln!(
            list,
            "<li><strong>{}</strong> ({} host{}): {}</li>",
            esc(&label),
            members.len(),
            if members.len() == 1 { "" } else { "s" },
            parts.join(", ")
        );
    }
    svg.push_str("</svg>\n");
    list.push_str("</ul>\n");
    svg + &list
}

/// Why a rollout halted: its state, and each failure with its reason, from the trail.
fn halt_reason(rollout: &RolloutStatus, trace: &[RolloutEventRecord]) -> String {
    let mut out = format!(
        "<div class=\"banner halt\" role=\"status\"><strong>{}</strong>",
        esc(&rollout_state_text(&rollout.state))
    );
    let failures: Vec<&RolloutEventRecord> = trace.iter().filter(|e| e.kind == "fail").collect();
    if !failures.is_empty() {
        out.push_str("<ul class=\"reasons\">");
        for e in failures {
            let host = e.hostname.as_deref().unwrap_or("-");
            let _ = write!(
                out,
                "<li>{} failed: <span class=\"reason\">{}</span></li>",
                host_link(host),
                esc(&event_summary(&e.detail))
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("</div>\n");
    out
}

pub fn fleet(chrome: &Chrome, data: &FleetData) -> String {
    let now = chrome.now;
    let mut main = String::new();
    let h = &data.health;
    let signed = match h.fleet_signed_at {
        Some(t) => format!("fleet signed {} ({})", esc(&stamp(t)), esc(&ago(now, t))),
        None => "no verified fleet yet".to_owned(),
    };
    let tick = match h.last_tick_at {
        Some(t) => format!("last reconcile {}", time_tag(t, now)),
        None => "no reconcile yet".to_owned(),
    };
    let _ = writeln!(
        main,
        "<p class=\"summary\" id=\"signed\">{signed} · {tick} · control plane {}{}</p>",
        esc(&h.version),
        if h.ok {
            ""
        } else {
            " · <strong>not ok</strong>"
        }
    );
    let states: Vec<State> = data.hosts.iter().map(host_state).collect();
    let offline = data.hosts.iter().filter(|h| !h.online).count();
    let _ = writeln!(
        main,
        "<section aria-labelledby=\"h-hosts\"><h2 id=\"h-hosts\">{} host{} · {offline} offline</h2>",
        data.hosts.len(),
        if data.hosts.len() == 1 { "" } else { "s" }
    );
    main.push_str(&state_counts(&states, "fleet-counts"));
    main.push_str("</section>\n");
    for c in &data.channels {
        let _ = writeln!(
            main,
            "<section class=\"channel\" data-channel=\"{name}\" aria-labelledby=\"ch-{name}\"><h2 id=\"ch-{name}\">Channel {name}</h2>",
            name = esc(&c.name)
        );
        if let Some(s) = &c.status {
            let _ = writeln!(
                main,
                "<p>policy {} · {}/{} hosts converged{}</p>",
                esc(&s.rollout_policy),
                s.hosts_converged,
                s.hosts_total,
                match s.signed_at {
                    Some(t) => format!(" · signed {}", time_tag(t, now)),
                    None => String::new(),
                }
            );
            if let Some(w) = &s.waiting {
                let _ = writeln!(main, "<p class=\"waiting\">{}</p>", esc(&tidy_times(w)));
            }
        }
        match &c.rollout {
            None => main.push_str("<p>No rollout yet.</p>\n"),
            Some(r) => {
                let halted = is_halted(&r.state);
                let _ = writeln!(
                    main,
                    "<article class=\"rollout{}\" data-rollout=\"{}\" data-state=\"{}\"><h3>Rollout {} · <span class=\"rstate\">{}</span></h3>",
                    if halted { " halted" } else { "" },
                    esc(&r.rollout_id),
                    esc(&state_name(&r.state)),
                    rollout_link(&r.rollout_id, &rollout_name(r)),
                    esc(&rollout_state_text(&r.state))
                );
                if halted {
                    main.push_str(&halt_reason(r, &c.trace));
                }
                main.push_str(&rollout_bar(&waves(r, &data.hosts, &c.trace)));
                main.push_str("</article>\n");
            }
        }
        main.push_str("</section>\n");
    }
    if data.channels.is_empty() {
        main.push_str("<p>No channels yet: the control plane has no verified fleet.</p>\n");
    }
    page(chrome, Nav::Fleet, "Fleet", "", &main)
}

// ---------------------------------------------------------------------------------------
// Hosts

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Name,
    Channel,
    State,
    Seen,
}

impl SortKey {
    fn slug(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::Channel => "channel",
            SortKey::State => "state",
            SortKey::Seen => "seen",
        }
    }
}

/// The hosts view's filters and order, from its query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFilter {
    pub channel: Option<String>,
    /// A state slug, or `offline`.
    pub state: Option<String>,
    pub text: Option<String>,
    pub sort: SortKey,
    pub descending: bool,
}

impl HostFilter {
    pub fn from_query(params: &[(String, String)]) -> HostFilter {
        let get = |k: &str| {
            params
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let sort = match get("sort").as_deref() {
            Some("channel") => SortKey::Channel,
            Some("state") => SortKey::State,
            Some("seen") => SortKey::Seen,
            _ => SortKey::Name,
        };
        HostFilter {
            channel: get("channel"),
            state: get("state"),
            text: get("q"),
            sort,
            descending: get("dir").as_deref() == Some("desc"),
        }
    }

    fn matches(&self, h: &HostStatus) -> bool {
        if self.channel.as_ref().is_some_and(|c| *c != h.channel) {
            return false;
        }
        match self.state.as_deref() {
            None => {}
            Some("offline") if h.online => return false,
            Some("offline") => {}
            Some(s) if host_state(h).slug() != s => return false,
            Some(_) => {}
        }
        if let Some(q) = &self.text {
            let q = q.to_lowercase();
            let fields = [
                Some(h.name.as_str()),
                Some(h.channel.as_str()),
                h.waiting.as_deref(),
                h.current_closure.as_deref(),
                h.declared_closure.as_deref(),
                h.revoked.as_ref().and_then(|r| r.reason.as_deref()),
            ];
            if !fields
                .iter()
                .flatten()
                .any(|f| f.to_lowercase().contains(&q))
            {
                return false;
            }
        }
        true
    }

    /// The query string of this filter with `sort`/`dir` replaced.
    fn query_with_sort(&self, sort: SortKey, descending: bool) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.channel {
            parts.push(format!("channel={}", url_part(c)));
        }
        if let Some(s) = &self.state {
            parts.push(format!("state={}", url_part(s)));
        }
        if let Some(q) = &self.text {
            parts.push(format!("q={}", url_part(q)));
        }
        parts.push(format!("sort={}", sort.slug()));
        if descending {
            parts.push("dir=desc".to_owned());
        }
        parts.join("&")
    }
}

/// The hosts `filter` keeps, in its order.
pub fn filter_hosts<'a>(hosts: &'a [HostStatus], filter: &HostFilter) -> Vec<&'a HostStatus> {
    let mut out: Vec<&HostStatus> = hosts.iter().filter(|h| filter.matches(h)).collect();
    out.sort_by(|a, b| {
        let order = match filter.sort {
            SortKey::Name => a.name.cmp(&b.name),
            SortKey::Channel => a.channel.cmp(&b.channel),
            SortKey::State => host_state(a).cmp(&host_state(b)),
            // Most recently seen first; never seen last.
            SortKey::Seen => b.last_checkin.cmp(&a.last_checkin),
        };
        let order = if filter.descending {
            order.reverse()
        } else {
            order
        };
        order.then_with(|| a.name.cmp(&b.name))
    });
    out
}

fn host_filter_form(hosts: &[HostStatus], filter: &HostFilter) -> String {
    let channels: BTreeSet<&str> = hosts.iter().map(|h| h.channel.as_str()).collect();
    let mut out = String::from(
        "<form class=\"filters\" method=\"get\" action=\"/hosts\" role=\"search\">\n<label>Channel <select name=\"channel\"><option value=\"\">all</option>",
    );
    for c in channels {
        let sel = if filter.channel.as_deref() == Some(c) {
            " selected"
        } else {
            ""
        };
        let _ = write!(out, "<option value=\"{v}\"{sel}>{v}</option>", v = esc(c));
    }
    out.push_str(
        "</select></label>\n<label>State <select name=\"state\"><option value=\"\">all</option>",
    );
    let mut options: Vec<(&str, &str)> = State::ALL.iter().map(|s| (s.slug(), s.label())).collect();
    options.push(("offline", "offline"));
    for (slug, label) in options {
        let sel = if filter.state.as_deref() == Some(slug) {
            " selected"
        } else {
            ""
        };
        let _ = write!(out, "<option value=\"{slug}\"{sel}>{label}</option>");
    }
    let _ = write!(
        out,
        "</select></label>\n<label>Search <input type=\"search\" name=\"q\" value=\"{}\" placeholder=\"name, reason, closure\"></label>\n<input type=\"hidden\" name=\"sort\" value=\"{}\">{}<button type=\"submit\">Filter</button> <a href=\"/hosts\">Clear</a>\n</form>\n",
        esc(filter.text.as_deref().unwrap_or("")),
        filter.sort.slug(),
        if filter.descending {
            "<input type=\"hidden\" name=\"dir\" value=\"desc\">"
        } else {
            ""
        }
    );
    out
}

fn last_seen(h: &HostStatus, now: OffsetDateTime) -> String {
    let seen = match h.last_checkin {
        Some(t) => time_tag(t, now),
        None => "never".to_owned(),
    };
    let online = if h.online {
        "<span class=\"on\">online</span>"
    } else {
        "<span class=\"off\">offline</span>"
    };
    format!("{seen} · {online}")
}

pub fn hosts(chrome: &Chrome, hosts: &[HostStatus], filter: &HostFilter) -> String {
    let shown = filter_hosts(hosts, filter);
    let mut main = String::new();
    let _ = writeln!(
        main,
        "<div class=\"table-wrap\"><table id=\"hosts\">\n<caption>{} of {} hosts</caption>\n<thead><tr>",
        shown.len(),
        hosts.len()
    );
    for (key, label) in [
        (Some(SortKey::Name), "Host"),
        (Some(SortKey::Channel), "Channel"),
        (None, "Current"),
        (None, "Declared"),
        (Some(SortKey::State), "State"),
        (Some(SortKey::Seen), "Last seen"),
        (None, "Compliance"),
        (None, "Why"),
    ] {
        let class = match (label, key) {
            ("Current" | "Declared", _) => " class=\"closure nosort\"",
            (_, None) => " class=\"nosort\"",
            _ => "",
        };
        match key {
            Some(k) => {
                let active = filter.sort == k;
                let aria = match (active, filter.descending) {
                    (true, false) => " aria-sort=\"ascending\"",
                    (true, true) => " aria-sort=\"descending\"",
                    _ => "",
                };
                let arrow = match (active, filter.descending) {
                    (true, false) => " ▲",
                    (true, true) => " ▼",
                    _ => "",
                };
                let _ = write!(
                    main,
                    "<th scope=\"col\"{class}{aria}><a href=\"/hosts?{}\">{label}{arrow}</a></th>",
                    esc(&filter.query_with_sort(k, active && !filter.descending))
                );
            }
            None => {
                let _ = write!(main, "<th scope=\"col\"{class}>{label}</th>");
            }
        }
    }
    main.push_str("</tr></thead>\n<tbody>\n");
    for h in &shown {
        let state = host_state(h);
        let (current, declared) =
            short_closures(h.current_closure.as_deref(), h.declared_closure.as_deref());
        let why = match (&h.revoked, &h.waiting) {
            (_, Some(w)) => esc(&tidy_times(w)),
            (Some(r), None) => esc(r.reason.as_deref().unwrap_or("revoked")),
            (None, None) if h.converged => "on its declared closure".to_owned(),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            main,
            "<tr data-host=\"{name}\" data-state=\"{slug}\" data-online=\"{online}\"><th scope=\"row\">{link}</th><td data-label=\"Channel\">{channel}</td><td class=\"closure mono\" data-label=\"Current\" title=\"{cur_full}\">{cur}</td><td class=\"closure mono\" data-label=\"Declared\" title=\"{dec_full}\">{dec}</td><td data-label=\"State\">{badge}</td><td data-label=\"Last seen\">{seen}</td><td class=\"compliance\" data-label=\"Compliance\">{compliance}</td><td class=\"why\" data-label=\"Why\">{why}</td></tr>",
            name = esc(&h.name),
            slug = state.slug(),
            online = h.online,
            link = host_link(&h.name),
            channel = esc(&h.channel),
            cur_full = esc(h.current_closure.as_deref().unwrap_or("-")),
            cur = esc(&current),
            dec_full = esc(h.declared_closure.as_deref().unwrap_or("-")),
            dec = esc(&declared),
            badge = state_badge(state),
            seen = last_seen(h, chrome.now),
            compliance = esc(&h.compliance_text()),
        );
    }
    main.push_str("</tbody></table></div>\n");
    if shown.is_empty() {
        main.push_str("<p class=\"empty\">No host matches these filters.</p>\n");
    }
    page(
        chrome,
        Nav::Hosts,
        "Hosts",
        &host_filter_form(hosts, filter),
        &main,
    )
}

// ---------------------------------------------------------------------------------------
// One host

fn events_table(events: &[RolloutEventRecord], with_host: bool, now: OffsetDateTime) -> String {
    let mut out = format!(
        "<div class=\"table-wrap\"><table class=\"events\"><thead><tr><th scope=\"col\">Time</th><th scope=\"col\">{}</th><th scope=\"col\">Event</th><th scope=\"col\">Reason</th></tr></thead><tbody>\n",
        if with_host { "Host" } else { "Rollout" }
    );
    for e in events {
        let who = if with_host {
            e.hostname
                .as_deref()
                .map_or_else(|| "-".to_owned(), host_link)
        } else {
            rollout_link(&e.rollout_id, short_id(&e.rollout_id))
        };
        let _ = writeln!(
            out,
            "<tr data-kind=\"{kind}\"><td>{time}</td><td>{who}</td><td class=\"ev ev-{kind}\">{kind}</td><td class=\"reason\">{reason}</td></tr>",
            time = time_tag(e.at, now),
            kind = esc(&e.kind),
            reason = esc(&event_summary(&e.detail)),
        );
    }
    out.push_str("</tbody></table></div>\n");
    out
}

pub fn host(chrome: &Chrome, detail: &HostDetail) -> String {
    let h = &detail.host;
    let now = chrome.now;
    let state = host_state(h);
    let mut main = String::from("<dl class=\"detail\">\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(main, "<dt>{k}</dt><dd>{v}</dd>");
    };
    row("State", state_badge(state));
    row("Channel", esc(&h.channel));
    row("Platform", esc(h.system.as_deref().unwrap_or("-")));
    row(
        "Rollout",
        h.rollout
            .as_deref()
            .map_or_else(|| "-".to_owned(), |r| rollout_link(r, short_id(r))),
    );
    row(
        "Declared",
        format!(
            "<span class=\"mono\">{}</span>",
            esc(h.declared_closure.as_deref().unwrap_or("-"))
        ),
    );
    row(
        "Current",
        format!(
            "<span class=\"mono\">{}</span>{}",
            esc(h.current_closure.as_deref().unwrap_or("-")),
            if h.converged {
                " (on its declared closure)"
            } else {
                ""
            }
        ),
    );
    row("Last seen", last_seen(h, now));
    if let Some(c) = &h.compliance {
        row(
            "Compliance",
            format!(
                "{} <span class=\"mono\">({} evidence on {}, collected {})</span>",
                esc(&h.compliance_text()),
                esc(c.mode.as_str()),
                esc(&c.closure_hash),
                time_tag(c.collected_at, now)
            ),
        );
    }
    if let Some(r) = &h.revoked {
        row(
            "Revoked",
            format!(
                "<span class=\"st st-revoked\">revoked</span> certificates before {}{}{}",
                esc(&stamp(r.not_before)),
                r.reason
                    .as_deref()
                    .map(|x| format!(": <span class=\"reason\">{}</span>", esc(x)))
                    .unwrap_or_default(),
                r.revoked_by
                    .as_deref()
                    .map(|x| format!(" (by {})", esc(x)))
                    .unwrap_or_default()
            ),
        );
    }
    if let Some(w) = &h.waiting {
        row(
            "Why",
            format!("<span class=\"why\">{}</span>", esc(&tidy_times(w))),
        );
    }
    main.push_str("</dl>\n<h2>Recent events, newest first</h2>\n");
    if detail.events.is_empty() {
        main.push_str("<p>No rollout events for this host yet.</p>\n");
    } else {
        main.push_str(&events_table(&detail.events, false, now));
    }
    page(chrome, Nav::None, &format!("Host {}", h.name), "", &main)
}

// ---------------------------------------------------------------------------------------
// Rollouts

fn host_counts(r: &RolloutStatus) -> String {
    let mut counts: BTreeMap<State, usize> = BTreeMap::new();
    for s in r.hosts.values() {
        *counts.entry(State::from_name(&state_name(s))).or_default() += 1;
    }
    if counts.is_empty() {
        return "none dispatched".to_owned();
    }
    counts
        .iter()
        .map(|(s, n)| format!("{n} {}", s.label()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn rollouts(chrome: &Chrome, list: &[RolloutStatus]) -> String {
    let mut sorted: Vec<&RolloutStatus> = list.iter().collect();
    sorted.sort_by_key(|r| std::cmp::Reverse(r.opened_at));
    let mut main = String::new();
    if sorted.is_empty() {
        main.push_str("<p>No rollouts yet: the control plane opens one per channel when a signed release arrives.</p>\n");
    } else {
        main.push_str("<div class=\"table-wrap\"><table id=\"rollouts\"><thead><tr><th scope=\"col\">Rollout</th><th scope=\"col\">Channel</th><th scope=\"col\">State</th><th scope=\"col\">Opened</th><th scope=\"col\">Hosts</th></tr></thead><tbody>\n");
        for r in sorted {
            let _ = writeln!(
                main,
                "<tr data-rollout=\"{id}\" data-state=\"{state}\"{class}><th scope=\"row\">{link}</th><td>{channel}</td><td>{text}</td><td>{opened}</td><td>{hosts}</td></tr>",
                id = esc(&r.rollout_id),
                state = esc(&state_name(&r.state)),
                class = if is_halted(&r.state) { " class=\"halted\"" } else { "" },
                link = rollout_link(&r.rollout_id, &rollout_name(r)),
                channel = esc(&r.channel),
                text = esc(&rollout_state_text(&r.state)),
                opened = time_tag(r.opened_at, chrome.now),
                hosts = esc(&host_counts(r)),
            );
        }
        main.push_str("</tbody></table></div>\n");
    }
    page(chrome, Nav::Rollouts, "Rollouts", "", &main)
}

/// How many hosts ran the rollout's target after each decision of its trail: a host
/// counts from its `confirm` until a `fail`, `rollback`, `revert` or `requeue`.
pub fn on_target_series(
    opened_at: OffsetDateTime,
    events: &[RolloutEventRecord],
) -> Vec<(OffsetDateTime, usize)> {
    let mut on: BTreeSet<&str> = BTreeSet::new();
    let mut out = vec![(opened_at, 0)];
    let mut sorted: Vec<&RolloutEventRecord> = events.iter().collect();
    sorted.sort_by_key(|e| e.at);
    for e in sorted {
        let Some(host) = e.hostname.as_deref() else {
            continue;
        };
        let changed = match e.kind.as_str() {
            "confirm" => on.insert(host),
            "fail" | "rollback" | "revert" | "requeue" => on.remove(host),
            _ => false,
        };
        if changed {
            out.push((e.at, on.len()));
        }
    }
    out
}

/// A step chart of `series` from its first point to `end`, `total` hosts high.
pub fn on_target_chart(
    series: &[(OffsetDateTime, usize)],
    end: OffsetDateTime,
    total: usize,
) -> String {
    let (left, right, top, bottom) = (48.0_f64, 700.0_f64, 16.0_f64, 190.0_f64);
    let Some(&(start, _)) = series.first() else {
        return String::new();
    };
    let end = end.max(series.last().map_or(start, |p| p.0));
    let span = (end - start).as_seconds_f64().max(1.0);
    let total = total
        .max(series.iter().map(|p| p.1).max().unwrap_or(0))
        .max(1);
    let x = |t: OffsetDateTime| left + (right - left) * (t - start).as_seconds_f64() / span;
    let y = |n: usize| bottom - (bottom - top) * n as f64 / total as f64;
    let mut path = format!("M{:.1} {:.1}", x(start), y(0));
    for &(t, n) in series {
        let _ = write!(path, " H{:.1} V{:.1}", x(t), y(n));
    }
    let _ = write!(path, " H{:.1}", x(end));
    let now_count = series.last().map_or(0, |p| p.1);
    let mut out = format!(
        "<figure class=\"chart\"><svg viewBox=\"0 0 720 230\" width=\"720\" height=\"230\" role=\"img\" aria-labelledby=\"chart-title\">\n<title id=\"chart-title\">Hosts on the target over time: {now_count} of {total} now</title>\n"
    );
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{left}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\"/><line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\"/><line class=\"grid\" x1=\"{left}\" y1=\"{top}\" x2=\"{right}\" y2=\"{top}\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{total}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>",
        left - 6.0,
        top + 4.0,
        left - 6.0,
        bottom + 4.0
    );
    let _ = writeln!(
        out,
        "<text x=\"{left}\" y=\"{}\">{}</text><text x=\"{right}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        bottom + 22.0,
        esc(&hms(start)),
        bottom + 22.0,
        esc(&hms(end))
    );
    let _ = writeln!(out, "<path class=\"line\" d=\"{path}\"/>");
    for &(t, n) in series.iter().skip(1) {
        let _ = writeln!(
            out,
            "<circle class=\"dot\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"><title>{} hosts at {}</title></circle>",
            x(t),
            y(n),
            n,
            esc(&hms(t))
        );
    }
    let _ = writeln!(
        out,
        "</svg><figcaption>Hosts on the target (confirmed) over time, UTC: {now_count} of {total} now.</figcaption></figure>"
    );
    out
}

/// `channel_hosts`: how many hosts the rollout's channel has (the chart's height).
pub fn rollout(
    chrome: &Chrome,
    id: &str,
    rollout: Option<&RolloutStatus>,
    events: &[RolloutEventRecord],
    channel_hosts: usize,
) -> String {
    let now = chrome.now;
    let mut main = String::new();
    let title = match rollout {
        Some(r) => format!("Rollout {}", rollout_name(r)),
        None => format!("Rollout {}", short_id(id)),
    };
    let _ = writeln!(main, "<p class=\"mono small\">{}</p>", esc(id));
    if let Some(r) = rollout {
        let _ = writeln!(
            main,
            "<p>channel {} · opened {} · state <span class=\"rstate\">{}</span> · {}</p>",
            esc(&r.channel),
            time_tag(r.opened_at, now),
            esc(&rollout_state_text(&r.state)),
            esc(&host_counts(r))
        );
        if is_halted(&r.state) {
            main.push_str(&halt_reason(r, events));
        }
        let active = matches!(
            state_name(&r.state).as_str(),
            "executing" | "pending" | "reverting"
        );
        let end = if active {
            now
        } else {
            events.iter().map(|e| e.at).max().unwrap_or(now)
        };
        main.push_str("<h2>Hosts on target</h2>\n");
        main.push_str(&on_target_chart(
            &on_target_series(r.opened_at, events),
            end,
            r.hosts.len().max(channel_hosts),
        ));
    }
    main.push_str("<h2>Timeline, oldest first</h2>\n");
    if events.is_empty() {
        main.push_str("<p>No events recorded for this rollout.</p>\n");
    } else {
        main.push_str("<ol class=\"timeline\">\n");
        let mut sorted: Vec<&RolloutEventRecord> = events.iter().collect();
        sorted.sort_by_key(|e| e.at);
        for e in sorted {
            let _ = writeln!(
                main,
                "<li data-kind=\"{kind}\"><span class=\"when\">{time}</span> <span class=\"ev ev-{kind}\">{kind}</span> {host} <span class=\"reason\">{reason}</span></li>",
                time = time_tag(e.at, now),
                kind = esc(&e.kind),
                host = e.hostname.as_deref().map(host_link).unwrap_or_default(),
                reason = esc(&event_summary(&e.detail)),
            );
        }
        main.push_str("</ol>\n");
    }
    page(chrome, Nav::Rollouts, &title, "", &main)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);

    fn chrome() -> Chrome<'static> {
        Chrome {
            control_plane: "https://cp:8443",
            now: NOW,
            refresh_secs: 5,
            seq: 7,
        }
    }

    fn host(name: &str, state: Option<&str>, waiting: Option<&str>) -> HostStatus {
        HostStatus {
            name: name.into(),
            channel: "stable".into(),
            system: Some("x86_64-linux".into()),
            declared_closure: Some("abc-nixos-system-2".into()),
            current_closure: Some("def-nixos-system-1".into()),
            last_checkin: Some(NOW - time::Duration::seconds(3)),
            online: true,
            converged: false,
            rollout: Some("f".repeat(64)),
            rollout_state: state.map(str::to_owned),
            waiting: waiting.map(str::to_owned),
            revoked: None,
            compliance: None,
        }
    }

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(url_part("a b/<c>"), "a%20b%2F%3Cc%3E");
    }

    #[test]
    fn api_text_is_never_markup() {
        let evil = "failed: <script>alert(1)</script><img src=x onerror=alert(2)>";
        let hosts = vec![host("web-01", Some("failed"), Some(evil))];
        let page = super::hosts(&chrome(), &hosts, &HostFilter::from_query(&[]));
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
    }

    #[test]
    fn hosts_show_their_compliance_as_text() {
        use nixfleet_proto::compliance::{
            ComplianceMode, ComplianceSummary, ControlStatus, EvidenceTrigger, FailingControl,
        };
        let mut hosts = vec![
            host("web-01", Some("failed"), None),
            host("web-02", None, None),
        ];
        hosts[0].compliance = Some(ComplianceSummary {
            evidence_id: "e".repeat(64),
            rollout_id: None,
            closure_hash: "c".into(),
            mode: ComplianceMode::Enforce,
            trigger: EvidenceTrigger::Activation,
            collected_at: time::macros::datetime!(2026-11-27 10:00:00 UTC),
            passed: 12,
            failing: vec![FailingControl {
                id: "auditd-enabled".into(),
                status: ControlStatus::Fail,
            }],
        });
        let page = super::hosts(&chrome(), &hosts, &HostFilter::from_query(&[]));
        assert!(
            page.contains("<th scope=\"col\" class=\"nosort\">Compliance</th>"),
            "{page}"
        );
        assert!(
            page.contains("data-label=\"Compliance\">auditd-enabled fail (12 pass)</td>"),
            "{page}"
        );
        assert!(page.contains("data-label=\"Compliance\">-</td>"), "{page}");
    }

    #[test]
    fn the_page_refreshes_itself_without_javascript() {
        let page = super::rollouts(&chrome(), &[]);
        // The fallback reloads the same URL (filters included): no url= in the refresh.
        assert!(
            page.contains("<noscript><meta http-equiv=\"refresh\" content=\"5\"></noscript>"),
            "{page}"
        );
        assert!(page.contains("data-refresh=\"5\""), "{page}");
        assert!(page.contains("data-seq=\"7\""), "{page}");
        let off = Chrome {
            refresh_secs: 0,
            ..chrome()
        };
        let page = super::rollouts(&off, &[]);
        assert!(!page.contains("http-equiv"), "{page}");
        assert!(!page.contains("<script"), "{page}");
    }

    #[test]
    fn filters_narrow_and_sort_the_table() {
        let mut hosts = vec![
            host("web-02", Some("failed"), Some("failed: boom")),
            host(
                "web-01",
                Some("queued"),
                Some("waiting: wave 1 not reached"),
            ),
            host("db-01", Some("queued"), None),
        ];
        hosts[2].online = false;
        hosts[2].channel = "edge".into();
        let q = |pairs: &[(&str, &str)]| {
            HostFilter::from_query(
                &pairs
                    .iter()
                    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                    .collect::<Vec<_>>(),
            )
        };
        let names = |f: &HostFilter| {
            filter_hosts(&hosts, f)
                .iter()
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&q(&[])), ["db-01", "web-01", "web-02"]);
        assert_eq!(names(&q(&[("state", "queued")])), ["db-01", "web-01"]);
        assert_eq!(names(&q(&[("state", "offline")])), ["db-01"]);
        assert_eq!(names(&q(&[("channel", "stable")])), ["web-01", "web-02"]);
        assert_eq!(names(&q(&[("q", "BOOM")])), ["web-02"]);
        assert_eq!(
            names(&q(&[("sort", "name"), ("dir", "desc")])),
            ["web-02", "web-01", "db-01"]
        );
        assert_eq!(
            names(&q(&[("sort", "state")])),
            ["db-01", "web-01", "web-02"]
        );
    }

    #[test]
    fn waves_come_from_dispatch_decisions() {
        let id = "f".repeat(64);
        let rollout = RolloutStatus {
            rollout_id: id.clone(),
            channel: "stable".into(),
            display_name: Some("stable@1111111".into()),
            state: json!({"halted": {"wave": 0, "failures": 1}}),
            opened_at: NOW - time::Duration::minutes(5),
            hosts: [(
                "web-01".to_owned(),
                json!({"failed": {"reason": "x", "at": "…"}}),
            )]
            .into_iter()
            .collect(),
            introduced: None,
            latest: None,
        };
        let hosts = vec![
            host("web-01", Some("failed"), None),
            host("web-02", Some("queued"), None),
        ];
        let ev = |kind: &str, host: &str, detail: Value, mins: i64| RolloutEventRecord {
            rollout_id: id.clone(),
            hostname: Some(host.into()),
            kind: kind.into(),
            detail,
            at: NOW - time::Duration::minutes(mins),
        };
        let trace = vec![
            ev(
                "dispatch",
                "web-01",
                json!({"action": "dispatch", "wave": 0}),
                4,
            ),
            ev("confirm", "web-01", json!({"action": "confirm"}), 3),
            ev(
                "fail",
                "web-01",
                json!({"action": "fail", "reason": "<b>boom</b>"}),
                2,
            ),
        ];
        let groups = waves(&rollout, &hosts, &trace);
        assert_eq!(
            groups[&WaveKey::Wave(0)],
            vec![("web-01".to_owned(), State::Failed)]
        );
        assert_eq!(
            groups[&WaveKey::Pending],
            vec![("web-02".to_owned(), State::Queued)]
        );
        // Without its dispatch in the trail (state recovered after a wipe), a host that
        // is past queued is not shown as waiting for its wave.
        let groups = waves(&rollout, &hosts, &trace[1..]);
        assert_eq!(
            groups[&WaveKey::Unrecorded],
            vec![("web-01".to_owned(), State::Failed)]
        );
        let series = on_target_series(rollout.opened_at, &trace);
        assert_eq!(series.iter().map(|p| p.1).collect::<Vec<_>>(), [0, 1, 0]);
        let data = FleetData {
            health: Healthz {
                ok: true,
                version: "0.1.0".into(),
                primed: true,
                last_tick_at: Some(NOW),
                fleet_signed_at: Some(NOW - time::Duration::minutes(6)),
                revocations_applied_at: None,
                role: "single".into(),
                replica: None,
                leader: None,
                database_ok: true,
            },
            hosts,
            channels: vec![ChannelView {
                name: "stable".into(),
                status: None,
                rollout: Some(rollout.clone()),
                trace: trace.clone(),
            }],
        };
        let page = fleet(&chrome(), &data);
        assert!(page.contains("halted: wave 0, 1 failure"), "{page}");
        assert!(page.contains("&lt;b&gt;boom&lt;/b&gt;"), "{page}");
        assert!(
            page.contains("data-state=\"failed\" data-count=\"1\""),
            "{page}"
        );
        let page = super::rollout(&chrome(), &id, Some(&rollout), &trace, 2);
        assert!(page.contains("<svg viewBox=\"0 0 720 230\""), "{page}");
        assert!(page.contains("0 of 2 now"), "{page}");
        let page = fleet(&chrome(), &data);
        let (wave0, pending) = (
            page.find("<strong>Wave 0</strong>"),
            page.find("<strong>Not yet dispatched</strong>"),
        );
        assert!(wave0.is_some() && wave0 < pending, "{page}");
    }
}
