# Sourced by the cluster tests: a cluster of HOSTS namespace hosts x 2 slots for the test's
# lifetime, or a skip (exit status 77, saying why) where namespaces cannot be made (not root).
#   cluster_up CLUSTER_SCRIPT HOSTS [more options of `up`, e.g. --slurm]
# sets: name, hostfile, local_dir (each host's own disk, one path), disks (those disks as seen
# from here), info (up's JSON), work (a scratch directory), and mpirun's settings for the hosts in
# the environment. The EXIT trap runs `on_exit` (if the test defines one), then removes both.

fail() { echo "FAIL: $*"; exit 1; }

json_field() { sed -E "s/.*\"$1\":\"([^\"]+)\".*/\\1/" <<<"$info"; }

cluster_up() {
  local script=$1 hosts=$2 status=0
  info=$("$script" up --hosts "$hosts" --slots 2 --json "${@:3}" 2>"${TMPDIR:-/tmp}/cluster-up.$$") ||
    status=$?
  local said
  said=$(cat "${TMPDIR:-/tmp}/cluster-up.$$")
  rm -f "${TMPDIR:-/tmp}/cluster-up.$$"
  if ((status == 77)); then
    echo "SKIP: this test needs a cluster of namespace hosts, which it cannot make here: $said"
    exit 77
  fi
  [[ -z $said ]] || echo "$said" >&2
  ((status == 0)) || fail "scripts/cluster up failed ($status)"
  name=$(json_field name)
  hostfile=$(json_field hostfile)
  local_dir=$(json_field local_dir)
  disks=$(json_field local_dirs)
  work=$(mktemp -d)
  cluster_script=$script
  trap '[[ $(type -t on_exit) != function ]] || on_exit; "$cluster_script" down --name "$name"; rm -rf "$work"' EXIT
  eval "$("$script" env --name "$name")"
}
