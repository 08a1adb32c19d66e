"""Every rank of an mpirun runs the same tests in the same order: each test is collective.

The backend is initialised once per process, for every test module (unimsg's runtime is one per
process, like MPI)."""

import pytest
import torch.distributed as dist

import unimsg.torch  # noqa: F401  (registers "unimsg"; under mpirun, the rendezvous from MPI)


@pytest.fixture(scope="session", autouse=True)
def world():
    if not dist.is_initialized():
        dist.init_process_group("unimsg")
    return dist.get_rank(), dist.get_world_size()


@pytest.fixture(scope="session")
def gloo(world):
    """Gloo over the same ranks: the reference DDP is compared with."""
    return dist.new_group(backend="gloo")
