#!/usr/bin/env bash
# scripts/check-layers passes on the tree and fails, naming the edge, on planted violations.
#   check_layers_test.sh SOURCE_DIR
set -euo pipefail
source_dir=$1
check=$source_dir/scripts/check-layers
"$check" "$source_dir"

planted=$(mktemp -d)
trap 'rm -rf "$planted"' EXIT
expect_refused() {  # expect_refused FILE LINE MESSAGE: FILE with LINE is refused with MESSAGE
  local file=$1 line=$2 message=$3
  rm -rf "${planted:?}"/*
  mkdir -p "$planted/$(dirname "$file")"
  printf '%s\n' "$line" >"$planted/$file"
  local out
  if out=$("$check" "$planted" 2>&1); then
    echo "FAIL: check-layers accepted $file: $line" >&2
    exit 1
  fi
  if [[ $out != *"$message"* ]]; then
    echo "FAIL: check-layers refused $file: $line but said: $out" >&2
    exit 1
  fi
}
expect_refused runtime/core/src/error.cpp '#include "unimsg/bus/bus.hpp"' \
  "core includes unimsg/bus/"
expect_refused kernels/src/cpu/x.cpp '#include "unimsg/collectives/engine.hpp"' \
  "kernels includes unimsg/collectives/"
expect_refused runtime/monitor/src/monitor.cpp '  #  include "unimsg/collectives/engine.hpp"' \
  "monitor includes unimsg/collectives/"
expect_refused collectives/src/x.cpp '#include "unimsg/services/runtime.hpp"' \
  "collectives includes unimsg/services/"
expect_refused runtime/message/src/m.cpp '#include <mpi.h>' "below the bus"
expect_refused runtime/bus/src/b.cpp '#include "unimsg/engine.hpp"' "flat prefix"
expect_refused collectives/src/backends/mpi_communicator.cpp '#include <cuda_runtime.h>' \
  "CUDA or NCCL header"
echo "PASS: the layer map holds and planted violations are refused"
