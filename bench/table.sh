#!/usr/bin/env bash
# Renders bench/run.sh's results directory as the Markdown table of docs/benchmarks.md.
set -euo pipefail
res=$1

j() { jq -r "$2" "$res/$1.json" 2>/dev/null || echo null; }
have() { [ -f "$res/$1.json" ]; }
# verdict CONDITION-as-awk-expression
verdict() { if awk "BEGIN { exit !($1) }"; then echo met; else echo "**not met**"; fi; }
pct() { awk -v c="$1" -v w="$2" 'BEGIN { if (w > 0) printf "%.0f%%", 100 * c / w; else print "?" }'; }

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
echo "Machine: \`nproc\` = $(nproc), CPU model \`${cpu_model:-unknown}\`, $mem RAM, $(rustc --version 2>/dev/null | cut -d' ' -f1-2); load generator and control plane on the same machine; load average when the run ended: $(cut -d' ' -f1-3 /proc/loadavg). Run on $(date -u +%Y-%m-%d)."
echo
echo "CPU columns are CPU time over wall time (100% = one core). RSS is the control plane's peak (VmHWM) and, where a second figure follows, its resident set at the end of the run (VmRSS, the steady state)."
echo
echo "| # | scenario | target | measured | CP RSS | CP CPU | loadgen CPU | verdict |"
echo "|---|---|---|---|---|---|---|---|"

row_run() { # name number scenario target verdict-expression
  local n=$1 num=$2 what=$3 target=$4 cond=$5
  if ! have "$n"; then echo "| $num | $what | $target | not run | | | | not measured |"; return; fi
  local rate p50 p99 errs errkinds ok visible
  rate=$(j "$n" '.checkins_per_sec | floor')
  p50=$(j "$n" '.latency_ms.p50 * 100 | round / 100'); p99=$(j "$n" '.latency_ms.p99 * 100 | round / 100')
  errs=$(j "$n" '.errors_total'); errkinds=$(j "$n" '.errors | to_entries | map("\(.key) \(.value)") | join(", ")')
  ok=$(j "$n" '.checkins_ok'); visible=$(j "$n" 'if .all_visible_secs then (.all_visible_secs * 10 | round / 10 | tostring) else "never" end')
  local hosts mode dur
  hosts=$(j "$n" '.run.hosts'); mode=$(j "$n" '.run.mode'); dur=$(j "$n" '.run.duration_secs - .run.warmup_secs')
  local measured="$hosts hosts, $mode, ${dur} s measured: $rate check-ins/s, p50 $p50 ms, p99 $p99 ms, $ok check-ins, $errs errors${errkinds:+ ($errkinds)}, all hosts visible after $visible s"
  local rss cpu lcpu
  rss=$(j "$n-cp" 'if .cp_rss_end_mib then "\(.cp_rss_peak_mib) MiB peak, \(.cp_rss_end_mib)" else .cp_rss_peak_mib end'); cpu=$(pct "$(j "$n-cp" '.cp_cpu_secs')" "$(j "$n-cp" '.wall_secs')")
  lcpu=$(pct "$(j "$n" '.loadgen_cpu_secs')" "$(j "$n" '.elapsed_secs')")
  local v; v=$(verdict "$(eval "echo \"$cond\"")")
  echo "| $num | $what | $target | $measured | $rss MiB | $cpu | $lcpu | $v |"
}

# shellcheck disable=SC2016
row_run s1 1 "steady state at the fleet's poll interval, new connection per check-in with resumption" \
  "0 errors, p99 < 250 ms, CP RSS < 1 GiB at its peak and ≤ 400 MiB at steady state (the end of the run)" '$(j s1 .errors_total) == 0 && $(j s1 .latency_ms.p99) < 250 && $(j s1-cp .cp_rss_peak_mib) < 1024 && $(j s1-cp ".cp_rss_end_mib // 1e9") <= 400 && $(j s1 .run.hosts) >= 100000'
row_run s2 2 "maximum check-in throughput, keep-alive" "≥ 5,000 check-ins/s" '$(j s2 .checkins_per_sec) >= 5000 && $(j s2 .errors_total) == 0'
row_run s3 3 "maximum check-in throughput, new connection with resumption" "≥ 2,000 check-ins/s" '$(j s3 .checkins_per_sec) >= 2000 && $(j s3 .errors_total) == 0'

if have s4; then
  ready=$(j s4 .restart_to_ready_secs); visible=$(j s4 .restart_to_all_visible_secs)
  refused=$(j s4-revoked '.errors["http-401"] // 0'); accepted=$(j s4-revoked .checkins_ok)
  hosts=$(j s4-load .run.hosts)
  v=$(verdict "\"$visible\" != \"null\" && ${visible/null/1e9} <= 70 && $refused > 0 && $accepted == 0 && $hosts >= 100000")
  echo "| 4 | disaster recovery under the steady load: CP stopped, \`state.db*\` removed, CP restarted | all hosts visible again within 70 s; revoked hosts still refused | $hosts hosts: serving again ${ready} s after the restart, all visible again after ${visible} s; revoked host: $refused check-ins refused with 401, $accepted accepted | $(j s4 .cp_rss_peak_mib) MiB | | | $v |"
else
  echo "| 4 | disaster recovery under load | all hosts visible again within 70 s; revoked hosts still refused | not run | | | | not measured |"
fi

