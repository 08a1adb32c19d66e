#!/usr/bin/env bash
# Node loss for real: 3 namespace hosts x 2 ranks of train_linear under unimsg-run, and one host
# lost three ways while it trains — killed (its processes, daemon and disk), cut off (its link
# down), frozen (every process stopped). Each time unimsg-run must name that host, drop exactly
# it, relaunch on the other two, and finish with bitwise the parameters of a reference resumed
# from the same checkpoint on 4 ranks; nothing of the job may be left running on any host. Then a
# hostfile naming a host that does not answer: a clear failure naming it, and a run without it.
# With `slurm`, the same three losses under Slurm: a slurmd per host, unimsg-run in an allocation
# (salloc --no-kill) launching with srun; the lost node must leave the node list of the relaunch.
#   cluster_recovery_test.sh CLUSTER UNIMSG_RUN TRAINER [mpirun|slurm]
# Exit status 77 (a skip, saying why) where namespaces cannot be made (not root) or, for slurm,
# Slurm is not installed: cluster_lib.sh.
set -euo pipefail
cluster=$1
launcher=$2
trainer=$3
mode=${4:-mpirun}
source "$(dirname "$0")/cluster_lib.sh"
if [[ $mode == slurm ]]; then
  cluster_up "$cluster" 3 --slurm
  # The allocation outlives a lost node (--no-kill); unimsg-run finds it and launches with srun.
  launch=(salloc --no-kill --quiet -n 6 "$launcher" -np 6)
else
  cluster_up "$cluster" 3
  launch=("$launcher" -np 6 --hostfile "$hostfile")
fi
lost=$name-h1
echo "cluster $name: $(paste -sd' ' "$(dirname "$hostfile")/hosts")"

export UNIMSG_FUSION_THRESHOLD=0  # bitwise-reproducible reductions (docs/architecture.md)
train=(--steps 120 --batch-size 60 --step-ms 20 --checkpoint-every 10 --checkpoint-keep 20 --json)

# Nothing of the job may stay on any host: a cut-off host's ranks end by themselves within two
# heartbeat timeouts of the cut (docs/cluster.md), the others with the job. (Under Slurm a node's
# daemons stay: slurmd, and on a node cut off the step's slurmstepd, which ends once it reaches the
# controller again.)
no_job_left() {
  local label=$1 host left round
  for host in $(cat "$(dirname "$hostfile")/hosts"); do
    for round in $(seq 60); do
      left=$(ip netns pids "$host" | paste -sd,)
      [[ -z $left ]] || left=$(ps -o pid=,comm= -p "$left" | grep -vE ' (slurmd|slurmstepd)$' || true)
      [[ -n $left ]] || break
      sleep 0.5
    done
    [[ -z $left ]] || { echo "$left"; fail "$label: processes left on $host 30 s after the job"; }
  done
}

declare -A references  # checkpoint and command -> the reference's final parameters

