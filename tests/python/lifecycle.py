"""The backend's lifecycle on 2 or more ranks, run by CTest with UNIMSG_COLLECTIVE_TIMEOUT_S=1
(tests/python/CMakeLists.txt): what pytest's shared session cannot show.

1. A collective waits as long as init_process_group's timeout says, not unimsg's own default:
   rank 0 arrives 3 s late at a barrier and an allreduce, and nothing is aborted.
2. Groups made and destroyed do not leave their threads behind.
3. A group destroyed while a collective with a Python callback is pending (torch releases it
   holding the GIL the callback needs) still completes it: no hang.
4. After the runtime is finished, a collective is a ShutdownError, never a crash.
"""

import datetime
import os
import time

import torch
import torch.distributed as dist

import unimsg
import unimsg.torch


def threads():
    return len(os.listdir("/proc/self/task"))


dist.init_process_group("unimsg", timeout=datetime.timedelta(seconds=60))
rank, size = dist.get_rank(), dist.get_world_size()
assert os.environ.get("UNIMSG_COLLECTIVE_TIMEOUT_S") == "1"

if rank == 0:
    time.sleep(3)
dist.barrier()
tensor = torch.ones(4)
if rank == 0:
    time.sleep(3)
dist.all_reduce(tensor)
assert torch.all(tensor == size)
print(f"rank {rank}: waited past UNIMSG_COLLECTIVE_TIMEOUT_S for a late rank", flush=True)

group = dist.new_group()  # a first one: its threads are the baseline
dist.all_reduce(torch.ones(1), group=group)
dist.destroy_process_group(group)
before = threads()
for _ in range(5):
    group = dist.new_group()
    dist.all_reduce(torch.ones(1), group=group)
    dist.destroy_process_group(group)
after = threads()
assert after <= before + 1, f"threads {before} -> {after} over 5 groups made and destroyed"
print(f"rank {rank}: threads {before} -> {after} over 5 groups", flush=True)

group = dist.new_group()
if rank == 1:
    time.sleep(1)
work = dist.all_reduce(torch.ones(10), group=group, async_op=True)
future = work.get_future().then(lambda f: f.value()[0].sum())
del work
dist.destroy_process_group(group)
assert future.wait().item() == 10 * size
print(f"rank {rank}: a group destroyed with a callback pending completed it", flush=True)

unimsg.torch.finish()
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as error:
    assert "shut down" in str(error) or "finished" in str(error), error
    print(f"rank {rank}: after finish: {error}", flush=True)
else:
    raise AssertionError("a collective after finish() did not fail")
print(f"rank {rank}: PASS", flush=True)
