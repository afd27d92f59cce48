//! Disruption budgets: identity, readable names and limits.

use nixfleet_proto::Selector;

/// The selector in a canonical form: budgets are the same budget when their canonical
/// selectors are equal, whichever manifest carries them. Host and tag lists are sets, so
/// they are sorted and deduplicated; `and` keeps its order.
pub(crate) fn canonical(selector: &Selector) -> Selector {
    fn set(list: &Option<Vec<String>>) -> Option<Vec<String>> {
        list.as_ref().map(|l| {
            let mut l = l.clone();
            l.sort();
            l.dedup();
            l
        })
    }
    Selector {
        tags: set(&selector.tags),
        tags_any: set(&selector.tags_any),
        hosts: set(&selector.hosts),
        channel: selector.channel.clone(),
        all: selector.all,
        not: selector.not.as_deref().map(|s| Box::new(canonical(s))),
        and: selector
            .and
            .as_ref()
            .map(|all| all.iter().map(canonical).collect()),
    }
}

/// A short name for reasons: `db`, `db,eu` (all of), `any(web,db)`, `hosts(a,b)`,
/// `channel(edge)`, `all`, `not(db)`, with several conditions joined by ` & `.
pub(crate) fn label(selector: &Selector) -> String {
    let mut parts = Vec::new();
    if let Some(tags) = &selector.tags {
        parts.push(tags.join(","));
    }
    if let Some(tags) = &selector.tags_any {
        parts.push(format!("any({})", tags.join(",")));
    }
    if let Some(hosts) = &selector.hosts {
        parts.push(format!("hosts({})", hosts.join(",")));
    }
    if let Some(channel) = &selector.channel {
        parts.push(format!("channel({channel})"));
    }
    if let Some(all) = selector.all {
        parts.push(if all { "all" } else { "none" }.to_owned());
    }
    if let Some(not) = &selector.not {
        parts.push(format!("not({})", label(not)));
    }
    if let Some(and) = &selector.and {
        parts.extend(and.iter().map(label));
    }
    if parts.is_empty() {
        "empty".to_owned()
    } else {
        parts.join(" & ")
    }
}

/// `min(maxInFlight, max(1, floor(maxInFlightPct × hosts / 100)))`; no limit when neither
/// is set.
pub(crate) fn limit(
    max_in_flight: Option<u32>,
    max_in_flight_pct: Option<u32>,
    hosts: usize,
) -> u32 {
    let mut limit = u32::MAX;
    if let Some(max) = max_in_flight {
        limit = limit.min(max);
    }
    if let Some(pct) = max_in_flight_pct {
        let hosts = u64::try_from(hosts).unwrap_or(u64::MAX);
        let by_pct = (u64::from(pct).saturating_mul(hosts) / 100).max(1);
        limit = limit.min(u32::try_from(by_pct).unwrap_or(u32::MAX));
    }
    limit
}

/// Distinct hostnames over the frozen lists of every manifest carrying one budget. The
/// lists are sorted; manifests of one release usually carry identical lists.
pub(crate) fn union_len(lists: &[&[String]]) -> usize {
    let mut distinct: Vec<&[String]> = Vec::new();
    for list in lists {
        if !distinct.iter().any(|d| d == list) {
            distinct.push(list);
        }
    }
    match distinct.as_slice() {
        [] => 0,
        [one] if one.windows(2).all(|w| w[0] < w[1]) => one.len(),
        many => {
            let mut all: Vec<&str> = many
                .iter()
                .flat_map(|l| l.iter().map(String::as_str))
                .collect();
            all.sort_unstable();
            all.dedup();
            all.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(json: &str) -> Selector {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn every_selector_form_has_a_readable_label() {
        let cases = [
            (r#"{"tags":["db"]}"#, "db"),
            (r#"{"tags":["db","eu"]}"#, "db,eu"),
            (r#"{"tagsAny":["web","db"]}"#, "any(web,db)"),
            (r#"{"hosts":["a","b"]}"#, "hosts(a,b)"),
            (r#"{"channel":"edge"}"#, "channel(edge)"),
            (r#"{"all":true}"#, "all"),
            (r#"{"all":false}"#, "none"),
            (r#"{"not":{"tags":["db"]}}"#, "not(db)"),
            (
                r#"{"and":[{"tags":["db"]},{"channel":"edge"}]}"#,
                "db & channel(edge)",
            ),
            (r#"{"tags":["db"],"channel":"edge"}"#, "db & channel(edge)"),
            (r#"{}"#, "empty"),
        ];
        for (json, want) in cases {
            assert_eq!(label(&sel(json)), want, "{json}");
        }
    }

    #[test]
    fn canonical_form_ignores_list_order_and_duplicates() {
        assert_eq!(
            canonical(&sel(r#"{"tags":["eu","db","db"]}"#)),
            canonical(&sel(r#"{"tags":["db","eu"]}"#))
        );
        assert_eq!(
            canonical(&sel(r#"{"not":{"hosts":["b","a"]}}"#)),
            canonical(&sel(r#"{"not":{"hosts":["a","b"]}}"#))
        );
        assert_ne!(
            canonical(&sel(r#"{"tags":["db"]}"#)),
            canonical(&sel(r#"{"tagsAny":["db"]}"#))
        );
    }

    #[test]
    fn limit_takes_the_stricter_bound_and_pct_allows_at_least_one() {
        assert_eq!(limit(None, None, 10), u32::MAX);
        assert_eq!(limit(Some(3), None, 10), 3);
        assert_eq!(limit(None, Some(25), 10), 2);
        assert_eq!(limit(None, Some(5), 10), 1, "floor(0.5) is raised to 1");
        assert_eq!(limit(Some(1), Some(50), 10), 1);
        assert_eq!(limit(Some(9), Some(50), 10), 5);
        assert_eq!(limit(Some(0), None, 10), 0, "an explicit zero freezes");
        assert_eq!(limit(None, Some(100), 0), 1);
    }

    #[test]
    fn union_counts_distinct_hosts() {
        let a: Vec<String> = vec!["a".into(), "b".into()];
        let b: Vec<String> = vec!["b".into(), "c".into()];
        assert_eq!(union_len(&[&a, &a]), 2);
        assert_eq!(union_len(&[&a, &b]), 3);
        assert_eq!(union_len(&[]), 0);
        let unsorted: Vec<String> = vec!["b".into(), "a".into(), "b".into()];
        assert_eq!(union_len(&[&unsorted]), 2);
    }
}
