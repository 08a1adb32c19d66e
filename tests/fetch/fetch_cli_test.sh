#!/usr/bin/env bash
# unimsg-fetch end to end: a manifest of file:// URLs fetched alone and then under mpirun on 3
# ranks (everything cached the second time), one bad checksum reported as failed with exit 1,
# a malformed manifest refused with exit 2.
#   fetch_cli_test.sh UNIMSG_FETCH MPIEXEC [mpirun flags...]
set -euo pipefail
fetch=$1
mpiexec=$2
shift 2
flags=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

for i in 1 2 3 4 5; do head -c $((100000 * i)) /dev/urandom >"$work/file$i"; done
{
  echo '{"files":['
  for i in 1 2 3 4 5; do
    sha=$(sha256sum "$work/file$i" | cut -d' ' -f1)
    echo "{\"name\":\"file$i\",\"url\":\"file://$work/file$i\",\"sha256\":\"$sha\",\"size\":$((100000 * i))}$([ $i -lt 5 ] && echo ,)"
  done
  echo ']}'
} >"$work/manifest.json"

"$fetch" --manifest "$work/manifest.json" --cache "$work/cache" --workers 2 --json >"$work/first" \
  2>"$work/first.err" || fail "first run: $(cat "$work/first.err")"
[ "$(grep -c '"status":"downloaded"' "$work/first")" = 5 ] || fail "first run: $(cat "$work/first")"
for i in 1 2 3 4 5; do
  sha=$(sha256sum "$work/file$i" | cut -d' ' -f1)
  cmp -s "$work/file$i" "$work/cache/objects/$sha" || fail "file$i differs in the cache"
done

"$mpiexec" -np 3 "${flags[@]}" "$fetch" --manifest "$work/manifest.json" --cache "$work/cache" \
  --json >"$work/second" 2>"$work/second.err" || fail "mpirun run: $(cat "$work/second.err")"
[ "$(grep -c '"status":"cached"' "$work/second")" = 5 ] || fail "second run: $(cat "$work/second")"

sed 's/"sha256":"[0-9a-f]*"\(,"size":100000\)/"sha256":"'"$(printf '0%.0s' {1..64})"'"\1/' \
  "$work/manifest.json" >"$work/bad-sha.json"
set +e
"$fetch" --manifest "$work/bad-sha.json" --cache "$work/cache2" --retries 1 --json \
  >"$work/third" 2>"$work/third.err"
status=$?
set -e
[ $status = 1 ] || fail "a failed file must exit 1, got $status"
grep -q '"name":"file1".*"status":"failed"\|"status":"failed".*"name":"file1"' "$work/third" ||
  fail "file1 not reported failed: $(cat "$work/third")"
grep -q 'checksum mismatch' "$work/third" || fail "no checksum error: $(cat "$work/third")"

echo '{"files":[{"name":"x","url":"ftp://nowhere/x","sha256":"abc"}]}' >"$work/malformed.json"
set +e
"$fetch" --manifest "$work/malformed.json" --cache "$work/cache3" 2>"$work/fourth.err"
status=$?
set -e
[ $status = 2 ] || fail "a malformed manifest must exit 2, got $status"
grep -q 'files\[0\]' "$work/fourth.err" || fail "the error must name the entry: $(cat "$work/fourth.err")"
echo PASS
