//! Helpers shared by the control-plane test binaries (each uses some of them).
#![allow(dead_code)]

use std::path::Path;

use nixfleet_harness::*;

/// Starts the control plane on a free port and enrolls the first `count` hosts.
pub async fn start_enrolled(
    s: &mut Setup,
    state: &Path,
    opts: &CpOptions,
    count: usize,
) -> (Cp, u16, Vec<Host>) {
    let port = free_port();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, state, opts);
    cp.wait_ready(&s.pki);
    let mut hosts = std::mem::take(&mut s.hosts);
    for h in hosts.iter_mut().take(count) {
        assert_eq!(enroll(&s.pki, port, h).await.status, 200);
    }
    (cp, port, hosts)
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}