what5="rollout at scale: a 10,000-host channel, 3 waves, budget 500 in flight"
target5="every wave dispatched and converged, budget never exceeded, reconcile tick p99 < 200 ms; every dispatched host verifies its proof (≤ 4,096 bytes) with the agent's gate"
if have s5; then
  conv=$(j s5 '.converged_secs // "never" | tostring'); p99=$(j s5 .tick_p99_le)
  v=$(verdict "\"$conv\" != \"never\" && $(j s5 .in_flight_max) <= $(j s5 .budget) && ${p99/+Inf/1e9} < 0.2 + 1e-9 && $(j s5 .hosts) >= 10000 && $(j s5-load .errors_total) == 0 && $(j s5-load .proofs.refused) == 0 && $(j s5-load .proofs.verified) >= $(j s5 .hosts) && $(j s5-load .proofs.bytes_max) <= 4096")
  echo "| 5 | $what5 | $target5 | $(j s5 .hosts) hosts (fleet of $(j s7 .hosts)): rollout $(j s5 .rollout_state), every host on the new closure after $conv s; at most $(j s5 .in_flight_max) in flight (budget $(j s5 .budget)); $(j s5 .ticks) ticks, mean $(j s5 '.tick_mean_secs * 1000 | round') ms, p99 ≤ $p99 s; $(j s5-load .confirms_ok) confirms, $(j s5-load .errors_total) errors; host proofs: $(j s5-load .proofs.verified) verified, $(j s5-load .proofs.refused) refused, $(j s5-load .proofs.bytes_max) bytes at most (HTTP head and body), $(j s5-load .proofs.bytes_total) in all, agent gate p99 $(j s5-load .proofs.verify_ms.p99) ms | $(j s5 .cp_rss_peak_mib) MiB | | | $v |"
else
  echo "| 5 | $what5 | $target5 | not run | | | | not measured |"
fi

if have s6; then
  rate=$(j s6 '.enrollments_per_sec | floor'); p99=$(j s6 '.latency_ms.p99 * 100 | round / 100')
  v=$(verdict "$(j s6 .enrollments_per_sec) >= 300 && $(j s6 .replays_accepted) == 0 && $(j s6 .replays_refused) == $(j s6 .replays_sent) && $(j s6 .errors_total) == 0")
  echo "| 6 | enrollment burst | ≥ 300 enrollments/s, nonce replay protection intact | $(j s6 .enrolled) enrollments over $(j s6 .concurrency) connections: $rate/s, p99 $p99 ms, $(j s6 .errors_total) errors; replays: $(j s6 .replays_refused) of $(j s6 .replays_sent) refused with 409, $(j s6 .replays_accepted) accepted | $(j s6-cp .cp_rss_peak_mib) MiB | $(pct "$(j s6-cp .cp_cpu_secs)" "$(j s6-cp .wall_secs)") | | $v |"
else
  echo "| 6 | enrollment burst | ≥ 300 enrollments/s, nonce replay protection intact | not run | | | | not measured |"
fi

if have s7; then
  v=$(verdict "$(j s7 .verify_secs) < 1 && $(j s7 .release_secs) < 5")
  echo "| 7 | artifacts: \`nixfleet verify\` and \`nixfleet release\` of the fleet | verify < 1 s, release < 5 s | $(j s7 .hosts) hosts, fleet.resolved of $(j s7 .fleet_resolved_bytes) bytes: verify $(j s7 .verify_secs) s, release $(j s7 .release_secs) s | | | | $v |"
fi

if have s8-1 && have s8-2; then
  r8() { echo "$(j "s8-$1" '.checkins_per_sec | floor') check-ins/s, p99 $(j "s8-$1" '.latency_ms.p99 * 100 | round / 100') ms, $(j "s8-$1" .errors_total) errors, replicas' CPU $(pct "$(j "s8-$1-cp" .cp_cpu_secs)" "$(j "s8-$1-cp" .wall_secs)")"; }
  v=$(verdict "$(j s8-1 .errors_total) == 0 && $(j s8-2 .errors_total) == 0")
  echo "| 8 | replicas on PostgreSQL behind HAProxy (TCP, mTLS passed through), keep-alive, $(j s8-1 .run.hosts) hosts | measured, no target; 0 errors | 1 replica: $(r8 1); 2 replicas: $(r8 2). Both replicas, HAProxy, PostgreSQL and the load generator share the machine's $(nproc) cores, so a second replica adds no CPU here | | | | $v |"
else
  echo "| 8 | replicas on PostgreSQL behind HAProxy, 1 vs 2 | measured, no target; 0 errors | not run | | | | not measured |"
fi

if have s9; then
  v=$(verdict "$(j s9 .errors_total) == 0")
  echo "| 9 | 2 replicas on PostgreSQL behind HAProxy (round robin) at steady state, new connection per check-in with resumption | measured, no target; 0 errors | $(j s9 .run.hosts) hosts at a $(j s9 .run.interval_secs) s poll, $(j s9 '.run.duration_secs - .run.warmup_secs') s measured: $(j s9 '.checkins_per_sec | floor') check-ins/s, p50 $(j s9 '.latency_ms.p50 * 100 | round / 100') ms, p99 $(j s9 '.latency_ms.p99 * 100 | round / 100') ms, $(j s9 .errors_total) errors; TLS handshakes $(j s9 .tls_handshakes_full) full, $(j s9 .tls_handshakes_resumed) resumed (a ticket from one replica is a full handshake on the other) | $(j s9-cp .cp_rss_peak_mib) MiB (each, peak) | $(pct "$(j s9-cp .cp_cpu_secs)" "$(j s9-cp .wall_secs)") (both) | $(pct "$(j s9 .loadgen_cpu_secs)" "$(j s9 .elapsed_secs)") | $v |"
fi
