#!/usr/bin/env bash
# unimsg-run under hostile conditions (issue 22): secrets passed without showing their values,
# a damaged fault report, its reader gone (| head -1), output without newlines, a fault reason
# that is not UTF-8, two jobs in one run dir, and one Ctrl-C reaching mpirun once. Each section
# reports its own failure; PASS only when all pass.
#   launcher_hardening_test.sh UNIMSG_RUN TRAINER
set -uo pipefail
launcher=$1
trainer=$2
work=$(mktemp -d)
cleanup() {
  # Jobs a failed section may have left behind (each wrote its pid): ours only, by pid.
  for pidfile in "$work"/*.pid; do
    [[ -e $pidfile ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
# Waits up to $2 seconds for file $1.
wait_for() {
  local i
  for ((i = 0; i < $2 * 10; ++i)); do [[ -e $1 ]] && return 0; sleep 0.1; done
  return 1
}
events_of() { grep -o '"event":"[a-z_]*"' "$1/events.jsonl" | cut -d'"' -f4 | paste -sd' '; }

# Secrets: values of -x and UNIMSG_* reach the ranks through mpirun's environment, never its
# command line (visible in ps on every host) nor the dry run's output.
secrets() {
  local out
  out=$(UNIMSG_API_TOKEN=tok-hunter2 "$launcher" -np 2 --dry-run -x DB_PASSWORD=pw-s3cr3t \
    -- "$trainer" 2>&1) || fail "secrets: dry run exited with $?"
  grep -Eq 'hunter2|s3cr3t' <<<"$out" && fail "secrets: the dry run shows a value: $out"
  grep -q 'DB_PASSWORD' <<<"$out" || fail "secrets: the dry run does not name DB_PASSWORD: $out"
  # The job's parent is mpirun: its command line must hold no value, its ranks every value.
  UNIMSG_API_TOKEN=tok-hunter2 timeout 120 "$launcher" -np 1 --run-dir "$work/run-secrets" \
    -x DB_PASSWORD=pw-s3cr3t -- bash -c \
    'tr "\0" " " </proc/$PPID/cmdline >"$0/cmdline"; echo "$DB_PASSWORD $UNIMSG_API_TOKEN" >"$0/env"' \
    "$work" >/dev/null 2>&1 || fail "secrets: the job exited with $?"
  grep -Eq 'hunter2|s3cr3t' "$work/cmdline" && fail "secrets: mpirun's argv: $(cat "$work/cmdline")"
  [[ $(cat "$work/env" 2>/dev/null) == "pw-s3cr3t tok-hunter2" ]] ||
    fail "secrets: the rank did not get the values: $(cat "$work/env" 2>/dev/null)"
}

# A damaged fault report (a full disk, a crash mid-write) is no report: the launcher relaunches.
damaged_report() {
  local status
  timeout 120 "$launcher" -np 2 --max-restarts 1 --run-dir "$work/run-damaged" -- bash -c \
    '[[ $UNIMSG_RESTART_COUNT == 0 ]] || exit 0; printf "\x00{garbage" >"$UNIMSG_RUN_DIR/fault-report.json"; exit 75' \
    >/dev/null 2>"$work/damaged.err"
  status=$?
  [[ $status == 0 ]] || fail "damaged report: exit status $status: $(tail -3 "$work/damaged.err")"
  local events
  events=$(events_of "$work/run-damaged")
  [[ $events == "launch failure rerank restart launch done" ]] || fail "damaged report: events $events"
}

# Its reader gone (| head -1): the launcher keeps supervising; the job completes.
reader_gone() {
  local statuses
  timeout 300 "$launcher" -np 2 --run-dir "$work/run-pipe" -- "$trainer" --steps 40 --json \
    --checkpoint-dir "$work/ck-pipe" 2>/dev/null | head -1 >/dev/null
  statuses="${PIPESTATUS[0]}"
  [[ $statuses == 0 ]] || fail "reader gone: unimsg-run exited with $statuses"
  local events
  events=$(events_of "$work/run-pipe")
  [[ $events == "launch done" ]] || fail "reader gone: events $events"
}

# Output without a newline (a '\r' progress bar) is shown while the job runs, not held back.
no_newline() {
  timeout 120 "$launcher" -np 1 --progress off --run-dir "$work/run-cr" -- bash -c \
    'echo $$ >"$0/cr.pid"; for i in $(seq 1200); do printf "tick %d\r" $i; [[ -e $0/seen ]] && exit 0; sleep 0.05; done; exit 1' \
    "$work" >"$work/cr.out" 2>&1 &
  local job=$! i shown=""
  for ((i = 0; i < 600; ++i)); do
    if grep -q tick "$work/cr.out"; then shown=yes; break; fi
    sleep 0.1
  done
  touch "$work/seen"
  wait $job
  [[ -n $shown ]] || fail "no newline: nothing of the job's '\\r' lines shown in 60 s"
}

# A fault reason too long for an event, or not UTF-8 (mpirun's words on a dead rank are read from
# the job's output, any bytes): the event is still written, cut on a character, bytes replaced.
bad_reason() {
  local status
  timeout 120 "$launcher" -np 1 --max-restarts 0 --run-dir "$work/run-long" -- python3 -c '
import json, os, sys
reason = "x" * 4094 + "\u00e9\u00e9" + "y" * 100  # a 2-byte character across byte 4096
with open(os.environ["UNIMSG_RUN_DIR"] + "/fault-report.json", "w", encoding="utf-8") as out:
    json.dump({"lost_ranks": [0], "reason": reason}, out, ensure_ascii=False)
sys.exit(75)' >/dev/null 2>"$work/long.err"
  status=$?
  [[ $status == 3 ]] || fail "long reason: exit status $status (not 3): $(tail -c 300 "$work/long.err")"
  timeout 120 "$launcher" -np 1 --max-restarts 0 --run-dir "$work/run-bytes" -- bash -c \
    'printf "mpirun noticed that process rank 0 with PID 1 on node n\xff exited on signal 9 (K\xc3\xa9\xfe).\n"; exit 1' \
    >/dev/null 2>"$work/bytes.err"
  status=$?
  [[ $status == 3 ]] || fail "reason not UTF-8: exit status $status (not 3): $(tail -c 300 "$work/bytes.err")"
  python3 -c '
import json, sys
def failure(path):
    for line in open(path, encoding="utf-8"):  # strict: the file must be UTF-8
        event = json.loads(line)
        if event["event"] == "failure":
            return event["reason"]
    sys.exit("no failure event in " + path)
long = failure(sys.argv[1])
assert len(long.encode()) <= 4096 and long.startswith("x" * 4094), long[:20]
bytes_ = failure(sys.argv[2])
assert bytes_.startswith("rank 0 on n\ufffd: signal 9 (K\u00e9\ufffd)"), bytes_
' "$work/run-long/events.jsonl" "$work/run-bytes/events.jsonl" 2>&1 || fail "bad reason: events.jsonl"
}

# Two jobs in one run dir: the second is refused, naming the dir and --run-dir.
shared_run_dir() {
  timeout 120 "$launcher" -np 1 --run-dir "$work/run-shared" -- bash -c \
    'echo $$ >"$0/first.pid"; touch "$0/first"; for i in $(seq 1200); do [[ -e $0/release ]] && exit 0; sleep 0.05; done; exit 1' \
    "$work" >/dev/null 2>&1 &
  local first=$! status
  wait_for "$work/first" 60 || fail "shared run dir: the first job did not start"
  timeout 120 "$launcher" -np 1 --run-dir "$work/run-shared" -- true >/dev/null 2>"$work/second.err"
  status=$?
  touch "$work/release"
  wait $first || fail "shared run dir: the first job exited with $?"
  [[ $status == 2 ]] || fail "shared run dir: the second launch exited with $status, not 2"
  grep -q "run-shared.*--run-dir" "$work/second.err" ||
    fail "shared run dir: message: $(cat "$work/second.err")"
  [[ $(events_of "$work/run-shared") == "launch done" ]] ||
    fail "shared run dir: events $(events_of "$work/run-shared")"
}

# One SIGINT to the launcher's process group (Ctrl-C on a terminal) stops the job gracefully:
# the rank gets exactly one signal, and none is left running.
one_interrupt() {
  # (No timeout(1) here: it would pass the SIGINT on to the process group once more.)
  setsid "$launcher" -np 1 --run-dir "$work/run-int" -- bash -c '
    echo $$ >"$0/rank.pid"
    trap "echo INT >>$0/signals; stop=1" INT
    trap "echo TERM >>$0/signals; stop=1" TERM
    touch "$0/started"
    for i in $(seq 1200); do [[ -n ${stop:-} ]] && break; sleep 0.05; done
    exit 0' "$work" >/dev/null 2>&1 &
  local launcher_pid=$! i
  echo $launcher_pid >"$work/launcher.pid"
  wait_for "$work/started" 60 || fail "interrupt: the job did not start"
  # (setsid, not a process group leader here, made the launcher the leader of a new group.)
  kill -INT -- "-$launcher_pid"
  for ((i = 0; i < 1200; ++i)); do kill -0 $launcher_pid 2>/dev/null || break; sleep 0.1; done
  kill -0 $launcher_pid 2>/dev/null && fail "interrupt: the launcher still runs after 120 s"
  wait $launcher_pid
  for ((i = 0; i < 50; ++i)); do
    kill -0 "$(cat "$work/rank.pid")" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$(cat "$work/rank.pid")" 2>/dev/null && fail "interrupt: the rank is still running"
  local signals
  signals=$(paste -sd' ' "$work/signals" 2>/dev/null)
  [[ $signals == "TERM" || $signals == "INT" ]] ||
    fail "interrupt: the rank got '$signals', not exactly one signal"
  grep -q '"event":"gave_up".*"reason":"interrupted"' "$work/run-int/events.jsonl" ||
    fail "interrupt: no gave_up event"
}

sections=${SECTIONS:-"secrets damaged_report reader_gone no_newline bad_reason shared_run_dir one_interrupt"}
for section in $sections; do
  echo "--- $section"
  $section
done
[[ $failures == 0 ]] && echo "PASS"
