#!/usr/bin/env bash
# scripts/cluster itself: names and subnets that never collide, bad usage refused (status 2),
# down safe to repeat, leftovers of a crashed creator removed by down --stale (and a live one's
# kept), shaping and the fault verbs doing what they say, and status 77 when not root.
#   cluster_script_test.sh CLUSTER
set -euo pipefail
cluster=$1
fail() { echo "FAIL: $*"; exit 1; }
if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: scripts/cluster needs root"
  exit 77
fi
state=$(mktemp -d)
export UNIMSG_CLUSTER_STATE=$state  # this test's clusters only: down --all touches no other
made=()
id=$(printf %04x $((RANDOM)))
trap 'for n in "${made[@]}"; do "$cluster" down --name "$n" >/dev/null 2>&1 || true; done; rm -rf "$state"' EXIT

expect_status() {  # expect_status STATUS command...
  local want=$1 got=0
  shift
  "$@" >/dev/null 2>&1 || got=$?
  [[ $got == "$want" ]] || fail "'$*' exited with $got, not $want"
}

# Bad usage.
expect_status 2 "$cluster" up --hosts 0
expect_status 2 "$cluster" up --hosts 2 --name Bad_Name
expect_status 2 "$cluster" up --hosts 2 --rate fast
expect_status 2 "$cluster" frobnicate
expect_status 2 "$cluster" kill not-a-host
expect_status 2 "$cluster" down
# Not root: a clear refusal with the skip status.
if command -v setpriv >/dev/null; then
  expect_status 77 setpriv --reuid 65534 --regid 65534 --clear-groups "$cluster" up --hosts 1
fi

# An up that fails half-way (tc refuses the rate) leaves nothing behind.
expect_status 1 "$cluster" up --name "t${id}z" --hosts 1 --rate 0kbit
[[ ! -e $state/t${id}z ]] && ! ip link show "t${id}z-br" >/dev/null 2>&1 ||
  fail "a failed up left its cluster"

# Two clusters side by side: distinct subnets; the same name twice is refused.
a=t${id}a b=t${id}b
made+=("$a" "$b")
"$cluster" up --name "$a" --hosts 2 --slots 1 --rate 100mbit >/dev/null
"$cluster" up --name "$b" --hosts 1 >/dev/null
[[ $(cat "$state/$a/subnet") != $(cat "$state/$b/subnet") ]] || fail "two clusters share a subnet"
expect_status 1 "$cluster" up --name "$a" --hosts 1
# A host reaches another and the launching side reaches both; the link is shaped both ways.
prefix=$(sed 's#\.0/24##' "$state/$a/subnet")
listen='import socket; s = socket.socket(); s.bind(("0.0.0.0", 5555)); s.listen()
for _ in range(2): s.accept()[0].close()'
ip netns exec "$a-h1" python3 -c "$listen" &
listener=$!
for _ in $(seq 50); do
  ip netns exec "$a-h0" bash -c "exec 3<>/dev/tcp/$prefix.2/5555" 2>/dev/null && break
  sleep 0.1
done
timeout 10 bash -c "exec 3<>/dev/tcp/$prefix.2/5555" || fail "the launching side cannot reach $a-h1"
timeout 10 tail --pid=$listener -f /dev/null || fail "$a-h0 did not reach $a-h1"
tc qdisc show dev "$a-v0" | grep -q "tbf.*rate 100Mbit" || fail "the outside end is not shaped"
ip netns exec "$a-h0" tc qdisc show dev eth0 | grep -q "tbf.*rate 100Mbit" ||
  fail "the inside end is not shaped"
"$cluster" shape "$a-h0" 1gbit
tc qdisc show dev "$a-v0" | grep -q "rate 1Gbit" || fail "shape did not change the rate"
"$cluster" shape "$a-h0" off
[[ -z $(tc qdisc show dev "$a-v0" | grep tbf || true) ]] || fail "shape off left the shaping"

