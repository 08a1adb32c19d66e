"""Launched as torchrun launches (launched_like_torchrun.sh): the backend must refuse, saying how to launch.
torchrun starts unrelated processes, each an MPI world of one, where torch.distributed was told
of two ranks."""

import sys

import torch.distributed as dist

import unimsg
import unimsg.torch  # noqa: F401

try:
    dist.init_process_group("unimsg")
except unimsg.ConfigError as error:
    print(f"REFUSED: {error}", flush=True)
    sys.exit(3)
print("ACCEPTED: init_process_group did not refuse a world MPI does not know", flush=True)
