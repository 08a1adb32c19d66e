"""Every collective of the backend against a reference computed from what each rank passed."""

import time

import pytest
import torch
import torch.distributed as dist

import unimsg

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
          torch.uint8]
COUNTS = [1, 7, 1000, 100_003]  # one element, odd, several chunks, past the fusion of small ones


def contribution(rank, count, dtype):
    """What `rank` passes: small integers, exact in every dtype, different on every rank."""
    values = (torch.arange(count, dtype=torch.int64) * 7 + rank * 3) % 11
    return values.to(dtype)


def reference(op, count, dtype, size):
    stacked = torch.stack([contribution(r, count, torch.float64) for r in range(size)])
    if op == dist.ReduceOp.SUM:
        return stacked.sum(0)
    if op == dist.ReduceOp.MIN:
        return stacked.min(0).values
    if op == dist.ReduceOp.MAX:
        return stacked.max(0).values
    mean = stacked.sum(0) / size
    return mean.trunc() if not dtype.is_floating_point else mean


def assert_equal(actual, expected, dtype):
    tolerance = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [dist.ReduceOp.SUM, dist.ReduceOp.AVG, dist.ReduceOp.MIN,
                                dist.ReduceOp.MAX], ids=["sum", "avg", "min", "max"])
def test_allreduce(world, op, dtype):
    rank, size = world
    if dtype == torch.uint8 and op == dist.ReduceOp.SUM and size * 10 > 255:
        pytest.skip("the sum of uint8 contributions overflows at this size")
    for count in COUNTS:
        tensor = contribution(rank, count, dtype)
        dist.all_reduce(tensor, op=op)
        assert_equal(tensor, reference(op, count, dtype, size), dtype)


def test_allreduce_of_a_non_contiguous_tensor_writes_back_into_it(world):
    rank, size = world
    matrix = torch.full((4, 6), float(rank + 1))
    column = matrix[:, 1]  # a strided view
    dist.all_reduce(column)
    assert torch.all(matrix[:, 1] == size * (size + 1) / 2)
    assert torch.all(matrix[:, 0] == rank + 1)  # the rest untouched


def test_many_async_allreduces_in_flight_complete_in_any_wait_order(world):
    rank, size = world
    tensors = [torch.full((n,), float(rank)) for n in range(1, 130)]  # past the name window
    works = [dist.all_reduce(t, async_op=True) for t in tensors]
    for work in reversed(works):
        work.wait()
        assert work.is_completed()
    for tensor in tensors:
        assert torch.all(tensor == size * (size - 1) / 2)


def test_the_future_of_an_allreduce_carries_its_tensor(world):
    _, size = world
    tensor = torch.ones(10)
    work = dist.all_reduce(tensor, async_op=True)
    result = work.get_future().then(lambda future: future.value()[0] * 2).wait()
    assert torch.all(result == 2 * size)


def test_a_waited_work_has_its_future_complete(world):
    _, size = world
    for _ in range(200):  # (the future used to complete just after the work: a race)
        tensor = torch.ones(3)
        work = dist.all_reduce(tensor, async_op=True)
        work.wait()
        future = work.get_future()
        assert future.done()
        assert torch.all(future.value()[0] == size)


def test_a_callback_may_wait_for_another_collective(world):
    # As torch's PowerSGD hook does: the callback of one allreduce issues another and waits.
    _, size = world
    first, second = torch.ones(5), torch.full((7,), 2.0)

    def then_second(future):
        return dist.all_reduce(second, async_op=True).get_future().wait()[0] + future.value()[0][0]

    result = dist.all_reduce(first, async_op=True).get_future().then(then_second).wait()
    assert torch.all(result == 2 * size + size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_broadcast_from_every_root(world, dtype):
    rank, size = world
    for root in range(size):
        for count in COUNTS:
            tensor = contribution(rank, count, dtype)
            dist.broadcast(tensor, src=root)
            assert torch.equal(tensor, contribution(root, count, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8], ids=str)
def test_all_gather(world, dtype):
    rank, size = world
    for count in COUNTS:
        outputs = [torch.zeros(count, dtype=dtype) for _ in range(size)]
        dist.all_gather(outputs, contribution(rank, count, dtype))
        for r in range(size):
            assert torch.equal(outputs[r], contribution(r, count, dtype))
        flat = torch.zeros(size * count, dtype=dtype)
        dist.all_gather_into_tensor(flat, contribution(rank, count, dtype))
        assert torch.equal(flat, torch.cat([contribution(r, count, dtype) for r in range(size)]))


@pytest.mark.parametrize("op", [dist.ReduceOp.SUM, dist.ReduceOp.MAX], ids=["sum", "max"])
def test_reduce_scatter(world, op):
    rank, size = world
    for count in COUNTS:
        full = contribution(rank, size * count, torch.float32)
        expected = reference(op, size * count, torch.float32, size)[rank * count:(rank + 1) * count]
        output = torch.zeros(count)
        dist.reduce_scatter(output, list(full.chunk(size)), op=op)
        assert_equal(output, expected, torch.float32)
        output = torch.zeros(count)
        dist.reduce_scatter_tensor(output, full, op=op)
        assert_equal(output, expected, torch.float32)


def test_all_to_all(world):
    rank, size = world
    for count in [1, 5, 1000]:
        send = torch.arange(size * count, dtype=torch.float64) + 1000 * rank
        received = torch.zeros(size * count, dtype=torch.float64)
        dist.all_to_all_single(received, send)
        for r in range(size):
            block = received[r * count:(r + 1) * count]
            expected = torch.arange(rank * count, (rank + 1) * count, dtype=torch.float64) + 1000 * r
            assert torch.equal(block, expected)
        outputs = [torch.zeros(count, dtype=torch.float64) for _ in range(size)]
        dist.all_to_all(outputs, list(send.chunk(size)))
        assert torch.equal(torch.cat(outputs), received)


def test_no_rank_leaves_the_barrier_before_the_last_one_enters_it(world):
    rank, size = world
    if rank == 0:
        time.sleep(0.3)  # the last to enter
    entered = torch.tensor([time.time()], dtype=torch.float64)
    dist.barrier()
    left = time.time()
    dist.broadcast(entered, src=0)  # (one host: one clock)
    assert left >= entered.item()
    work = dist.barrier(async_op=True)
    work.wait()
    assert work.is_completed() and work.get_future().done()


def test_rendezvous_came_from_mpi(world):
    rank, size = world
    assert (unimsg.torch.rank(), unimsg.torch.size()) == (rank, size)
    assert dist.get_backend() == "unimsg"