# The fault verbs.
ip netns exec "$a-h1" sleep 300 &
sleeper=$!
"$cluster" freeze "$a-h1"
sleep 0.2
[[ $(ps -o state= -p $sleeper) == T* ]] || fail "freeze did not stop the host's process"
"$cluster" thaw "$a-h1"
sleep 0.2
[[ $(ps -o state= -p $sleeper) != T* ]] || fail "thaw did not continue it"
"$cluster" cut "$a-h1"
ip link show "$a-v1" | grep -q "state DOWN" || fail "cut left the link up"
agent_said=$("$state/$a/agent" "$a-h1" true 2>&1 || true)
[[ $agent_said == *"No route to host"* ]] || fail "the agent reached a cut host: $agent_said"
"$cluster" heal "$a-h1"
ip link show "$a-v1" | grep -q "state UP" || fail "heal left the link down"
"$state/$a/agent" "$a-h1" 'test "$(hostname)" = '"$a-h1" || fail "the agent's host has another name"
touch "$state/$a/disk/$a-h1/marker"
"$cluster" kill "$a-h1"
status=0
wait $sleeper 2>/dev/null || status=$?
((status == 128 + 9)) || fail "the host's process ended with status $status, not by SIGKILL"
[[ ! -e $state/$a/disk/$a-h1 ]] || fail "kill left the host's disk"
[[ -z $(ip netns pids "$a-h1") ]] || fail "kill left processes in the host"

# --slurm: a controller here, a slurmd per host; srun reaches every host by its name; a killed
# host's slurmd comes back with heal; down ends the controller and munged.
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  d=t${id}d
  made+=("$d")
  info=$("$cluster" up --name "$d" --hosts 2 --slurm --json)
  [[ $info == *'"slurm":true'* && $info == *"\"SLURM_CONF\":\"$state/$d/slurm/slurm.conf\""* ]] ||
    fail "up --slurm: $info"
  "$cluster" env --name "$d" | grep -qx "export SLURM_CONF=$state/$d/slurm/slurm.conf" ||
    fail "env does not name the Slurm configuration"
  ran=$(SLURM_CONF=$state/$d/slurm/slurm.conf timeout 60 srun -n 2 -N 2 hostname | sort | paste -sd' ')
  [[ $ran == "$d-h0 $d-h1" ]] || fail "srun ran on '$ran'"
  "$cluster" kill "$d-h1"
  "$cluster" heal "$d-h1"
  [[ $(SLURM_CONF=$state/$d/slurm/slurm.conf sinfo -h -n "$d-h1" -o %T) == idle ]] ||
    fail "heal did not bring the killed host's slurmd back"
  daemons="$(cat "$state/$d/slurm/slurmctld.pid") $(cat "$state/$d/slurm/munged.pid")"
  "$cluster" down --name "$d"
  for pid in $daemons; do
    ! kill -0 "$pid" 2>/dev/null || fail "down left Slurm's daemon $pid running"
  done
else
  echo "(Slurm is not installed: its part of this test not run; scripts/setup.sh test installs it)"
fi

# down: everything gone, and safe to repeat.
"$cluster" down --name "$b"
"$cluster" down --name "$b"
ip netns list | grep -q "^$b-h0" && fail "down left the namespace"
ip link show "$b-br" >/dev/null 2>&1 && fail "down left the bridge"
[[ ! -e $state/$b ]] || fail "down left the state"

# --stale: a cluster whose creator has exited goes; one whose creator lives stays.
c=t${id}c
made+=("$c")
bash -c "'$cluster' up --name $c --hosts 1 >/dev/null"
"$cluster" down --stale
[[ ! -e $state/$c ]] || fail "down --stale kept a cluster whose creator exited"
[[ -e $state/$a ]] || fail "down --stale removed a cluster whose creator lives"
"$cluster" down --all
[[ -z $(ls "$state") ]] || fail "down --all left $(ls "$state")"
echo "PASS"
