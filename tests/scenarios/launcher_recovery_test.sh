#!/usr/bin/env bash
# unimsg-run end to end with train_linear: kill -9 one of 4 ranks; the job finishes on 3 ranks
# from the last checkpoint, with exactly the parameters of a reference run that resumes from that
# checkpoint on 3 ranks; events.jsonl tells the story. Then SIGSTOP, two failures in a row, a
# kill during a checkpoint write, and the exit statuses for spent restarts, --min-np, bad usage.
#   launcher_recovery_test.sh UNIMSG_RUN TRAINER
set -euo pipefail
launcher=$1
trainer=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export UNIMSG_FUSION_THRESHOLD=0  # bitwise-reproducible reductions (docs/architecture.md)
# 2 ms per step so that a fault lands mid-run; checkpoints every 10 steps.
train=(--steps 50 --batch-size 60 --step-ms 2 --checkpoint-every 10 --checkpoint-keep 10 --json)
fail() { echo "FAIL: $*"; exit 1; }

"$launcher" -np 4 --max-restarts 2 --checkpoint-dir "$work/ck" --run-dir "$work/run" \
  -x UNIMSG_FAULT_INJECT=rank:2,step:25,mode:kill -- "$trainer" "${train[@]}" \
  >"$work/out" 2>"$work/err" || { cat "$work/err"; fail "unimsg-run exited with $?"; }
events=$(grep -o '"event":"[a-z_]*"' "$work/run/events.jsonl" | cut -d'"' -f4 | paste -sd' ')
[[ $events == "launch failure rerank restart launch done" ]] || fail "events: $events"
grep -q '"event":"launch","restart":1,.*"world_size":3' "$work/run/events.jsonl" ||
  fail "the relaunch did not run on 3 ranks"
# mpirun ended the job before any watchdog could report: the launcher read mpirun's own word.
grep -q '"event":"failure".*"lost_ranks":\[2\].*"reason":"rank 2 on [^ ]*: signal 9' \
  "$work/run/events.jsonl" || { cat "$work/run/events.jsonl"; fail "the killed rank 2 not named"; }
grep -q "resumed from step 20" "$work/err" || fail "did not resume from step 20"
recovered=$(grep -o '"w_l2":[-0-9.e+]*' "$work/out" | tail -1 | cut -d: -f2)

# The reference: the same checkpoint (step 20), resumed on 3 ranks by plain mpirun.
mkdir -p "$work/ref"
cp -r "$work/ck/step-000000000020" "$work/ref/"
mpirun -np 3 --oversubscribe --bind-to none "$trainer" "${train[@]}" \
  --checkpoint-dir "$work/ref" >"$work/out" 2>"$work/err" || { cat "$work/err"; fail "reference run"; }
grep -q "resumed from step 20" "$work/err" || fail "the reference did not start from step 20"
reference=$(grep -o '"w_l2":[-0-9.e+]*' "$work/out" | tail -1 | cut -d: -f2)
echo "recovered $recovered, reference $reference"
[[ -n $recovered && $recovered == "$reference" ]] || fail "the recovered run differs from the reference"

# SIGSTOP one rank: the others' watchdogs notice within the heartbeat timeout, report the lost
# rank, and the same recovery follows (same checkpoint, same 3 ranks: the same parameters).
"$launcher" -np 4 --max-restarts 2 --heartbeat-timeout 3 --checkpoint-dir "$work/ckh" \
  --run-dir "$work/runh" -x UNIMSG_FAULT_INJECT=rank:1,step:25,mode:hang -- "$trainer" "${train[@]}" \
  >"$work/out" 2>"$work/err" || { cat "$work/err"; fail "hang: unimsg-run exited with $?"; }
grep -q '"lost_ranks":\[1\]' "$work/runh/events.jsonl" || { cat "$work/runh/events.jsonl"; fail "hang: rank 1 not reported lost"; }
grep -q '"fault_report":true' "$work/runh/events.jsonl" || fail "hang: no fault report read"
hung=$(grep -o '"w_l2":[-0-9.e+]*' "$work/out" | tail -1 | cut -d: -f2)
[[ $hung == "$reference" ]] || fail "hang: recovered $hung, reference $reference"

# Two failures in a row (4 -> 3 -> 2 ranks); then a kill of the checkpoint writer (rank 0) just
# after it queued a checkpoint: whatever was half written is never loaded.
"$launcher" -np 4 --max-restarts 2 --checkpoint-dir "$work/ck2" --run-dir "$work/run2" \
  -x "UNIMSG_FAULT_INJECT=rank:2,step:25,mode:kill;rank:0,step:35,mode:exit,restart:1" \
  -- "$trainer" "${train[@]}" >"$work/out" 2>"$work/err" || { cat "$work/err"; fail "two failures"; }
events=$(grep -o '"event":"[a-z_]*"' "$work/run2/events.jsonl" | cut -d'"' -f4 | paste -sd' ')
[[ $events == "launch failure rerank restart launch failure rerank restart launch done" ]] ||
  fail "two failures: events $events"
grep -q '"event":"launch","restart":2,.*"world_size":2' "$work/run2/events.jsonl" ||
  fail "two failures: the third launch did not run on 2 ranks"
grep -q "resumed from step 30" "$work/err" || fail "two failures: no resume from step 30"
"$launcher" -np 3 --max-restarts 1 --checkpoint-dir "$work/ckw" --run-dir "$work/runw" \
  -x UNIMSG_FAULT_INJECT=rank:0,step:31,mode:kill -- "$trainer" "${train[@]}" \
  >"$work/out" 2>"$work/err" || { cat "$work/err"; fail "kill during a checkpoint write"; }
grep -Eq "resumed from step (20|30)" "$work/err" || fail "kill during a write: bad resume"

# No restarts left: exit status 3. Too few ranks left for --min-np: exit status 4.
set +e
"$launcher" -np 3 --max-restarts 0 --run-dir "$work/run0" -x UNIMSG_FAULT_INJECT=rank:1,step:3,mode:exit \
  -- "$trainer" "${train[@]}" --checkpoint-dir "$work/ck0" >/dev/null 2>&1
status=$?
[[ $status == 3 ]] || fail "spent restarts gave exit status $status, not 3"
"$launcher" -np 3 --min-np 3 --run-dir "$work/run1" -x UNIMSG_FAULT_INJECT=rank:0,step:3,mode:kill \
  -- "$trainer" "${train[@]}" --checkpoint-dir "$work/ck1" >/dev/null 2>&1
status=$?
[[ $status == 4 ]] || fail "--min-np gave exit status $status, not 4"
grep -q '"event":"gave_up"' "$work/run1/events.jsonl" || fail "no gave_up event"
# Bad usage: exit status 2, with a message.
for bad in "-np 0 -- true" "-np 2 -H a:x -- true" "-np 2 --no-such-flag -- true" "-np 2 -- ./missing"; do
  # shellcheck disable=SC2086
  "$launcher" $bad >/dev/null 2>"$work/msg"
  status=$?
  [[ $status == 2 && -s $work/msg ]] || fail "'$bad' gave exit status $status"
done
echo "PASS"
