#!/usr/bin/env bash
# benchmarks/cluster_training.sh and plot_time_to_accuracy.py, briefly (docs/benchmarks.md has
# the full runs): two runs on 2 hosts x 1 rank at 1 Gbit/s, a few steps each, then the chart and
# the table: every epoch line carries its wall time and the bytes that left the hosts, the table
# has both runs and the PNG is a PNG.
#   cluster_time_to_accuracy_test.sh SOURCE_DIR BUILD_DIR
# Exit status 77 (a skip, saying why) where namespaces cannot be made (not root).
set -euo pipefail
source_dir=$1
build_dir=$2
fail() { echo "FAIL: $*"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
BUILD=$build_dir "$source_dir/benchmarks/cluster_training.sh" --hosts 2 --slots 1 \
  --compress none,fp16 1gbit -- --epochs 1 --limit 1536 --test-limit 400 --batch-size 128 \
  >"$work/runs" 2>"$work/err" || status=$?
if ((status == 77)); then  # (scripts/cluster cannot make namespaces here)
  echo "SKIP: this test needs namespace hosts: $(grep -m1 cluster: "$work/err")"
  exit 77
fi
((status == 0)) || { tail -20 "$work/err"; fail "cluster_training.sh exited with $status"; }
cat "$work/runs"
(($(grep -c '"epoch":1' "$work/runs") == 2)) || fail "not one epoch line per run"
grep -q '"run":"fp16".*"compress":"fp16' "$work/runs" || fail "the fp16 run was not compressed"
grep -q '"run":"none"' "$work/runs" || fail "no uncompressed run"
! grep -q '"host_bytes":null\|"host_bytes":0,' "$work/runs" || fail "no bytes counted on the links"
"$source_dir/benchmarks/plot_time_to_accuracy.py" "$work/runs" "$work/chart.png" --target 0.3 \
  >"$work/table" || fail "plot_time_to_accuracy.py failed"
cat "$work/table"
(($(grep -c '^| 2 hosts x 1, 1gbit' "$work/table") == 2)) || fail "the table lacks a run"
[[ $(head -c 8 "$work/chart.png" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]] ||
  fail "the chart is not a PNG"
# Bad input is named, not a traceback.
echo '{"hosts":"x"}' >"$work/bad"
! "$source_dir/benchmarks/plot_time_to_accuracy.py" "$work/bad" "$work/bad.png" 2>"$work/said" ||
  fail "a bad line was accepted"
grep -q "not a cluster_training.sh line" "$work/said" || fail "the bad line was not named"
echo "PASS"
