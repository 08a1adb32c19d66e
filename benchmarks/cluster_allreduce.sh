#!/usr/bin/env bash
# The allreduce sweep across namespace hosts (docs/cluster.md) at each link rate given: raw MPI
# and the engine (or --backend's list: shm is the shared-memory/across-hosts allreduce forced on),
# uncompressed and compressed, measured interleaved by unimsg-bench-allreduce.
#   benchmarks/cluster_allreduce.sh [--hosts 3] [--slots 2] [--max 4M] [--compress LIST]
#                                   [--backend LIST] RATE...
#   e.g. benchmarks/cluster_allreduce.sh 1gbit 100mbit        (root; run from the build's parent)
# Prints the benchmark's JSON rows, each with "rate" added.
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=3 slots=2 max=4M compress=none,fp16,onebit,topk:0.01,powersgd:4 backend=mpi,engine
build=${BUILD:-build}
while [[ ${1:-} == --* ]]; do
  case $1 in
    --hosts) hosts=$2 ;;
    --slots) slots=$2 ;;
    --max) max=$2 ;;
    --compress) compress=$2 ;;
    --backend) backend=$2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
(($#)) || { echo "usage: $0 [options] RATE... (e.g. 1gbit 100mbit)" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
for rate in "$@"; do
  name=b$$
  scripts/cluster up --name "$name" --hosts "$hosts" --slots "$slots" --rate "$rate" >&2
  trap 'scripts/cluster down --name '"$name" EXIT
  eval "$(scripts/cluster env --name "$name")"
  mpirun -np $((hosts * slots)) --hostfile "/run/unimsg-cluster/$name/hostfile" \
    "$build/benchmarks/unimsg-bench-allreduce" -b 64K -e "$max" -f 4 -n 5 -w 2 -c 0 \
    --backend "$backend" --compress "$compress" --json |
    sed "s/^{/{\"rate\":\"$rate\",/"
  scripts/cluster down --name "$name"
  trap - EXIT
done
