#!/usr/bin/env bash
# Installs what unimsg needs on Debian 12 (only what is missing), as root or through sudo.
#   scripts/setup.sh        to build and run
#   scripts/setup.sh test   and to run every test (adds headless Chromium for the monitor's page
#                           and Slurm for the cluster tests under srun)
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  openmpi-bin libopenmpi-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libcxxopts-dev nlohmann-json3-dev libspdlog-dev libfmt-dev
  libzstd-dev libxxhash-dev zlib1g-dev libopenblas-dev
  libcurl4-openssl-dev libssl-dev libcpp-httplib-dev curl
  libtorch-dev dataset-fashion-mnist
  clang libclang-rt-14-dev clang-format
  iproute2 util-linux python3 gnuplot-nox
  python3-dev python3-torch pybind11-dev python3-pytest
)
if [[ ${1:-} == test ]]; then
  # The monitor's page in a headless browser; Slurm for the cluster tests under srun.
  packages+=(chromium slurmctld slurmd slurm-client munge)
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "setup: all ${#packages[@]} packages are installed"
  exit 0
fi

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo_cmd=(sudo)
fi
echo "setup: installing ${missing[*]}"
"${sudo_cmd[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
