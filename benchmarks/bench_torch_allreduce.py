#!/usr/bin/env python3
"""torch.distributed.all_reduce busbw with backend "unimsg" against "gloo", in one run over the
same ranks, interleaved round by round (so that both see the same machine load), nccl-tests'
columns (busbw = algbw * 2(n-1)/n):

    mpirun -np 4 python3 benchmarks/bench_torch_allreduce.py [-b 1K] [-e 64M] [-f 4] [-n 20]
        [-w 3] [-r 5] [--json]

(PYTHONPATH=build/python from a build tree.) Each size: r rounds; each round times n
all_reduce calls (after w warm-up calls) on unimsg, then on gloo; the time of a call is the
slowest rank's; the median round of each backend is reported, and their ratio.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

import unimsg.torch  # noqa: F401  (the backend; the rendezvous from MPI)


def size_arg(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    try:
        value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a byte count such as 1024, 64K or 8M")
    if value < 4:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 4 bytes (one float)")
    return value


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-b", "--minbytes", type=size_arg, default=size_arg("1K"))
    parser.add_argument("-e", "--maxbytes", type=size_arg, default=size_arg("64M"))
    parser.add_argument("-f", "--stepfactor", type=int, default=4)
    parser.add_argument("-n", "--iters", type=int, default=20)
    parser.add_argument("-w", "--warmup", type=int, default=3)
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per size")
    args = parser.parse_args()
    if args.stepfactor < 2 or args.iters < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("need -f >= 2, -n >= 1, -w >= 0, -r >= 1")
    if args.maxbytes < args.minbytes:
        parser.error("-e is below -b")
    return args


def time_calls(tensor, group, iters, warmup, bookkeeping):
    """Seconds per call on the slowest rank (agreed over `bookkeeping`, the other group: the
    timed group's calls stay the timed ones alone)."""
    tensor.fill_(1)  # (the sums grow by the world size per call: no overflow within a round)
    for _ in range(warmup):
        dist.all_reduce(tensor, group=group)
    dist.barrier(group=group)
    started = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor, group=group)
    elapsed = torch.tensor([(time.perf_counter() - started) / iters], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=bookkeeping)
    return elapsed.item()


def check(tensor, size, bookkeeping):
    """The sum of ones over the ranks: #wrong as nccl-tests counts it (the most any rank saw)."""
    tensor.fill_(1)
    dist.all_reduce(tensor)
    wrong = torch.tensor([int((tensor != size).sum().item())], dtype=torch.int64)
    dist.all_reduce(wrong, op=dist.ReduceOp.MAX, group=bookkeeping)
    return int(wrong.item())


def main():
    args = parse_args()
    dist.init_process_group("unimsg")
    rank, size = dist.get_rank(), dist.get_world_size()
    groups = {"unimsg": dist.group.WORLD, "gloo": dist.new_group(backend="gloo")}
    factor = 2 * (size - 1) / size if size > 1 else 1.0
    if rank == 0 and not args.json:
        print(f"# torch.distributed all_reduce, float32 sum, {size} ranks, interleaved rounds: "
              f"{args.rounds} x {args.iters} calls (median round)")
        print(f"# {'size':>10} {'count':>10} {'unimsg us':>10} {'busbw':>7} {'gloo us':>10} "
              f"{'busbw':>7} {'ratio':>6} {'#wrong':>6}")
    nbytes = args.minbytes
    while nbytes <= args.maxbytes:
        count = nbytes // 4
        tensor = torch.ones(count)
        seconds = {name: [] for name in groups}
        for _ in range(args.rounds):
            for name, group in groups.items():
                other = groups["gloo" if name == "unimsg" else "unimsg"]
                seconds[name].append(time_calls(tensor, group, args.iters, args.warmup, other))
        wrong = check(tensor, size, groups["gloo"])
        median = {name: statistics.median(values) for name, values in seconds.items()}
        busbw = {name: count * 4 / value / 1e9 * factor for name, value in median.items()}
        ratio = busbw["unimsg"] / busbw["gloo"] if busbw["gloo"] > 0 else float("inf")
        if rank == 0:
            if args.json:
                print(json.dumps({"bytes": count * 4, "count": count, "ranks": size,
                                  "unimsg_us": median["unimsg"] * 1e6,
                                  "unimsg_busbw": busbw["unimsg"],
                                  "gloo_us": median["gloo"] * 1e6, "gloo_busbw": busbw["gloo"],
                                  "ratio": ratio, "wrong": wrong}), flush=True)
            else:
                print(f"  {count * 4:>10} {count:>10} {median['unimsg'] * 1e6:>10.1f} "
                      f"{busbw['unimsg']:>7.3f} {median['gloo'] * 1e6:>10.1f} "
                      f"{busbw['gloo']:>7.3f} {ratio:>6.2f} {wrong:>6}", flush=True)
        if wrong:
            return 1
        nbytes *= args.stepfactor
    if rank == 0 and not args.json:
        print("# unimsg / gloo busbw: the ratio column")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
