#!/usr/bin/env bash
# The Python example under unimsg-run: one of 4 ranks killed at step 25; unimsg-run re-ranks the
# survivors, the relaunched job resumes from the checkpoint of step 20 (unimsg.torch.Checkpoints,
# the launcher's restart count) and finishes on 3 ranks; the monitor's metrics.jsonl has it all.
#   python_recovery_test.sh UNIMSG_RUN PYTHON EXAMPLE
set -euo pipefail
launcher=$1
python=$2
example=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$launcher" -np 4 --max-restarts 1 --checkpoint-dir "$work/ck" --run-dir "$work/run" \
  -x UNIMSG_FAULT_INJECT=rank:1,step:25,mode:kill -- "$python" "$example" \
  --epochs 1 --limit 12000 --test-limit 1000 --batch-size 240 --checkpoint-every 10 --json \
  >"$work/out" 2>"$work/err" || { status=$?; tail -40 "$work/err"; fail "unimsg-run exited with $status"; }
events=$(grep -o '"event":"[a-z_]*"' "$work/run/events.jsonl" | cut -d'"' -f4 | paste -sd' ')
[[ $events == "launch failure rerank restart launch done" ]] || fail "events: $events"
grep -q '"event":"launch","restart":1,.*"world_size":3' "$work/run/events.jsonl" ||
  fail "the relaunch did not run on 3 ranks"
grep -q '"lost_ranks":\[1\]' "$work/run/events.jsonl" || fail "the killed rank 1 not named"
grep -q "resumed from the checkpoint of step 20 (launch 1, 3 ranks)" "$work/out" ||
  { cat "$work/out"; fail "did not resume from step 20 on 3 ranks"; }
grep -q '"ranks": 3, "compress": "none", "steps": 50' "$work/out" ||
  { cat "$work/out"; fail "the relaunched job did not finish the 50 steps"; }
# The monitor heard the Python job (unimsg.torch.Monitor.step): reports of both launches, up to
# the last step, and each launch's final report per rank.
grep '"type":"report"' "$work/run/metrics.jsonl" | grep -q '"step":50,' ||
  fail "metrics.jsonl has no report of step 50"
[[ $(grep -c '"type":"start"' "$work/run/metrics.jsonl") -eq 2 ]] ||
  fail "metrics.jsonl does not show both launches"
echo "PASS: killed rank 1 at step 25; resumed from step 20 on 3 ranks; finished; monitored"
