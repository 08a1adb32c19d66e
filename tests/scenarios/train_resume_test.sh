#!/usr/bin/env bash
# Resume from a checkpoint: an interrupted run continued from its checkpoint ends with exactly the
# parameters of an uninterrupted run (3 ranks), and continuing on 2 ranks stays within rounding.
#   train_resume_test.sh TRAINER MPIEXEC [mpirun flags...]
set -euo pipefail
trainer=$1
mpiexec=$2
shift 2
flags=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Fusion decides by timing which buckets travel together, and MPI picks its reduction order by
# size: only without fusion are runs bitwise reproducible.
export UNIMSG_FUSION_THRESHOLD=0
common=(--limit 3000 --test-limit 500 --batch-size 60 --epochs 2 --json)

run() {  # run RANKS ARGS... -> prints params_l2 of the final line
  local ranks=$1
  shift
  "$mpiexec" -np "$ranks" "${flags[@]}" "$trainer" "${common[@]}" "$@" >"$work/out" 2>"$work/err" ||
    { cat "$work/err" >&2; exit 1; }
  grep -o '"params_l2":[-0-9.e+]*' "$work/out" | tail -1 | cut -d: -f2
}

whole=$(run 3 --max-steps 70)
grep -q '"test_samples":500' "$work/out" || { echo "FAIL: --test-limit 500 not applied"; exit 1; }
first=$(run 3 --max-steps 40 --checkpoint-dir "$work/ck" --checkpoint-every 20)
ls "$work/ck" | grep -q step-000000000040 || { echo "no checkpoint at step 40"; exit 1; }
resumed=$(run 3 --max-steps 70 --checkpoint-dir "$work/ck" --resume)
resized=$(run 2 --max-steps 70 --checkpoint-dir "$work/ck" --resume)
echo "uninterrupted $whole, first part $first, resumed on 3 ranks $resumed, on 2 ranks $resized"
[[ $whole != "$first" ]] || { echo "FAIL: the first part did not stop early"; exit 1; }
[[ $whole == "$resumed" ]] || { echo "FAIL: resumed run differs from the uninterrupted one"; exit 1; }
awk -v a="$whole" -v b="$resized" 'BEGIN { d = (a - b) / a; if (d < 0) d = -d;
  if (d > 1e-4) { print "FAIL: 2-rank resume is off by " d; exit 1 } }'

# A damaged newest checkpoint is skipped: the run resumes from the one before.
run 3 --max-steps 60 --checkpoint-dir "$work/ck2" --checkpoint-every 20 >/dev/null
printf 'garbage' >"$work/ck2/step-000000000060/0.blob"
"$mpiexec" -np 3 "${flags[@]}" "$trainer" "${common[@]}" --max-steps 70 \
  --checkpoint-dir "$work/ck2" --resume >"$work/out" 2>"$work/err"
grep -q "skipped a damaged checkpoint" "$work/err" || { echo "FAIL: no warning"; exit 1; }
grep -q "resumed from step 40" "$work/err" || { cat "$work/err"; echo "FAIL: not resumed from 40"; exit 1; }
echo "PASS"
