#!/usr/bin/env bash
# Time to accuracy across namespace hosts (issue 25, part 5): train_fashion_mnist once per
# compressor and link rate on a cluster from scripts/cluster, each epoch's line timestamped from
# the launch and with the bytes that left the hosts so far (their links' counters: gradients,
# headers, control and all). RATE `local` runs the same ranks on this machine with no cluster
# and no shaping (the baseline the slow links are measured against).
#   benchmarks/cluster_training.sh [--hosts 3] [--slots 2] [--compress LIST] RATE... [-- TRAINER ARGS]
#   e.g. benchmarks/cluster_training.sh --compress none,fp16,topk:0.01,powersgd:4,onebit+recipe \
#          local 1gbit 100mbit                          (root; run from the build's parent)
# LIST items are --compress specs; `+recipe` adds onebit's recipe (--compress-warmup with one
# epoch's steps at the run's --batch-size, --momentum-correction: one epoch uncompressed, then
# the velocity compressed). The global batch must split evenly: 240 for 6 ranks. Prints the
# trainer's JSON lines with "rate", "hosts", "slots", "run", "wall_s" and "host_bytes" added;
# benchmarks/plot_time_to_accuracy.py draws them.
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=3 slots=2 compress=none,fp16,topk:0.01,powersgd:4,onebit+recipe build=${BUILD:-build}
while [[ ${1:-} == --?* ]]; do
  case $1 in
    --hosts) hosts=$2 ;;
    --slots) slots=$2 ;;
    --compress) compress=$2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
rates=()
while (($#)) && [[ $1 != -- ]]; do rates+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
((${#rates[@]})) || { echo "usage: $0 [options] RATE... [-- TRAINER ARGS] (RATE: local, 1gbit, 100mbit)" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
ranks=$((hosts * slots))

# Bytes sent so far by every host of cluster $1 (its eth0's qdisc counter).
host_bytes() {
  local total=0 k sent
  for ((k = 0; k < hosts; k++)); do
    sent=$(ip netns exec "$1-h$k" tc -s qdisc show dev eth0 | awk '/Sent/ {print $2; exit}')
    total=$((total + ${sent:-0}))
  done
  echo $total
}

# One training run: the trainer's lines, each with the fields above.
train() {
  local rate=$1 run=$2 name=$3
  shift 3
  local spec=${run%+recipe} flags=(--compress "${run%+recipe}") batch=256 previous=""
  for arg in "$@"; do
    [[ $previous == --batch-size ]] && batch=$arg
    previous=$arg
  done
  [[ $run == *+recipe ]] && flags+=(--compress-warmup $(((60000 + batch - 1) / batch)) --momentum-correction)
  [[ $spec == none ]] && flags=()
  local launch=(mpirun -np "$ranks" --oversubscribe --bind-to none --mca mpi_yield_when_idle 1)
  [[ -n $name ]] && launch=(mpirun -np "$ranks" --hostfile "/run/unimsg-cluster/$name/hostfile")
  local start before=0
  [[ -n $name ]] && before=$(host_bytes "$name")
  start=$(date +%s%N)
  "${launch[@]}" "$build/examples/train_fashion_mnist" --json "${flags[@]}" "$@" |
    while IFS= read -r line; do
      [[ $line == '{'*'"test_accuracy"'* ]] || continue
      local ms sent=null
      ms=$((($(date +%s%N) - start) / 1000000))
      [[ -n $name ]] && sent=$(($(host_bytes "$name") - before))
      printf '{"rate":"%s","hosts":%d,"slots":%d,"run":"%s","wall_s":%d.%03d,"host_bytes":%s,%s\n' \
        "$rate" "$hosts" "$slots" "$run" $((ms / 1000)) $((ms % 1000)) "$sent" "${line#\{}"
    done
}

IFS=, read -ra runs <<<"$compress"
for rate in "${rates[@]}"; do
  (  # (a subshell: one cluster's settings for mpirun end with it)
    name=""
    if [[ $rate != local ]]; then
      name=t$$
      scripts/cluster up --name "$name" --hosts "$hosts" --slots "$slots" --rate "$rate" >&2
      trap 'scripts/cluster down --name '"$name" EXIT
      eval "$(scripts/cluster env --name "$name")"
    fi
    for run in "${runs[@]}"; do
      echo "cluster_training: $rate, $hosts x $slots, $run" >&2
      train "$rate" "$run" "$name" "$@"
    done
  )
done
