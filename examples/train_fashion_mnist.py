#!/usr/bin/env python3
"""Data-parallel CNN training on Fashion-MNIST with PyTorch's own DistributedDataParallel over
the torch.distributed backend "unimsg": the C++ main job's model and recipe, from Python.

    mpirun -np 4 python3 examples/train_fashion_mnist.py [--epochs 5] [--compress topk:0.01]
    unimsg-run -np 4 --checkpoint-dir ckpt -- python3 examples/train_fashion_mnist.py \
        --checkpoint-every 50      # a rank lost: the survivors are re-ranked and resume

(PYTHONPATH=build/python from a build tree; docs/python.md.) --backend gloo runs the same job on
PyTorch's Gloo, for comparison.
"""

import argparse
import gzip
import json
import os
import struct
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import unimsg.torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 7 * 7, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not an IDX file (too short)")
    zero, kind, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or kind != 0x08 or dims not in (1, 3):
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    body = data[4 + 4 * dims:]
    expected = 1
    for extent in shape:
        expected *= extent
    if len(body) != expected:
        raise ValueError(f"{path}: {len(body)} bytes of data where the header says {expected}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def find(directory, stem):
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise FileNotFoundError(f"{stem}(.gz) is not in {directory}")


def load(directory, split):
    images = read_idx(find(directory, f"{split}-images-idx3-ubyte"))
    labels = read_idx(find(directory, f"{split}-labels-idx1-ubyte")).long()
    images = images.float().div_(255).sub_(0.2860).div_(0.3530).unsqueeze(1)  # mean, std
    return images, labels


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256,
                        help="global batch (split evenly across the ranks)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--lr-decay-epoch", type=int, default=4,
                        help="from this epoch (1-based) on, the learning rate is a fifth (0: never)")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads per rank (0: the cores divided by the ranks)")
    parser.add_argument("--limit", type=int, default=0, help="first N training samples (0: all)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test samples (0: all)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: never)")
    parser.add_argument("--compress", default="none",
                        help="DDP comm hook: fp16, bf16, int8, onebit, topk:0.01, powersgd:4...")
    parser.add_argument("--backend", default="unimsg", choices=["unimsg", "gloo"])
    parser.add_argument("--checkpoint-dir", default=os.environ.get("UNIMSG_CHECKPOINT_DIR", ""))
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="checkpoint every N steps (0: never); under unimsg-run a relaunch "
                             "resumes from the newest")
    parser.add_argument("--json", action="store_true", help="one JSON line with the results")
    parser.add_argument("--min-accuracy", type=float, default=0.0,
                        help="exit with status 1 when the final test accuracy is lower")
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0 or not 0 <= args.momentum < 1:
        parser.error("need --epochs >= 1, --batch-size >= 1, --lr > 0, 0 <= --momentum < 1")
    if args.compress != "none" and args.backend != "unimsg":
        parser.error("--compress is unimsg's comm hook: use it with --backend unimsg")
    if args.checkpoint_every and not args.checkpoint_dir:
        parser.error("--checkpoint-every needs --checkpoint-dir (or unimsg-run's)")
    return args


def evaluate(model, images, labels, rank, size):
    """Each rank scores every size-th test sample; the counts are summed."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        mine = torch.arange(rank, images.shape[0], size)
        for chunk in mine.split(1000):
            predicted = model(images[chunk]).argmax(1)
            correct[0] += (predicted == labels[chunk]).sum()
            correct[1] += chunk.numel()
    dist.all_reduce(correct)
    model.train()
    return correct[0].item() / correct[1].item()


def main():
    args = parse_args()
    dist.init_process_group(args.backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    if args.batch_size % size:
        raise SystemExit(f"--batch-size {args.batch_size} does not split evenly over {size} ranks")
    local_ranks = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", size))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_ranks))
    train_images, train_labels = load(args.data_dir, "train")
    test_images, test_labels = load(args.data_dir, "t10k")
    if args.limit:
        train_images, train_labels = train_images[:args.limit], train_labels[:args.limit]
    if args.test_limit:
        test_images, test_labels = test_images[:args.test_limit], test_labels[:args.test_limit]

    torch.manual_seed(args.seed)
    model = DistributedDataParallel(Net())  # broadcasts rank 0's weights
    hook = None
    if args.compress != "none":
        hook = unimsg.torch.compression_hook(args.compress)
        model.register_comm_hook(state=None, hook=hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    local_batch = args.batch_size // size
    steps_per_epoch = train_images.shape[0] // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    monitor = unimsg.torch.Monitor(total_steps) if args.backend == "unimsg" else None
    checkpoints = None
    start_step = 0
    if args.checkpoint_dir and args.backend == "unimsg":
        checkpoints = unimsg.torch.Checkpoints(args.checkpoint_dir)
        if unimsg.torch.restart_count() > 0:
            found = checkpoints.load()
            if found is not None:
                start_step, state, _ = found
                model.module.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                if rank == 0:
                    print(f"resumed from the checkpoint of step {start_step} "
                          f"(launch {unimsg.torch.restart_count()}, {size} ranks)", flush=True)

    trained_samples, train_seconds, accuracy, loss_sum, batches = 0, 0.0, 0.0, 0.0, 0
    step = start_step
    for epoch in range(step // steps_per_epoch, args.epochs):
        lr = args.lr / 5 if args.lr_decay_epoch and epoch + 1 >= args.lr_decay_epoch else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(train_images.shape[0],
                               generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        started = time.perf_counter()
        loss_sum, batches = 0.0, 0
        while step < (epoch + 1) * steps_per_epoch and step < total_steps:
            first = (step % steps_per_epoch) * args.batch_size + rank * local_batch
            index = order[first:first + local_batch]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(train_images[index]), train_labels[index])
            loss.backward()
            if hook is None or not hook.step_skipped():
                optimizer.step()
            step += 1
            loss_sum, batches = loss_sum + loss.item(), batches + 1
            trained_samples += index.numel()
            if monitor:
                monitor.step(step, loss.item(), index.numel())
            if checkpoints and args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoints.save(step, {"model": model.module.state_dict(),
                                        "optimizer": optimizer.state_dict()})
        train_seconds += time.perf_counter() - started
        accuracy = evaluate(model, test_images, test_labels, rank, size)
        if rank == 0 and not args.json:
            print(f"epoch {epoch + 1}: loss {loss_sum / max(batches, 1):.4f}, test accuracy "
                  f"{accuracy:.4f}, {trained_samples * size / max(train_seconds, 1e-9):.0f} "
                  f"samples/s", flush=True)
        if step >= total_steps:
            break
    if checkpoints:
        checkpoints.flush()
    samples_per_s = trained_samples * size / max(train_seconds, 1e-9)
    if rank == 0:
        result = {"backend": args.backend, "ranks": size, "compress": args.compress,
                  "steps": step, "accuracy": accuracy, "samples_per_s": samples_per_s,
                  "train_seconds": train_seconds}
        print(json.dumps(result) if args.json else
              f"done: test accuracy {accuracy:.4f}, {samples_per_s:.0f} samples/s", flush=True)
    dist.destroy_process_group()
    if accuracy < args.min_accuracy:
        print(f"test accuracy {accuracy:.4f} is below --min-accuracy {args.min_accuracy}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
