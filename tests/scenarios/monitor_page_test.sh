#!/usr/bin/env bash
# The monitor end to end, as a user sees it: unimsg-run launches train_linear on 3 ranks under a
# pseudo-terminal (script) with the metrics port set; rank 2 is killed at step 30, and the
# survivors are relaunched on 2 ranks, of which rank 1 is slowed into a straggler. While the
# second launch trains, headless Chromium loads the live page and must show every rank, the
# straggler, the failure and the re-rank, and /metrics must carry every rank's series. The
# launcher must have drawn its progress line on the terminal. A second, short run without a
# terminal must print plain progress lines.
#
#   monitor_page_test.sh UNIMSG_RUN TRAIN_LINEAR [SCREENSHOT.png]
set -euo pipefail
run=$1
train=$2
screenshot=${3:-}

browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $browser ]]; then
  echo "FAIL: no chromium (scripts/setup.sh installs Debian's chromium for the tests)"
  exit 1
fi
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; echo "--- job output"; tr -d '\r' < "$work/job.txt" | tail -40 || true; exit 1; }

port=""
for _ in $(seq 20); do
  candidate=$((20000 + RANDOM % 30000))
  if ! curl -s -o /dev/null "http://127.0.0.1:$candidate/"; then port=$candidate; break; fi
done
[[ -n $port ]] || fail "no free port found"

# Launch 1: rank 2 dies at step 30. Launch 2 (2 ranks): ~370 steps of at least 15 ms, rank 1
# 30 ms slower from step 20 (3x the other's compute, over the 1.5x straggler factor): ~17 s of
# training, several times what the page checks below take.
script -qfec "$run -np 3 --run-dir $work/run -x UNIMSG_METRICS_PORT=$port \
  -x UNIMSG_METRICS_ADDRESS=127.0.0.1 -x UNIMSG_STRAGGLER_STEPS=10 \
  -x 'UNIMSG_FAULT_INJECT=rank:2,step:30,mode:kill;rank:1,step:20,mode:slow,ms:30,restart:1' \
  -- $train --steps 400 --step-ms 15" /dev/null > "$work/job.txt" 2>&1 &
job=$!

# The page is up once rank 0's monitor listens; then wait for the second launch, every rank's
# reports and heartbeats, and the straggler verdict.
ready=""
for _ in $(seq 240); do
  if status=$(curl -sf "http://127.0.0.1:$port/api/status") &&
     grep -q '"restart":1' <<< "$status" &&
     [[ $(grep -o '"reported":true' <<< "$status" | wc -l) -eq 2 ]] &&
     [[ $(grep -o '"heartbeat_age_seconds":[0-9]' <<< "$status" | wc -l) -eq 2 ]] &&
     grep -q '"straggler":true' <<< "$status"; then
    ready=yes
    break
  fi
  kill -0 $job 2>/dev/null || fail "the job ended before the page showed every rank"
  sleep 0.5
done
[[ -n $ready ]] || fail "after 120 s, /api/status still lacks a rank or the straggler: $status"

metrics=$(curl -sf "http://127.0.0.1:$port/metrics") || fail "no /metrics"
grep -q '^unimsg_world_size 2$' <<< "$metrics" || fail "unimsg_world_size is not 2"
grep -q '^unimsg_restarts_total 1$' <<< "$metrics" || fail "unimsg_restarts_total is not 1"
for rank in 0 1; do
  for series in unimsg_step unimsg_samples_per_second unimsg_allreduce_bytes_total \
                unimsg_step_seconds unimsg_heartbeat_age_seconds; do
    grep -q "^$series{rank=\"$rank\"} [0-9]" <<< "$metrics" || fail "no $series for rank $rank"
  done
done
grep -q '^unimsg_straggler{rank="1"} 1$' <<< "$metrics" || fail "rank 1 not a straggler in /metrics"

# The page, rendered by a real browser: its script must have fetched the status and drawn a row
# per rank, rank 1's marked, and listed the failure and the re-rank of the first launch.
"$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
  --virtual-time-budget=5000 --dump-dom "http://127.0.0.1:$port/" > "$work/dom.html" 2> /dev/null ||
  fail "chromium could not load the page"
grep -q 'data-state="live"' "$work/dom.html" || fail "the page never got a status from rank 0"
for rank in 0 1; do
  grep -q "<tr data-rank=\"$rank\"" "$work/dom.html" || fail "rank $rank is not on the page"
done
grep -q '<tr data-rank="2"' "$work/dom.html" && fail "the lost rank 2 is still on the page"
grep -q '<li data-kind="failure">' "$work/dom.html" || fail "the failure is not listed"
grep -q '<li data-kind="rerank">.*re-ranked from 3 to 2 rank(s)' "$work/dom.html" ||
  fail "the re-rank is not listed"
grep -q '<tr data-rank="1" class="straggler"' "$work/dom.html" ||
  fail "rank 1 is not marked as a straggler on the page"
grep -q 'is a straggler' "$work/dom.html" || fail "the straggler event is not listed"
if [[ -n $screenshot ]]; then
  "$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
    --window-size=1280,860 --virtual-time-budget=5000 --screenshot="$screenshot" \
    "http://127.0.0.1:$port/" > /dev/null 2>&1 || fail "no screenshot"
fi

wait $job || fail "the job failed (status $?)"
# On the terminal: the progress line, redrawn in place ("\r" + erase line).
grep -q $'\r\033\[Kstep [0-9]*/400 ([0-9.]*%) | [0-9]* samples/s | ETA' "$work/job.txt" ||
  fail "no progress line on the terminal"
grep -q '"kind":"straggler","rank":1' "$work/run/metrics.jsonl" ||
  fail "metrics.jsonl has no straggler event for rank 1"
[[ $(grep '"final":true' "$work/run/metrics.jsonl" | grep -c '"type":"report"') -eq 2 ]] ||
  fail "metrics.jsonl lacks a final report per rank of the last launch"
[[ $(grep -c '"type":"start"' "$work/run/metrics.jsonl") -eq 2 ]] ||
  fail "metrics.jsonl does not show two launches"

# Not a terminal: plain lines.
"$run" -np 2 --run-dir "$work/run2" --progress-interval 1 -- "$train" --steps 150 \
  --step-ms 20 > "$work/plain.txt" 2>&1 || fail "the plain run failed"
grep -q '\[unimsg-run\] step [0-9]*/150 ([0-9.]*%) | [0-9]* samples/s' "$work/plain.txt" ||
  { cat "$work/plain.txt"; fail "no plain progress line"; }
grep -q $'\r' "$work/plain.txt" && fail "carriage returns in plain output"
echo "PASS: page with every rank, the straggler, the failure and the re-rank; /metrics;" \
  "progress line (terminal and plain)"
