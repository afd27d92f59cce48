#!/usr/bin/env bash
# The fleet-scale benchmark: builds in release mode, generates a fleet with its keys,
# certificates and signed release, starts the real control plane, runs the scenarios of
# docs/benchmarks.md ("Control plane at fleet scale") with nixfleet-loadgen beside it, and
# writes the results table into docs/benchmarks.md.
#
# Sizes and durations come from the environment; the defaults are the documented ones.
# A quick run:
#   BENCH_HOSTS=5000 BENCH_STEADY_SECS=20 BENCH_STEADY_WARMUP=10 BENCH_INTERVAL=10 \
#   BENCH_MAX_SECS=10 BENCH_ENROLL_HOSTS=500 BENCH_DR_SECS=40 BENCH_DR_STOP_AFTER=12 bench/run.sh
# Scenarios to run: BENCH_SCENARIOS="7 2 3 1 6 4 5 8 9". Scenarios 8 and 9 (replicas on
# PostgreSQL behind HAProxy) need both; their database server is BENCH_DATABASE_URL, else
# the local cluster scripts/test-postgres prepares. Results of scenarios not rerun are
# kept in target/bench/results and stay in the table; they are only comparable when the
# sizes were the same (scenario 7 always runs: it makes the release).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

HOSTS=${BENCH_HOSTS:-100000}
CHANNELS=${BENCH_CHANNELS:-10}
INTERVAL=${BENCH_INTERVAL:-60}
STEADY_SECS=${BENCH_STEADY_SECS:-300}
STEADY_WARMUP=${BENCH_STEADY_WARMUP:-$INTERVAL}
MAX_HOSTS=${BENCH_MAX_HOSTS:-1000}
MAX_SECS=${BENCH_MAX_SECS:-30}
MAX_WARMUP=${BENCH_MAX_WARMUP:-5}
ENROLL_HOSTS=${BENCH_ENROLL_HOSTS:-3000}
ENROLL_CONCURRENCY=${BENCH_ENROLL_CONCURRENCY:-32}
DR_SECS=${BENCH_DR_SECS:-200}
DR_STOP_AFTER=${BENCH_DR_STOP_AFTER:-30}
ROLLOUT_HOSTS=${BENCH_ROLLOUT_HOSTS:-10000}
ROLLOUT_BUDGET=${BENCH_ROLLOUT_BUDGET:-500}
ROLLOUT_INTERVAL=${BENCH_ROLLOUT_INTERVAL:-20}
ROLLOUT_SECS=${BENCH_ROLLOUT_SECS:-420}
HA_HOSTS=${BENCH_HA_HOSTS:-20000}
HA_INTERVAL=${BENCH_HA_INTERVAL:-20}
HA_SECS=${BENCH_HA_SECS:-120}
SCENARIOS=${BENCH_SCENARIOS:-"7 2 3 1 6 4 5 8 9"}
WORK=${BENCH_DIR:-$root/target/bench}
DOC=${BENCH_DOC:-$root/docs/benchmarks.md}
PORT=${BENCH_PORT:-18443}
MPORT=${BENCH_METRICS_PORT:-18444}

for tool in curl jq awk; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh: $tool is required" >&2; exit 1; }
done

log() { printf '\n== %s\n' "$*" >&2; }

log "release build"
cargo build --release --locked -p nixfleet-cli -p nixfleet-control-plane -p nixfleet-loadgen
bin=$root/target/release
nixfleet=$bin/nixfleet
loadgen=$bin/nixfleet-loadgen

# Everything is made anew except the results of scenarios this run does not repeat. The
# marker keeps the clean-up away from a directory that is not the benchmark's.
if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK")" ] && [ ! -e "$WORK/.nixfleet-bench" ]; then
  echo "bench/run.sh: $WORK is not empty and not a benchmark directory; set BENCH_DIR" >&2
  exit 1
