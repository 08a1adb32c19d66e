#!/usr/bin/env bash
# Two processes launched as torchrun launches them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
# MASTER_PORT; no MPI): init_process_group("unimsg") must refuse on both, saying how to launch.
# (Debian 12's torchrun itself fails before starting anything under Python 3.11: its Std enum
# parsing returns None.)
#   launched_like_torchrun.sh PYTHON SCRIPT
set -euo pipefail
python=$1
script=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for rank in 0 1; do
  RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 \
    MASTER_PORT=$port timeout 120 "$python" "$script" >"$work/out$rank" 2>&1 &
  pids+=($!)
done
status=0
for rank in 0 1; do
  wait "${pids[$rank]}" || true
  cat "$work/out$rank"
  grep -q "REFUSED: .*MPI says rank 0 of 1: unimsg takes its ranks from MPI; launch with \`mpirun -np N" \
    "$work/out$rank" || { echo "FAIL: rank $rank did not refuse"; status=1; }
done
((status == 0)) && echo "PASS: both refused, saying how to launch"
exit $status
