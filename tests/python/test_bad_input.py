"""Wrong arguments fail with an error that says what was wrong, on every rank, and the backend
goes on working afterwards: never a hang, never a wrong result."""

import pytest
import torch
import torch.distributed as dist

import unimsg


def test_a_dtype_unimsg_does_not_reduce_is_named(world):
    with pytest.raises(RuntimeError, match="dtype Short is not one unimsg reduces"):
        dist.all_reduce(torch.zeros(4, dtype=torch.int16))
    with pytest.raises(RuntimeError, match="dtype Bool is not one unimsg reduces"):
        dist.broadcast(torch.zeros(4, dtype=torch.bool), src=0)


def test_a_reduction_the_engine_lacks_is_named(world):
    with pytest.raises(RuntimeError, match="is not one unimsg reduces .SUM, AVG, MIN, MAX."):
        dist.all_reduce(torch.ones(3), op=dist.ReduceOp.PRODUCT)


def test_unequal_all_to_all_splits_are_refused(world):
    _, size = world
    if size == 1:
        pytest.skip("one rank: every split is the whole tensor")
    send = torch.zeros(size + 1)
    with pytest.raises(RuntimeError, match="unequal splits"):
        dist.all_to_all_single(torch.zeros(size + 1), send,
                               output_split_sizes=[2] + [1] * (size - 1),
                               input_split_sizes=[2] + [1] * (size - 1))


def test_allreduce_shapes_that_differ_across_ranks_fail_naming_the_ranks(world):
    rank, size = world
    if size == 1:
        pytest.skip("needs two ranks to differ")
    tensor = torch.ones(10 + (rank == size - 1))
    with pytest.raises(RuntimeError, match=rf"differs between ranks: .* on ranks \[{size - 1}\]"):
        dist.all_reduce(tensor)
    tensor = torch.ones(8)
    dist.all_reduce(tensor)  # the backend goes on
    assert torch.all(tensor == size)


def test_broadcast_shapes_that_differ_across_ranks_fail_naming_the_ranks(world):
    rank, size = world
    if size == 1:
        pytest.skip("needs two ranks to differ")
    tensor = torch.ones(5 if rank == 0 else 6)
    with pytest.raises(unimsg.MismatchError, match=r"rank\(s\) (0|1(, \d)*) passed"):
        dist.broadcast(tensor, src=0)
    tensor = torch.full((3,), float(rank))
    dist.broadcast(tensor, src=0)
    assert torch.all(tensor == 0)


def test_a_rank_alone_with_a_wrong_output_fails_and_so_do_the_others(world):
    rank, size = world
    if size == 1:
        pytest.skip("needs two ranks to differ")
    outputs = [torch.zeros(4) for _ in range(size if rank != 0 else size + 1)]
    with pytest.raises(RuntimeError, match="output list holds world size tensors|rejected"):
        dist.all_gather(outputs, torch.ones(4))


def test_a_bad_compression_spec_is_a_config_error(world):
    with pytest.raises(unimsg.ConfigError):
        unimsg.torch.compression_hook("topk:7")
    with pytest.raises(unimsg.ConfigError):
        unimsg.torch.compression_hook("gzip")


def test_splits_that_only_some_ranks_get_wrong_fail_on_every_rank(world):
    rank, size = world
    if size == 1:
        pytest.skip("needs two ranks to differ")
    send = torch.zeros(size * 2)
    splits = [2] * size if rank == 0 else [3] + [2] * (size - 2) + [1]
    with pytest.raises(RuntimeError, match="unequal splits|rank.s. 0 passed|passed arguments"):
        dist.all_to_all_single(torch.zeros(size * 2), send, output_split_sizes=[2] * size,
                               input_split_sizes=splits)
    tensor = torch.full((4,), float(rank))
    dist.broadcast(tensor, src=size - 1)  # in step again
    assert torch.all(tensor == size - 1)


def test_a_dtype_only_one_rank_gets_wrong_fails_on_every_rank(world):
    rank, size = world
    if size == 1:
        pytest.skip("needs two ranks to differ")
    dtype = torch.int16 if rank == size - 1 else torch.float32
    expected = "dtype Short is not one" if rank == size - 1 else rf"on ranks \[{size - 1}\]"
    with pytest.raises(RuntimeError, match=expected):
        dist.all_reduce(torch.ones(6, dtype=dtype))
    tensor = torch.ones(6)
    dist.all_reduce(tensor)  # in step again
    assert torch.all(tensor == size)


def test_a_list_of_tensors_is_refused_on_every_rank(world):
    rank, size = world
    if size == 1:
        pytest.skip("needs two ranks to differ")
    tensors = [torch.ones(3), torch.ones(3)] if rank == 0 else [torch.ones(3)]
    expected = "one tensor per call" if rank == 0 else r"on ranks \[0\]"
    with pytest.raises(RuntimeError, match=expected):
        dist.distributed_c10d._get_default_group().allreduce(tensors).wait()