fi
mkdir -p "$WORK/results"
touch "$WORK/.nixfleet-bench"
find "$WORK" -mindepth 1 -maxdepth 1 ! -name results ! -name .nixfleet-bench -exec rm -rf {} +
for s in 7 $SCENARIOS; do rm -f "$WORK/results/s$s.json" "$WORK/results/s$s-"*; done
cd "$WORK"
res=$WORK/results
etc=$WORK/etc

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
# utime + stime of a process, seconds.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"; }
# Peak resident set of a process, MiB (null once it is gone).
rss_peak_of() { awk '/^VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo null; }
rss_now_of() { awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo null; }
# Connections the kernel dropped because a listen queue was full (whole machine): a
# client whose SYN is dropped retries after 1 s, which shows as a 1 s check-in.
listen_overflows() {
  awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) name[i] = $i; h = 1 }
                    else { for (i = 1; i <= NF; i++) if (name[i] == "ListenOverflows") print $i } }' /proc/net/netstat
}

log "keys, trust roots, fleet CA, server certificate"
mkdir -p "$etc"
ci=$("$nixfleet" keygen --out ci.pem)
org=$("$nixfleet" keygen --out org.pem)
"$nixfleet" trust init --ci-release-key "$ci" --org-root-key "$org" --out "$etc/trust.json" >/dev/null
"$nixfleet" ca init --out "$etc" >/dev/null
"$nixfleet" cert server --ca-dir "$etc" --san localhost --san 127.0.0.1 --out "$etc" >/dev/null

log "fleet of $HOSTS hosts in $CHANNELS channels"
# Every scenario runs the same fleet: a fleet-wide disruption budget (scenario 5), three
# waves per channel; release 1 puts every host on generation 1.
"$loadgen" fleet --hosts "$HOSTS" --channels "$CHANNELS" --budget "$ROLLOUT_BUDGET" --out fleet >&2

log "scenario 7: nixfleet release and nixfleet verify of the whole fleet"
t0=$(now)
"$nixfleet" release --fleet fleet/fleet.json --closures fleet/closures.json \
  --ci-commit 1111111111111111111111111111111111111111 --key ci.pem --out release >/dev/null
t1=$(now)
"$nixfleet" verify fleet release/fleet.resolved.json --trust-file "$etc/trust.json" >/dev/null
t2=$(now)
jq -n --argjson release "$(elapsed "$t0" "$t1")" --argjson verify "$(elapsed "$t1" "$t2")" \
  --argjson bytes "$(stat -c %s release/fleet.resolved.json)" --argjson hosts "$HOSTS" \
  '{hosts: $hosts, release_secs: $release, verify_secs: $verify, fleet_resolved_bytes: $bytes}' > "$res/s7.json"

# One revoked host just past the fleet: its certificate must be refused after a wipe.
revoked=$(printf 'host-%06d' "$HOSTS")
jq -n --arg h "$revoked" '{schemaVersion: 1, freshnessWindow: null,
  revocations: [{hostname: $h, notBefore: "2100-01-01T00:00:00Z", reason: "benchmark", revokedBy: "bench"}],
  meta: {schemaVersion: 1, signedAt: null, ciCommit: null, signatureAlgorithm: null}}' > revocations-in.json
"$nixfleet" revocations sign --in revocations-in.json --key ci.pem --out release >/dev/null

