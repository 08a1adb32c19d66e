#!/usr/bin/env bash
# The Python package across 2 namespace hosts x 2 ranks: the rendezvous torch.distributed needs
# (MASTER_ADDR: an address of rank 0's host on the hosts' subnet, found without a name service),
# then the Python example (DistributedDataParallel over "unimsg", a quarter epoch) must learn.
#   cluster_python_test.sh CLUSTER PYTHON EXAMPLE
# Exit status 77 (a skip, saying why) where namespaces cannot be made (not root): cluster_lib.sh.
set -euo pipefail
cluster=$1
python=$2
example=$3
source "$(dirname "$0")/cluster_lib.sh"
cluster_up "$cluster" 2
forward=(-x PYTHONPATH -x PYTHONDONTWRITEBYTECODE)

# (each rank writes its own file: mpirun may splice lines of several ranks together)
mpirun -np 4 --hostfile "$hostfile" "${forward[@]}" "$python" -c '
import os, socket, sys, torch, torch.distributed as dist, unimsg.torch
dist.init_process_group("unimsg")
t = torch.ones(1)
dist.all_reduce(t)
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}"), "w") as out:
    print("rank", dist.get_rank(), "host", socket.gethostname(), "master",
          os.environ["MASTER_ADDR"], "sum", int(t.item()), file=out)' "$work" 2>"$work/err" ||
  { tail -20 "$work/err"; fail "the rendezvous across hosts"; }
cat "$work"/rank[0-3] >"$work/rendezvous"
cat "$work/rendezvous"
[[ $(grep -c "sum 4$" "$work/rendezvous") == 4 ]] || fail "not every rank summed 4"
subnet=$(grep -o "master [0-9.]*" "$work/rendezvous" | sort -u)
[[ $(wc -l <<<"$subnet") == 1 && $subnet == "master 198.1"[89]* ]] ||
  fail "MASTER_ADDR is not one address on the hosts' subnet: $subnet"
for k in 0 1; do
  grep -q "host $name-h$k " "$work/rendezvous" || fail "no rank ran on $name-h$k"
done

mpirun -np 4 --hostfile "$hostfile" "${forward[@]}" "$python" "$example" --epochs 1 \
  --limit 15000 --test-limit 2000 --batch-size 240 --min-accuracy 0.70 --json \
  >"$work/out" 2>"$work/err" || { tail -20 "$work/err"; fail "the example across hosts"; }
grep '"accuracy"' "$work/out"
echo "PASS"
