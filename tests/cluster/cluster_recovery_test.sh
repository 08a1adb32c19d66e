#!/usr/bin/env bash
# Node loss for real: 3 namespace hosts x 2 ranks of train_linear under unimsg-run, and one host
# lost three ways while it trains — killed (its processes, daemon and disk), cut off (its link
# down), frozen (every process stopped). Each time unimsg-run must name that host, drop exactly
# it, relaunch on the other two, and finish with bitwise the parameters of a reference resumed
# from the same checkpoint on 4 ranks; nothing of the job may be left running on any host. Then a
# hostfile naming a host that does not answer: a clear failure naming it, and a run without it.
#   cluster_recovery_test.sh CLUSTER UNIMSG_RUN TRAINER
# Exit status 77 (a skip, saying why) where namespaces cannot be made (not root).
set -euo pipefail
cluster=$1
launcher=$2
trainer=$3
work=$(mktemp -d)
fail() { echo "FAIL: $*"; exit 1; }

set +e
info=$("$cluster" up --hosts 3 --slots 2 --json)
status=$?
set -e
if ((status == 77)); then
  echo "SKIP: this test needs a cluster of namespace hosts, which needs root"
  exit 77
fi
((status == 0)) || fail "scripts/cluster up failed ($status)"
name=$(sed -E 's/^\{"name":"([a-z0-9]+)".*/\1/' <<<"$info")
hostfile=$(sed -E 's/.*"hostfile":"([^"]+)".*/\1/' <<<"$info")
trap '"$cluster" down --name "$name"; rm -rf "$work"' EXIT
eval "$("$cluster" env --name "$name")"
lost=$name-h1
echo "cluster $name: $(paste -sd' ' "$(dirname "$hostfile")/hosts")"

export UNIMSG_FUSION_THRESHOLD=0  # bitwise-reproducible reductions (docs/architecture.md)
train=(--steps 120 --batch-size 60 --step-ms 20 --checkpoint-every 10 --checkpoint-keep 20 --json)

# Runs the job under unimsg-run in the background, applies FAULT to the lost host once rank 0 has
# passed step 25, and checks the recovery. `run NAME FAULT [unimsg-run options]`.
run() {
  local label=$1 fault=$2
  shift 2
  local dir=$work/$label
  mkdir -p "$dir"
  local started=$SECONDS
  "$launcher" -np 6 --hostfile "$hostfile" --max-restarts 2 --heartbeat-timeout 4 \
    --teardown-grace 8 --checkpoint-dir "$dir/ck" --run-dir "$dir/run" "$@" \
    -- "$trainer" "${train[@]}" >"$dir/out" 2>"$dir/err" &
  local job=$!
  for _ in $(seq 600); do
    grep -Eq '"step":(2[5-9]|[3-9][0-9])[,}]' "$dir/out" 2>/dev/null && break
    kill -0 $job 2>/dev/null || break
    sleep 0.1
  done
  "$cluster" "$fault" "$lost"
  echo "$label: $fault $lost at $(grep -Eo '"step":[0-9]+' "$dir/out" | tail -1)"
  wait $job || { tail -30 "$dir/err"; fail "$label: unimsg-run exited with $?"; }
  echo "$label: recovered in $((SECONDS - started)) s"
  local events
  events=$(grep -o '"event":"[a-z_]*"' "$dir/run/events.jsonl" | cut -d'"' -f4 | paste -sd' ')
  [[ $events == "launch failure rerank restart launch done" ]] ||
    { cat "$dir/run/events.jsonl"; fail "$label: events $events"; }
  grep -q "\"event\":\"failure\".*\"lost_hosts\":\\[\"$lost\"\\]" "$dir/run/events.jsonl" ||
    { cat "$dir/run/events.jsonl"; fail "$label: $lost not named the lost host"; }
  grep -q '"event":"launch","restart":1,.*"world_size":4' "$dir/run/events.jsonl" ||
    fail "$label: the relaunch did not run on the 4 ranks of the other two hosts"
  for host in $(cat "$(dirname "$hostfile")/hosts"); do
    [[ -z $(ip netns pids "$host") ]] ||
      { ps -o pid,args -p "$(ip netns pids "$host" | paste -sd,)"; fail "$label: processes left on $host"; }
  done
  local from recovered reference
  from=$(grep -o "resumed from step [0-9]*" "$dir/err" | tail -1 | grep -o '[0-9]*$')
  [[ -n $from ]] || fail "$label: no resume"
  recovered=$(grep -o '"w_l2":[-0-9.e+]*' "$dir/out" | tail -1 | cut -d: -f2)
  mkdir -p "$dir/ref"
  cp -r "$dir/ck/step-$(printf '%012d' "$from")" "$dir/ref/"
  mpirun -np 4 --oversubscribe --bind-to none "$trainer" "${train[@]}" --checkpoint-dir "$dir/ref" \
    >"$dir/ref.out" 2>"$dir/ref.err" || { tail "$dir/ref.err"; fail "$label: reference run"; }
  reference=$(grep -o '"w_l2":[-0-9.e+]*' "$dir/ref.out" | tail -1 | cut -d: -f2)
  echo "$label: resumed from step $from; recovered $recovered, reference $reference"
  [[ -n $recovered && $recovered == "$reference" ]] || fail "$label: differs from the reference"
}

run kill kill
"$cluster" heal "$lost"
run cut cut
grep -q "the launcher ended the job" "$work/cut/run/events.jsonl" ||
  echo "cut: (mpirun ended the job by itself this time)"
"$cluster" heal "$lost"
run freeze freeze
"$cluster" thaw "$lost"
grep -q '"fault_report":true' "$work/freeze/run/events.jsonl" ||
  fail "freeze: the watchdog wrote no fault report"

# A host that does not answer at launch: named in a failure at once, and the job runs without it.
"$cluster" cut "$name-h2"
mkdir -p "$work/unreachable"
timeout -k 10 120 "$launcher" -np 6 --hostfile "$hostfile" --max-restarts 1 \
  --run-dir "$work/unreachable/run" -- "$trainer" --steps 20 --batch-size 60 --json \
  --checkpoint-dir "$work/unreachable/ck" >"$work/unreachable/out" 2>"$work/unreachable/err" ||
  { tail -20 "$work/unreachable/err"; fail "unreachable host: unimsg-run exited with $?"; }
grep -q "\"event\":\"failure\".*\"lost_hosts\":\\[\"$name-h2\"\\].*unreachable" \
  "$work/unreachable/run/events.jsonl" || { cat "$work/unreachable/run/events.jsonl"; fail "unreachable host not named"; }
grep -q '"event":"done","restart":1,.*"world_size":4' "$work/unreachable/run/events.jsonl" ||
  fail "unreachable host: the job did not finish on the other 4 slots"
echo "PASS"
