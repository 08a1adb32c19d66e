#!/usr/bin/env bash
# A rank of unimsg-fetch killed with SIGKILL in the middle of a download (UNIMSG_FAULT_INJECT,
# under unimsg-run): the job is relaunched on the survivors, the files finished before are found
# in the cache, the interrupted one resumes from its partial file, and in the end every file is
# in the cache once, verified, with nothing partial left.
#   fetch_kill_test.sh UNIMSG_RUN UNIMSG_FETCH HTTP_SERVE
set -euo pipefail
run=$1
fetch=$2
serve=$3
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; cat "$work/err" 2>/dev/null | tail -20; exit 1; }

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

# 1 MiB/s per transfer (after a first burst of ~2 MB): a file takes ~2.5 s, so rank 1's 3rd
# progress report (0.75 s into its first file) falls mid-download.
"$run" -np 3 --run-dir "$work/run" --max-restarts 2 \
  -x UNIMSG_FAULT_INJECT=rank:1,step:3,mode:kill -- \
  "$fetch" --manifest "$work/manifest.json" --cache "$work/cache" --workers 1 --max-rate 1M \
  --json >"$work/out" 2>"$work/err" || fail "unimsg-run exited with $?"

grep -q '"event":"failure"' "$work/run/events.jsonl" || fail "no failure recorded: $(cat "$work/run/events.jsonl")"
grep -q '"event":"restart"' "$work/run/events.jsonl" || fail "no restart recorded"
grep -q '"event":"done"' "$work/run/events.jsonl" || fail "the job did not finish"
for i in $(seq 1 $files); do
  sha=$(sha256sum "$work/www/file$i" | cut -d' ' -f1)
  [ -f "$work/cache/objects/$sha" ] || fail "file$i missing from the cache"
  [ "$(sha256sum "$work/cache/objects/$sha" | cut -d' ' -f1)" = "$sha" ] || fail "file$i corrupt"
done
[ "$(ls "$work/cache/objects" | wc -l)" = $files ] || fail "the cache holds other objects"
[ -z "$(ls -A "$work/cache/partial")" ] || fail "partial files left: $(ls "$work/cache/partial")"
# The last launch reports every file, none failed.
[ "$(grep -c '"status":"failed"' "$work/out" || true)" = 0 ] || fail "failures: $(cat "$work/out")"
[ "$(grep -c '"status":"\(downloaded\|cached\)"' "$work/out")" -ge $files ] || fail "not all reported: $(cat "$work/out")"
echo PASS
