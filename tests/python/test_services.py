"""The runtime's services from Python: checkpoints of torch.save-able state, the monitor, the
launcher's restart count, the engine's counters."""

import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist

import unimsg
import unimsg.torch


@pytest.fixture
def shared_directory(world):
    """One fresh directory for every rank (rank 0's, broadcast as an object: the backend's
    broadcast of bytes)."""
    rank, _ = world
    holder = [tempfile.mkdtemp(prefix="unimsg-py-") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    yield holder[0]
    dist.barrier()
    if rank == 0:
        shutil.rmtree(holder[0], ignore_errors=True)


def test_checkpoints_round_trip_a_state_dict(world, shared_directory):
    rank, _ = world
    checkpoints = unimsg.torch.Checkpoints(shared_directory, keep=2)
    assert checkpoints.load() is None  # nothing yet, on every rank
    model = torch.nn.Linear(3, 2)
    state = {"model": model.state_dict(), "epoch": 2}
    checkpoints.save(5, state, metadata={"batch_size": 256})
    checkpoints.flush()
    step, loaded, metadata = checkpoints.load()
    assert (step, metadata, loaded["epoch"]) == (5, {"batch_size": 256}, 2)
    if rank == 0:  # (the others' models were initialised differently)
        assert torch.equal(loaded["model"]["weight"], model.state_dict()["weight"])
    weight = loaded["model"]["weight"].clone()
    dist.broadcast(weight, src=0)
    assert torch.equal(weight, loaded["model"]["weight"])  # every rank loaded rank 0's
    checkpoints.save(10, {"epoch": 3})
    checkpoints.save(15, {"epoch": 4})
    checkpoints.flush()
    step, loaded, _ = checkpoints.load()
    assert (step, loaded["epoch"]) == (15, 4)
    if rank == 0:
        kept = sorted(name for name in os.listdir(shared_directory) if name.startswith("step-"))
        assert len(kept) == 2  # keep=2


def test_a_checkpoint_one_rank_holds_reaches_every_rank(world):
    rank, size = world
    private = tempfile.mkdtemp(prefix=f"unimsg-py-rank{rank}-")  # each rank its own disk
    try:
        checkpoints = unimsg.torch.Checkpoints(private, writers=(size - 1,))
        checkpoints.save(7, {"value": torch.arange(4) * (rank + 1)})
        checkpoints.flush()
        step, loaded, _ = checkpoints.load()
        assert step == 7
        assert torch.equal(loaded["value"], torch.arange(4) * size)  # rank size-1's
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_checkpoints_without_a_directory_say_so(world, monkeypatch):
    monkeypatch.delenv("UNIMSG_CHECKPOINT_DIR", raising=False)
    with pytest.raises(unimsg.ConfigError, match="no directory"):
        unimsg.torch.Checkpoints()


def test_the_restart_count_is_read_strictly(monkeypatch):
    monkeypatch.setenv("UNIMSG_RESTART_COUNT", "2")
    assert unimsg.torch.restart_count() == 2
    monkeypatch.setenv("UNIMSG_RESTART_COUNT", "two")
    with pytest.raises(unimsg.ConfigError, match="UNIMSG_RESTART_COUNT"):
        unimsg.torch.restart_count()


def test_monitor_steps_and_the_engine_counters(world):
    _, size = world
    monitor = unimsg.torch.Monitor(total_steps=3)
    before = unimsg.torch.engine_stats()["tensors_reduced"]
    for step in range(1, 4):
        tensor = torch.ones(100)
        dist.all_reduce(tensor)
        assert torch.all(tensor == size)
        monitor.step(step, loss=1.0 / step, samples=10)
    monitor.event("info", "from Python")
    assert unimsg.torch.engine_stats()["tensors_reduced"] >= before + 3
