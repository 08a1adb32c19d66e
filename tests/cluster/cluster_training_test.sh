#!/usr/bin/env bash
# The main job across hosts: the allreduce and bus benchmarks across 3 namespace hosts, briefly
# (smoke runs; docs/benchmarks.md has the figures), then train_fashion_mnist on 3 hosts x 2 ranks
# under unimsg-run (a quarter epoch) with a host killed mid-run: ranks on every host, that host
# dropped, resumed from a checkpoint, and the model still learns (0.70).
#   cluster_training_test.sh CLUSTER UNIMSG_RUN TRAINER BENCH_ALLREDUCE BENCH_BUS
# Exit status 77 (a skip, saying why) where namespaces cannot be made (not root): cluster_lib.sh.
set -euo pipefail
cluster=$1
launcher=$2
trainer=$3
bench_allreduce=$4
bench_bus=$5
source "$(dirname "$0")/cluster_lib.sh"
cluster_up "$cluster" 3

mpirun -np 6 --hostfile "$hostfile" "$bench_allreduce" -b 4K -e 1M -f 16 -n 3 -w 1 -c 1 \
  --backend mpi,shm,engine --compress none,onebit --json >"$work/allreduce" 2>"$work/err" ||
  { tail "$work/err"; fail "unimsg-bench-allreduce across hosts"; }
grep -q '"busbw' "$work/allreduce" || fail "no allreduce figures"
# (shm: shared memory within each host, each local rank's slice across hosts; -c 1 fails on a
# wrong element.)
grep -q '"backend":"shm"' "$work/allreduce" || fail "no shared-memory/across-hosts rows"
mpirun -np 2 --host "$name-h0,$name-h2" "$bench_bus" --quick --json >"$work/bus" 2>"$work/err" ||
  { tail "$work/err"; fail "unimsg-bench-bus across hosts"; }
[[ -s $work/bus ]] || fail "no bus figures"

# A host killed while the main job trains (checkpoints every 10 of its ~62 steps).
"$launcher" -np 6 --hostfile "$hostfile" --max-restarts 1 --run-dir "$work/kill" \
  --checkpoint-dir "$work/ck" -- "$trainer" --epochs 1 --limit 15000 --test-limit 2000 \
  --batch-size 240 --checkpoint-every 10 --min-accuracy 0.70 --json >"$work/out" 2>"$work/err" &
job=$!
reached=0
for _ in $(seq 1800); do
  step=$(grep -o "\"step\":[0-9]*" "$work/kill/status.json" 2>/dev/null | head -1 | cut -d: -f2 || true)
  [[ -n $step ]] && ((step >= 20)) && { reached=1; break; }
  kill -0 $job 2>/dev/null || break
  sleep 0.1
done
((reached)) || { kill $job 2>/dev/null; tail -20 "$work/err"; fail "the job never reached step 20"; }
"$cluster" kill "$name-h1"
echo "killed $name-h1 at step ${step:-?}"
status=0
wait $job || status=$?
((status == 0)) || { tail -30 "$work/err"; fail "training with a host killed: unimsg-run exited with $status"; }
grep -q "\"event\":\"failure\".*\"lost_hosts\":\\[\"$name-h1\"\\]" "$work/kill/events.jsonl" ||
  { cat "$work/kill/events.jsonl"; fail "the killed host was not named"; }
grep -q '"event":"done","restart":1,.*"world_size":4' "$work/kill/events.jsonl" ||
  { cat "$work/kill/events.jsonl"; fail "did not finish on the other two hosts"; }
grep -q "resumed from step" "$work/err" || fail "the relaunch did not resume from a checkpoint"
grep -o '"test_accuracy":[0-9.]*' "$work/out" | tail -1
# The first launch ran two ranks on each host (rank 0's board names each rank's host).
for k in 0 1 2; do
  grep -q "\"host\":\"$name-h$k\"" "$work/kill/metrics.jsonl" ||
    fail "no rank reported from $name-h$k"
done
echo "PASS"
