#!/usr/bin/env bash
# Downloads per host: train_fashion_mnist --data-url on 3 namespace hosts x 2 ranks, the HTTP
# server on a fourth host of its own, the cache on each host's own disk. Every host's cache must
# hold all four files, and the server must have been asked for each file exactly once per host.
#   cluster_downloads_test.sh CLUSTER UNIMSG_RUN TRAINER HTTP_SERVE
# Exit status 77 (a skip, saying why) where namespaces cannot be made (not root): cluster_lib.sh.
set -euo pipefail
cluster=$1
launcher=$2
trainer=$3
serve=$4
data=/usr/share/datasets/fashion-mnist
source "$(dirname "$0")/cluster_lib.sh"
cluster_up "$cluster" 4
server_address=$(sed -E 's/.*"addresses":\[("[^"]+",){3}"([^"]+)"\].*/\2/' <<<"$info")
server_pid=
on_exit() { [[ -z $server_pid ]] || kill "$server_pid"; }

# The server on host 3; the job on hosts 0-2.
ip netns exec "$name-h3" "$serve" --bind "$server_address" --log "$work/requests" "$data" \
  >"$work/port" &
server_pid=$!
for _ in $(seq 100); do [[ -s $work/port ]] && break; sleep 0.1; done
port=$(cat "$work/port")
[[ -n $port ]] || fail "the server did not start"
printf '%s slots=2\n' "$name-h0" "$name-h1" "$name-h2" >"$work/hostfile"

"$launcher" -np 6 --hostfile "$work/hostfile" --max-restarts 0 --run-dir "$work/run" \
  -- "$trainer" --epochs 1 --limit 3000 --test-limit 1000 --batch-size 240 --min-accuracy 0.3 \
  --data-url "http://$server_address:$port" --data-cache "$local_dir/cache" --json \
  >"$work/out" 2>"$work/err" || { status=$?; tail -30 "$work/err"; fail "training exited with $status"; }

for file in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
  t10k-labels-idx1-ubyte; do
  asked=$(grep -c "^GET /$file.gz 20[06]" "$work/requests" || true)
  [[ $asked == 3 ]] || { cat "$work/requests"; fail "$file.gz was fetched $asked times, not once per host"; }
  expected=$(stat -c %s "$data/$file.gz")
  for k in 0 1 2; do
    found=$(find "$disks/$name-h$k/cache" -type f -size "${expected}c" | wc -l)
    ((found >= 1)) || { find "$disks/$name-h$k" -type f; fail "no $file.gz in $name-h$k's cache"; }
  done
done
[[ -z $(find "$disks/$name-h3" -mindepth 1 2>/dev/null) ]] || fail "the server's host got a cache"
echo "every host's cache holds the four files; the server was asked once per host for each"
echo "PASS"