# Runs the job under unimsg-run in the background, applies FAULT to host LOST once rank 0 has
# passed step 25, and checks the recovery. `run NAME FAULT LOST [trainer options]`.
run() {
  local label=$1 fault=$2 lost=$3
  shift 3
  local dir=$work/$label
  mkdir -p "$dir"
  local started=$SECONDS
  "${launch[@]}" --max-restarts 2 --heartbeat-timeout 4 \
    --teardown-grace 8 --checkpoint-dir "$dir/ck" --run-dir "$dir/run" \
    -- "$trainer" "${train[@]}" "$@" >"$dir/out" 2>"$dir/err" &
  local job=$!
  local reached=0
  for _ in $(seq 1200); do
    grep -Eq '"step":(2[5-9]|[3-9][0-9])[,}]' "$dir/out" 2>/dev/null && { reached=1; break; }
    kill -0 $job 2>/dev/null || break
    sleep 0.1
  done
  ((reached)) || { kill $job 2>/dev/null; tail -20 "$dir/err"; fail "$label: the job never reached step 25"; }
  fault_step=$(grep -Eo '"step":[0-9]+' "$dir/out" | tail -1 | cut -d: -f2 || true)
  "$cluster" "$fault" "$lost"
  echo "$label: $fault $lost at step ${fault_step:-?} or just after"
  local status=0
  wait $job || status=$?
  ((status == 0)) ||
    { tail -30 "$dir/err"; cat "$dir/run/events.jsonl"; fail "$label: unimsg-run exited with $status"; }
  echo "$label: recovered in $((SECONDS - started)) s"
  local events
  events=$(grep -o '"event":"[a-z_]*"' "$dir/run/events.jsonl" | cut -d'"' -f4 | paste -sd' ')
  [[ $events == "launch failure rerank restart launch done" ]] ||
    { cat "$dir/run/events.jsonl"; grep -v '"loss"' "$dir/err" | head -60; fail "$label: events $events"; }
  grep -q "\"event\":\"failure\".*\"lost_hosts\":\\[\"$lost\"\\]" "$dir/run/events.jsonl" ||
    { cat "$dir/run/events.jsonl"; fail "$label: $lost not named the lost host"; }
  local relaunch
  relaunch=$(grep '"event":"launch",.*"restart":1,.*"world_size":4' "$dir/run/events.jsonl") ||
    fail "$label: the relaunch did not run on the 4 ranks of the other two hosts"
  [[ $relaunch == *'"hosts":['* && $relaunch != *"\"$lost\""* ]] ||
    fail "$label: the relaunch's hosts include $lost: $relaunch"
  # (Under Slurm a frozen node's processes are out of the launcher's reach until thawed.)
  [[ $mode == slurm && $fault == freeze ]] || no_job_left "$label"
  local from recovered reference
  from=$(grep -o "resumed from step [0-9]*" "$dir/err" | tail -1 | grep -o '[0-9]*$')
  [[ -n $from ]] || fail "$label: no resume"
  recovered=$(grep -o '"w_l2":[-0-9.e+]*' "$dir/out" | tail -1 | cut -d: -f2)
  mkdir -p "$dir/ref"
  local saved
  saved=$(ls -d "$dir/ck/step-$(printf '%012d' "$from")" "$disks"/*/fast/step-"$(printf '%012d' "$from")" 2>/dev/null | head -1 || true)
  [[ -n $saved ]] || fail "$label: no checkpoint of step $from anywhere"
  cp -r "$saved" "$dir/ref/"
  echo "$label: the checkpoint of step $from was ${saved#$work/}"
  # One reference per checkpoint (its bytes) and command: faults resumed from the same one share it.
  local key
  key=$( (cd "$saved" && find . -type f | sort | xargs cat; echo "${train[*]}") | sha256sum | cut -c1-16)
  if [[ -z ${references[$key]:-} ]]; then
    mpirun -np 4 --oversubscribe --bind-to none "$trainer" "${train[@]}" --checkpoint-dir "$dir/ref" \
      >"$dir/ref.out" 2>"$dir/ref.err" || { tail "$dir/ref.err"; fail "$label: reference run"; }
    references[$key]=$(grep -o '"w_l2":[-0-9.e+]*' "$dir/ref.out" | tail -1 | cut -d: -f2)
  fi
  reference=${references[$key]}
  echo "$label: resumed from step $from; recovered $recovered, reference $reference"
  [[ -n $recovered && $recovered == "$reference" ]] || fail "$label: differs from the reference"
}

run kill kill "$lost"
"$cluster" heal "$lost"
run cut cut "$lost"
grep -q "the launcher ended the job" "$work/cut/run/events.jsonl" ||
  echo "cut: ($mode ended the job by itself this time)"
"$cluster" heal "$lost"
run freeze freeze "$lost"
"$cluster" thaw "$lost"
[[ $mode != slurm ]] || no_job_left "freeze (thawed)"
grep -q '"fault_report":true' "$work/freeze/run/events.jsonl" ||
  fail "freeze: the watchdog wrote no fault report"
if [[ $mode == slurm ]]; then
  grep -q '^srun: ' "$work/kill/err" || fail "slurm: the job was not launched with srun"
  echo "PASS"
  exit 0
fi

# Rank 0's host killed, with its node-local fast tier (every 2 steps) gone with its disk, and no
# persistent checkpoint yet (every 1000 steps): the relaunch resumes from the replica its buddy
# on the next host wrote, losing at most the fast interval.
run buddy kill "$name-h0" --fast-dir "$local_dir/fast" --fast-every 2 --checkpoint-every 1000 \
  --checkpoint-keep 100
from=$(grep -o "resumed from step [0-9]*" "$work/buddy/err" | tail -1 | grep -o '[0-9]*$')
[[ ! -e $disks/$name-h0 ]] || fail "buddy: the killed host's disk is still there"
ls -d "$disks/$name-h1/fast/step-$(printf '%012d' "$from")" >/dev/null ||
  fail "buddy: step $from is not in the buddy's replica"
[[ -z $(ls "$work/buddy/ck" 2>/dev/null | grep step- || true) ]] ||
  fail "buddy: a persistent checkpoint was written"
# (A save still being written when the host died may be lost too: 2 intervals at most.)
((from >= fault_step - 4)) || fail "buddy: resumed from step $from, the fault was at $fault_step"
"$cluster" heal "$name-h0"

# A host that does not answer at launch: named in a failure at once, and the job runs without it.
"$cluster" cut "$name-h2"
mkdir -p "$work/unreachable"
timeout -k 10 120 "$launcher" -np 6 --hostfile "$hostfile" --max-restarts 1 \
  --run-dir "$work/unreachable/run" -- "$trainer" --steps 20 --batch-size 60 --json \
  --checkpoint-dir "$work/unreachable/ck" >"$work/unreachable/out" 2>"$work/unreachable/err" ||
  { status=$?; tail -20 "$work/unreachable/err"; fail "unreachable host: unimsg-run exited with $status"; }
grep -q "\"event\":\"failure\".*\"lost_hosts\":\\[\"$name-h2\"\\].*unreachable" \
  "$work/unreachable/run/events.jsonl" || { cat "$work/unreachable/run/events.jsonl"; fail "unreachable host not named"; }
grep -q '"event":"done","restart":1,.*"world_size":4' "$work/unreachable/run/events.jsonl" ||
  fail "unreachable host: the job did not finish on the other 4 slots"
echo "PASS"
