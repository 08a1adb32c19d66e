#!/usr/bin/env bash
# A rank of unimsg-fetch frozen (SIGSTOP, through UNIMSG_FAULT_INJECT mode:hang) in the middle of
# a download, under plain mpirun on 3 ranks: the other ranks' heartbeat watchdogs notice, and the
# run ends with a non-zero status and a message naming the lost rank well within 120 s, instead
# of waiting for ever in drain(). Whatever happens, leftover processes are thawed and killed.
#   fetch_hang_test.sh UNIMSG_FETCH HTTP_SERVE MPIEXEC [mpirun flags...]
set -euo pipefail
fetch=$1
serve=$2
mpiexec=$3
shift 3
flags=("$@")
work=$(mktemp -d)
server=
cleanup() {
  # Only this test's processes: their command lines name its private directory.
  for pid in $(pgrep -f -- "$work/cache" || true); do
    kill -CONT "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  tail -20 "$work/out" "$work/err" 2>/dev/null || true
  exit 1
}

files=6
mkdir "$work/www"
for i in $(seq 1 $files); do head -c 4000000 /dev/urandom >"$work/www/file$i"; done
"$serve" "$work/www" >"$work/port" &
server=$!
for _ in $(seq 1 100); do [ -s "$work/port" ] && break; sleep 0.05; done
port=$(cat "$work/port")
[ -n "$port" ] || fail "the test server did not start"
{
  echo '{"files":['
  for i in $(seq 1 $files); do
    sha=$(sha256sum "$work/www/file$i" | cut -d' ' -f1)
    echo "{\"name\":\"file$i\",\"url\":\"http://127.0.0.1:$port/file$i\",\"sha256\":\"$sha\"}$([ "$i" -lt $files ] && echo ,)"
  done
  echo ']}'
} >"$work/manifest.json"

# 1 MiB/s per transfer: rank 1's 3rd progress report (0.75 s into its first file) falls
# mid-download, and it stops there, holding its task's lease.
bound=120
start=$SECONDS
set +e
timeout -k 10 $bound "$mpiexec" -np 3 "${flags[@]}" -x UNIMSG_FAULT_INJECT=rank:1,step:3,mode:hang \
  -x UNIMSG_HEARTBEAT_TIMEOUT=5 "$fetch" --manifest "$work/manifest.json" --cache "$work/cache" \
  --workers 1 --max-rate 1M --json >"$work/out" 2>"$work/err"
status=$?
set -e
elapsed=$((SECONDS - start))
echo "exit status $status after $elapsed s"
[ $status != 124 ] && [ $status != 137 ] || fail "the run did not end within $bound s (a frozen rank hangs it)"
[ $status != 0 ] || fail "a run with a frozen rank must not succeed"
grep -q 'stopping this rank (SIGSTOP)' "$work/out" "$work/err" || fail "rank 1 was never stopped"
grep -q 'lost rank(s) \[1\]' "$work/out" "$work/err" || fail "no message naming the frozen rank 1"
echo PASS
