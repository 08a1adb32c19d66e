"""PyTorch's own DistributedDataParallel over the backend, and unimsg's compression as its comm
hook."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import unimsg.torch


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 10))


def train(ddp, steps, rank, hook=None):
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        generator = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
        x = torch.randn(8, 1, 8, 8, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        if hook is None or not hook.step_skipped():
            optimizer.step()


def parameters_of(ddp):
    return torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])


def assert_same_on_every_rank(tensor, size):
    gathered = [torch.zeros_like(tensor) for _ in range(size)]
    dist.all_gather(gathered, tensor)
    for other in gathered:
        assert torch.equal(other, tensor)


def test_ddp_on_unimsg_equals_ddp_on_gloo(world, gloo):
    rank, size = world
    # Different initial weights on every rank: DDP's constructor broadcasts rank 0's.
    ours = DistributedDataParallel(make_model(seed=rank), bucket_cap_mb=0.002)  # several buckets
    theirs = DistributedDataParallel(make_model(seed=rank), process_group=gloo)
    train(ours, 6, rank)
    train(theirs, 6, rank)
    torch.testing.assert_close(parameters_of(ours), parameters_of(theirs), rtol=1e-5, atol=1e-6)
    assert_same_on_every_rank(parameters_of(ours), size)
    assert not torch.equal(parameters_of(ours), parameters_of(DistributedDataParallel(make_model(0))))


def test_ddp_with_the_fp16_hook_stays_close_to_gloo(world, gloo):
    rank, size = world
    ours = DistributedDataParallel(make_model(seed=3))
    hook = unimsg.torch.compression_hook("fp16")
    ours.register_comm_hook(state=None, hook=hook)
    theirs = DistributedDataParallel(make_model(seed=3), process_group=gloo)
    train(ours, 4, rank, hook)
    train(theirs, 4, rank)
    torch.testing.assert_close(parameters_of(ours), parameters_of(theirs), rtol=2e-3, atol=2e-3)
    assert_same_on_every_rank(parameters_of(ours), size)
    assert hook.skipped_steps == 0


def test_torchs_own_powersgd_hook_runs_on_the_backend(world):
    # Its callbacks issue allreduces and wait for them inside other allreduces' callbacks.
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    rank, size = world
    ddp = DistributedDataParallel(make_model(seed=5))
    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                   start_powerSGD_iter=2)
    ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    train(ddp, 4, rank)
    assert_same_on_every_rank(parameters_of(ddp), size)


class Bucket:
    """What the hook uses of DDP's GradBucket."""

    def __init__(self, index, tensor):
        self._index, self._tensor = index, tensor

    def index(self):
        return self._index

    def buffer(self):
        return self._tensor


def gradient(rank, count=4000):
    generator = torch.Generator().manual_seed(rank)
    return torch.randn(count, generator=generator) * (1 + rank)


# (spec, relative error bound of one step's result, of the mean of 60 steps' results): the
# quantizers are close at every step; the sparsifiers and PowerSGD only with their error
# feedback, over steps (without it, top-k would stay 0.9 away).
SPECS = [("fp16", 1e-3, 1e-3), ("bf16", 1e-2, 1e-2), ("int8", 0.1, 0.1),
         ("topk:0.1", None, 0.25), ("randomk:0.1", None, 0.35), ("onebit", None, 0.3),
         ("powersgd:2", None, 0.3)]


@pytest.mark.parametrize("spec,step_bound,mean_bound", SPECS, ids=[s[0] for s in SPECS])
def test_the_hook_averages_within_the_compressors_tolerance(world, spec, step_bound, mean_bound):
    rank, size = world
    hook = unimsg.torch.compression_hook(spec, name=f"test.{spec}")
    exact = torch.stack([gradient(r) for r in range(size)]).mean(0)
    total = torch.zeros_like(exact)
    steps = 60
    for _ in range(steps):
        result = hook(None, Bucket(0, gradient(rank).clone())).wait()
        if step_bound is not None:
            assert (result - exact).norm() <= step_bound * exact.norm()
        total += result
        assert not hook.step_skipped()
    mean = total / steps
    assert (mean - exact).norm() <= mean_bound * exact.norm()
    assert_same_on_every_rank(mean, size)


def test_without_error_feedback_top_k_stays_far_from_the_average(world):
    # The control of the bound above: it is the error feedback that meets it.
    rank, size = world
    hook = unimsg.torch.compression_hook("topk:0.1:noef", name="test.noef")
    exact = torch.stack([gradient(r) for r in range(size)]).mean(0)
    total = torch.zeros_like(exact)
    for _ in range(20):
        total += hook(None, Bucket(0, gradient(rank).clone())).wait()
    assert (total / 20 - exact).norm() > 0.5 * exact.norm()


def test_nan_on_one_rank_skips_the_step_on_every_rank(world):
    rank, size = world
    hook = unimsg.torch.compression_hook("topk:0.1", name="test.nan")
    tensor = gradient(rank)
    if rank == size - 1:
        tensor[17] = float("nan")
    result = hook(None, Bucket(0, tensor)).wait()
    assert torch.all(torch.isnan(result))
    assert hook.step_skipped()
    result = hook(None, Bucket(0, gradient(rank).clone())).wait()  # the next step is normal
    assert torch.all(torch.isfinite(result))
    assert not hook.step_skipped()
    assert hook.skipped_steps == 1