CP_PID=
REL=release
CP_INTERVAL=$INTERVAL
start_cp() {
  mkdir -p state
  NIXFLEET_LOG=info "$bin/nixfleet-control-plane" --listen "127.0.0.1:$PORT" \
    --metrics-listen "127.0.0.1:$MPORT" \
    --db-path state/state.db --audit-log state/audit.log \
    --trust-file "$etc/trust.json" \
    --tls-cert "$etc/server-cert.pem" --tls-key "$etc/server-key.pem" --client-ca "$etc/ca.pem" \
    --fleet-ca-cert "$etc/fleet-ca-cert.pem" --fleet-ca-key "$etc/fleet-ca-key.pem" \
    --artifact "$REL/fleet.resolved.json" --signature "$REL/fleet.resolved.json.sig" \
    --revocations-artifact release/revocations.json --revocations-signature release/revocations.json.sig \
    --rollouts-dir "$REL/rollouts" --checkin-interval-secs "$CP_INTERVAL" \
    >> "$WORK/cp.log" 2>&1 &
  CP_PID=$!
  for _ in $(seq 1 600); do
    if curl -sk --max-time 2 "https://127.0.0.1:$PORT/healthz" | jq -e '.last_tick_at != null' >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$CP_PID" 2>/dev/null || { echo "control plane exited; see $WORK/cp.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "control plane not ready after 60 s; see $WORK/cp.log" >&2
  exit 1
}
stop_cp() {
  kill -TERM "$CP_PID" 2>/dev/null || true
  wait "$CP_PID" 2>/dev/null || true
}
fresh_cp() { rm -rf state; start_cp; }
trap 'stop_cp' EXIT
metric() { curl -s --max-time 5 "http://127.0.0.1:$MPORT/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

common=(--connect "127.0.0.1:$PORT" --server-name localhost --ca-cert "$etc/fleet-ca-cert.pem")
run_args=("${common[@]}" --ca-key "$etc/fleet-ca-key.pem")

# Runs the load generator against a fresh control plane; records the CP's CPU and peak RSS.
measure() {
  local name=$1; shift
  fresh_cp
  local cpu0 t0 t1 drops0
  cpu0=$(cpu_of "$CP_PID")
  drops0=$(listen_overflows)
  t0=$(now)
  "$loadgen" "$@" --json "$res/$name.json" >&2
  t1=$(now)
  curl -s --max-time 5 "http://127.0.0.1:$MPORT/metrics" > "$res/$name-metrics.txt" || true
  jq -n --argjson cpu "$(awk -v a="$cpu0" -v b="$(cpu_of "$CP_PID")" 'BEGIN { print b - a }')" \
    --argjson wall "$(elapsed "$t0" "$t1")" --argjson rss "$(rss_peak_of "$CP_PID")" \
    --argjson rss_end "$(rss_now_of "$CP_PID")" \
    --argjson seen "$(metric nixfleet_hosts_seen)" --argjson drops "$(($(listen_overflows) - drops0))" \
    '{cp_cpu_secs: $cpu, wall_secs: $wall, cp_rss_peak_mib: $rss, cp_rss_end_mib: $rss_end, cp_hosts_seen: $seen, listen_overflows: $drops}' > "$res/$name-cp.json"
  stop_cp
}

# Replicas on PostgreSQL behind HAProxy (scenarios 8 and 9): a fresh database, N
# replicas, HAProxy in TCP mode round-robin over them; the load generator goes through it.
replica_db() {
  for tool in haproxy psql; do
    command -v "$tool" >/dev/null || { echo "bench/run.sh: the replica scenarios need $tool (apt-get install -y haproxy postgresql)" >&2; exit 1; }
  done
  admin=${BENCH_DATABASE_URL:-$("$root/scripts/test-postgres")}
  dburl="${admin%/*}/nixfleet_bench"
  psql -X -q "$admin" -c "DROP DATABASE IF EXISTS nixfleet_bench WITH (FORCE)" -c "CREATE DATABASE nixfleet_bench"
}
measure_replicas() {
  local name=$1 n=$2; shift 2
  local haport=$((PORT + 20)) backends="" pids=() i cpu0=0 cpu1=0 rss=0 t0 t1 hapid drops0
  replica_db
  for i in $(seq 1 "$n"); do
    mkdir -p "replica-$i"
    NIXFLEET_LOG=info "$bin/nixfleet-control-plane" --listen "127.0.0.1:$((PORT + 10 + i))" \
      --database-url "$dburl" --replica-name "cp-$i" --audit-log "replica-$i/audit.log" \
      --trust-file "$etc/trust.json" \
      --tls-cert "$etc/server-cert.pem" --tls-key "$etc/server-key.pem" --client-ca "$etc/ca.pem" \
      --fleet-ca-cert "$etc/fleet-ca-cert.pem" --fleet-ca-key "$etc/fleet-ca-key.pem" \
      --artifact release/fleet.resolved.json --signature release/fleet.resolved.json.sig \
      --revocations-artifact release/revocations.json --revocations-signature release/revocations.json.sig \
      --rollouts-dir release/rollouts --checkin-interval-secs "$INTERVAL" \
      >> "$WORK/replica-$i.log" 2>&1 &
    pids+=($!)
    backends+="    server cp$i 127.0.0.1:$((PORT + 10 + i)) check inter 500ms fall 2 rise 1"$'\n'
    for _ in $(seq 1 600); do
      curl -sk --max-time 2 "https://127.0.0.1:$((PORT + 10 + i))/healthz" | jq -e '.last_tick_at != null' >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  printf 'global\n    maxconn %s\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 120s\n    timeout server 120s\n\nfrontend nixfleet\n    bind 127.0.0.1:%s\n    default_backend cp\n\nbackend cp\n    balance roundrobin\n%s' \
    "$(( ($(ulimit -n) - 200) / 2 ))" "$haport" "$backends" > haproxy.cfg
  haproxy -f haproxy.cfg -db >> "$WORK/haproxy.log" 2>&1 &
  hapid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$haport") 2>/dev/null && break; sleep 0.1; done
  for i in "${pids[@]}"; do cpu0=$(awk -v a="$cpu0" -v b="$(cpu_of "$i")" 'BEGIN { print a + b }'); done
  drops0=$(listen_overflows)
  t0=$(now)
  "$loadgen" run --connect "127.0.0.1:$haport" --server-name localhost --ca-cert "$etc/fleet-ca-cert.pem" \
    --ca-key "$etc/fleet-ca-key.pem" "$@" --json "$res/$name.json" >&2
  t1=$(now)
  for i in "${pids[@]}"; do
    cpu1=$(awk -v a="$cpu1" -v b="$(cpu_of "$i")" 'BEGIN { print a + b }')
    rss=$(awk -v a="$rss" -v b="$(rss_peak_of "$i")" 'BEGIN { print (b > a ? b : a) }')
  done
  jq -n --argjson cpu "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { print b - a }')" --argjson wall "$(elapsed "$t0" "$t1")" \
    --argjson replicas "$n" --argjson rss "$rss" --argjson drops "$(($(listen_overflows) - drops0))" \
    '{replicas: $replicas, cp_cpu_secs: $cpu, wall_secs: $wall, cp_rss_peak_mib: $rss, listen_overflows: $drops}' > "$res/$name-cp.json"
  kill -TERM "$hapid" "${pids[@]}" 2>/dev/null || true
  wait "$hapid" "${pids[@]}" 2>/dev/null || true
  psql -X -q "$admin" -c "DROP DATABASE IF EXISTS nixfleet_bench WITH (FORCE)"
}

for s in $SCENARIOS; do
  case $s in
    2) log "scenario 2: maximum check-in throughput, keep-alive ($MAX_HOSTS hosts, ${MAX_SECS} s)"
       measure s2 run "${run_args[@]}" --hosts "$MAX_HOSTS" --mode keep-alive --interval 0 \
         --start-spread 1 --duration "$MAX_SECS" --warmup "$MAX_WARMUP" ;;
    3) log "scenario 3: maximum check-in throughput, new connection with resumption ($MAX_HOSTS hosts, ${MAX_SECS} s)"
       measure s3 run "${run_args[@]}" --hosts "$MAX_HOSTS" --mode resume --interval 0 \
         --start-spread 1 --duration "$MAX_SECS" --warmup "$MAX_WARMUP" ;;
    1) log "scenario 1: steady state, $HOSTS hosts at a ${INTERVAL} s poll, ${STEADY_SECS} s after ${STEADY_WARMUP} s warm-up"
       measure s1 run "${run_args[@]}" --hosts "$HOSTS" --mode resume --interval "$INTERVAL" \
         --duration "$((STEADY_WARMUP + STEADY_SECS))" --warmup "$STEADY_WARMUP" ;;
    6) log "scenario 6: enrollment burst ($ENROLL_HOSTS hosts, $ENROLL_CONCURRENCY connections)"
       measure s6 enroll "${common[@]}" --org-root-key org.pem --hosts "$ENROLL_HOSTS" \
         --concurrency "$ENROLL_CONCURRENCY" --replays 100 ;;
    4) log "scenario 4: wipe and restart under the steady load"
       fresh_cp
       "$loadgen" run "${run_args[@]}" --hosts "$HOSTS" --mode resume --interval "$INTERVAL" \
         --duration "$DR_SECS" --json "$res/s4-load.json" > "$WORK/s4-load.out" 2>&1 &
       load_pid=$!
       # Minting takes a while; the clock starts when every host has been seen once.
       for _ in $(seq 1 $((DR_SECS * 10))); do
         [ "$(metric nixfleet_hosts_seen)" = "$HOSTS" ] && break
         sleep 0.1
       done
       sleep "$DR_STOP_AFTER"
       stop_cp
       rm -f state/state.db state/state.db-wal state/state.db-shm
       t0=$(now)
       start_cp
       ready=$(elapsed "$t0" "$(now)")
       visible=null
       while kill -0 "$load_pid" 2>/dev/null; do
         if [ "$(metric nixfleet_hosts_seen)" = "$HOSTS" ]; then visible=$(elapsed "$t0" "$(now)"); break; fi
         sleep 0.2
       done
       wait "$load_pid" || true
       rss=$(rss_peak_of "$CP_PID")
       "$loadgen" run "${run_args[@]}" --first-host "$HOSTS" --hosts 1 --interval 1 --start-spread 0 \
         --duration 3 --json "$res/s4-revoked.json" >&2 || true
       jq -n --argjson ready "$ready" --argjson visible "$visible" --argjson rss "$rss" \
         '{restart_to_ready_secs: $ready, restart_to_all_visible_secs: $visible, cp_rss_peak_mib: $rss}' > "$res/s4.json"
       stop_cp ;;
    5) log "scenario 5: rollout of channel ch-00 ($ROLLOUT_HOSTS hosts), budget $ROLLOUT_BUDGET in flight"
       # Release 2 moves ch-00 (hosts 0 .. ROLLOUT_HOSTS-1 with the default 10 channels) to
       # generation 2; its hosts run generation 1 and follow the CP's nextCheckinSecs. Each
       # dispatched host fetches its proof and passes it through the agent's gate.
       "$loadgen" fleet --hosts "$HOSTS" --channels "$CHANNELS" --budget "$ROLLOUT_BUDGET" \
         --generation 2 --channel ch-00 --out fleet2 >&2
       "$nixfleet" release --fleet fleet2/fleet.json --closures fleet2/closures.json \
         --ci-commit 2222222222222222222222222222222222222222 --key ci.pem --out release2 >/dev/null
       "$nixfleet" cert operator --ca-dir "$etc" --name bench --out operator >/dev/null
       op=(--cacert "$etc/ca.pem" --cert operator/operator-cert.pem --key operator/operator-key.pem)
       rm -rf state
       REL=release2 CP_INTERVAL=$ROLLOUT_INTERVAL start_cp
       "$loadgen" run "${run_args[@]}" --hosts "$ROLLOUT_HOSTS" --mode resume --start-spread "$ROLLOUT_INTERVAL" \
         --activate-delay 2 --duration "$ROLLOUT_SECS" --trust-file "$etc/trust.json" --json "$res/s5-load.json" > "$WORK/s5-load.out" 2>&1 &
       load_pid=$!
       t0=$(now)
       converged=null
       while kill -0 "$load_pid" 2>/dev/null; do
         n=$(curl -s --max-time 5 "${op[@]}" "https://127.0.0.1:$PORT/v1/channels/ch-00" | jq -r '.hosts_converged // 0')
         if [ "$n" = "$ROLLOUT_HOSTS" ] && [ "$converged" = null ]; then converged=$(elapsed "$t0" "$(now)"); fi
         sleep 2
       done
       wait "$load_pid" || true
       state=$(curl -s --max-time 30 "${op[@]}" "https://127.0.0.1:$PORT/v1/rollouts" \
         | jq -r '[.[] | select(.channel == "ch-00")] | max_by(.opened_at) | .state | if type == "string" then . else tojson end')
       curl -s --max-time 5 "http://127.0.0.1:$MPORT/metrics" > "$WORK/s5-metrics.txt"
       # p99 of the tick as the upper bound of its histogram bucket.
       p99=$(awk -F'[{}"= ]+' '/^nixfleet_reconcile_tick_duration_seconds_bucket/ { le[++n] = $3; c[n] = $NF }
         END { for (i = 1; i <= n; i++) if (c[i] >= 0.99 * c[n]) { print le[i]; exit } }' "$WORK/s5-metrics.txt")
       jq -n --argjson converged "$converged" --arg state "$state" --arg p99 "$p99" \
         --argjson ticks "$(awk '$1 == "nixfleet_reconcile_tick_duration_seconds_count" { print $2 }' "$WORK/s5-metrics.txt")" \
         --argjson tick_sum "$(awk '$1 == "nixfleet_reconcile_tick_duration_seconds_sum" { print $2 }' "$WORK/s5-metrics.txt")" \
         --argjson in_flight_max "$(awk '$1 == "nixfleet_hosts_in_flight_max" { print $2 }' "$WORK/s5-metrics.txt")" \
         --argjson budget "$ROLLOUT_BUDGET" --argjson hosts "$ROLLOUT_HOSTS" --argjson rss "$(rss_peak_of "$CP_PID")" \
         '{hosts: $hosts, budget: $budget, converged_secs: $converged, rollout_state: $state, tick_p99_le: $p99,
           ticks: $ticks, tick_mean_secs: (if $ticks > 0 then $tick_sum / $ticks else null end),
           in_flight_max: $in_flight_max, cp_rss_peak_mib: $rss}' > "$res/s5.json"
       stop_cp ;;
    8) log "scenario 8: replicas on PostgreSQL behind HAProxy, 1 then 2 ($MAX_HOSTS hosts, keep-alive, ${MAX_SECS} s)"
       for n in 1 2; do
         measure_replicas "s8-$n" "$n" --hosts "$MAX_HOSTS" --mode keep-alive --interval 0 \
           --start-spread 1 --duration "$MAX_SECS" --warmup "$MAX_WARMUP"
       done ;;
    9) log "scenario 9: 2 replicas at steady state ($HA_HOSTS hosts, resume, ${HA_INTERVAL} s poll, ${HA_SECS} s)"
       measure_replicas s9 2 --hosts "$HA_HOSTS" --mode resume --interval "$HA_INTERVAL" \
         --duration "$((HA_INTERVAL + HA_SECS))" --warmup "$HA_INTERVAL" ;;
    7) ;; # measured above, while making the release
    *) echo "bench/run.sh: unknown scenario $s" >&2; exit 1 ;;
  esac
done

log "writing $DOC"
"$root/bench/table.sh" "$res" > "$WORK/table.md"
begin='<!-- bench/run.sh: begin -->'
end='<!-- bench/run.sh: end -->'
if grep -qF "$begin" "$DOC"; then
  awk -v b="$begin" -v e="$end" -v f="$WORK/table.md" '
    $0 == b { print; while ((getline line < f) > 0) print line; skip = 1; next }
    $0 == e { skip = 0 }
    !skip { print }' "$DOC" > "$DOC.new"
  mv "$DOC.new" "$DOC"
else
  { printf '\n%s\n' "$begin"; cat "$WORK/table.md"; printf '%s\n' "$end"; } >> "$DOC"
fi
cat "$WORK/table.md"
