"""unimsg for PyTorch (docs/python.md).

``import unimsg.torch`` registers the torch.distributed backend ``"unimsg"``. Under ``mpirun`` or
``unimsg-run`` it also starts unimsg's runtime (collective: every rank imports it) and sets what
``init_process_group``'s default ``env://`` rendezvous reads (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) from MPI, so that::

    import torch.distributed as dist
    import unimsg.torch
    dist.init_process_group("unimsg")

is all a training script needs. Allreduce goes through unimsg's engine (fusion, response cache,
dtype and shape checked across ranks), the other collectives through its communicator;
``compression_hook`` compresses DDP's gradient buckets; ``Monitor`` and ``Checkpoints`` are the
runtime's monitor and checkpointer.
"""

import atexit
import datetime
import io
import ipaddress
import json
import math
import os
import socket
import sys

import torch
import torch.distributed as dist

from .. import _C, ConfigError

BACKEND = "unimsg"

__all__ = ["BACKEND", "init", "rank", "size", "compression_hook", "CompressionHook", "Monitor",
           "Checkpoints", "restart_count", "engine_stats", "finish"]


def _launched_by_mpi():
    return any(name in os.environ for name in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"))


def init():
    """Collective: starts the runtime once per process (MPI, the bus, heartbeats and the fault
    handler, the monitor, the engine) and arranges its orderly end at the interpreter's exit."""
    _C.init()
    _install_exit_handlers()


def rank():
    init()
    return _C.rank()


def size():
    init()
    return _C.size()


def engine_stats():
    """The engine's counters (cycles, cache hits, bytes reduced, wire bytes...) as a dict."""
    init()
    return _C.engine_stats()


def finish():
    """Collective: ends the runtime (run at the interpreter's exit; later calls do nothing)."""
    if _C.initialized():
        _C.finish()


_exit_handlers_installed = False


def _install_exit_handlers():
    global _exit_handlers_installed
    if _exit_handlers_installed:
        return
    _exit_handlers_installed = True
    previous_hook = sys.excepthook

    def abort_on_uncaught(kind, value, traceback):
        # The other ranks would wait for this one in their next collective: end the job now
        # (status 1: not a fault unimsg-run restarts from).
        previous_hook(kind, value, traceback)
        if _C.initialized() and _C.size() > 1:
            sys.stderr.flush()
            sys.stdout.flush()
            _C.abort(1)

    sys.excepthook = abort_on_uncaught
    atexit.register(finish)


# -- the backend ------------------------------------------------------------------------------

def _rank0_address():
    """Collective: an address of rank 0's host that every rank shares a subnet with (the first
    of rank 0's non-loopback IPv4 addresses that is; namespace hosts have no name service), or
    None."""
    candidates = ""
    if _C.rank() == 0:
        candidates = " ".join(address for _, address, _ in _C.ipv4_interfaces()
                              if not address.startswith("127."))
    candidates = _C.broadcast_string(candidates, 0).split()
    networks = [ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)
                for _, address, netmask in _C.ipv4_interfaces()]
    reachable = [int(any(ipaddress.IPv4Address(candidate) in network for network in networks))
                 for candidate in candidates]
    everywhere = _C.min_over_ranks(reachable) if candidates else []
    return next((c for c, shared in zip(candidates, everywhere) if shared), None)


def _free_port(address):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def _set_rendezvous_from_mpi():
    """RANK and WORLD_SIZE from MPI; MASTER_ADDR and MASTER_PORT decided by rank 0 (loopback on
    one host, across hosts an address of its host every rank shares a subnet with; a free port)
    and broadcast. Every rank takes part whatever its own environment says: rank 0 decides."""
    init()
    os.environ.setdefault("RANK", str(_C.rank()))
    os.environ.setdefault("WORLD_SIZE", str(_C.size()))
    found = _rank0_address() if len(set(_C.hosts())) > 1 else "127.0.0.1"
    decision = ""
    if _C.rank() == 0:
        try:
            address = os.environ.get("MASTER_ADDR") or found
            if not address:
                raise ConfigError("the ranks span several hosts and no address of rank 0's host "
                                  "is on a subnet every rank has: set MASTER_ADDR")
            decision = f"{address} {os.environ.get('MASTER_PORT') or _free_port(address)}"
        except (OSError, ConfigError) as error:  # told to every rank, which would wait otherwise
            decision = f"! {error}"
    decision = _C.broadcast_string(decision, 0)
    if decision.startswith("!"):
        raise ConfigError(f"unimsg.torch: rank 0 could not set up the rendezvous: {decision[2:]}")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = decision.split()


def _create_backend(store, group_rank, group_size, timeout):
    init()
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    return _C.create_backend(store, group_rank, group_size, timeout)


def _register():
    if hasattr(dist.Backend, BACKEND.upper()):
        return
    if _C.torch_version_major >= 2:
        dist.Backend.register_backend(BACKEND, _create_backend, devices=["cpu"])
    else:
        dist.Backend.register_backend(BACKEND, _create_backend)


_register()
if _launched_by_mpi():
    _set_rendezvous_from_mpi()


# -- compression as a DDP comm hook ----------------------------------------------------------

class CompressionHook:
    """A DDP comm hook that averages each gradient bucket through unimsg's compressed allreduce
    (error feedback kept per bucket by the engine). A bucket that held NaN/Inf on any rank comes
    back all NaN on every rank: ``step_skipped()`` then says so (on every rank alike), and the
    optimizer step should be skipped::

        hook = unimsg.torch.compression_hook("topk:0.01")
        ddp.register_comm_hook(state=None, hook=hook)
        loss.backward()
        if not hook.step_skipped():
            optimizer.step()
    """

    _created = 0  # hooks made in this process: in the same order on every rank

    def __init__(self, spec, group=None, name=None):
        self.spec = _C.canonical_compression(spec)  # a ConfigError names what is wrong
        self.group = group
        # Error feedback is kept per name: every hook (every DDP model) needs its own.
        self.name = name if name is not None else f"ddp{CompressionHook._created}"
        CompressionHook._created += 1
        self.skipped_steps = 0
        self._nonfinite = False
        self.__name__ = self.__qualname__ = f"unimsg_compression_hook[{self.spec}]"  # DDP logs it

    def __call__(self, state, bucket):
        group = self.group if self.group is not None else dist.distributed_c10d._get_default_group()
        buffer = bucket.buffer()
        # The count is part of the name: DDP rebuilds its buckets after the first step, and the
        # error feedback of a bucket is kept per name.
        name = f"{self.name}.bucket{bucket.index()}.{buffer.numel()}"
        work = _C.allreduce_compressed(group, buffer, name, self.spec)

        def result(future):
            tensor = future.value()[0]
            if tensor.numel() > 0 and math.isnan(tensor[0].item()):
                self._nonfinite = True
            return tensor

        return work.get_future().then(result)

    def step_skipped(self):
        """Whether the last backward's gradients held NaN/Inf on some rank (then resets)."""
        skipped, self._nonfinite = self._nonfinite, False
        if skipped:
            self.skipped_steps += 1
        return skipped


def compression_hook(spec, group=None, name=None):
    """The comm hook for ``DistributedDataParallel.register_comm_hook(state, hook)``: every spec
    the engine takes ("fp16", "bf16", "int8", "onebit", "topk:0.01", "randomk:0.01",
    "powersgd:4", with options such as ":noef" or ":seed=7"). ``name`` (default: one per hook,
    numbered in the order hooks are made, which must be the same on every rank) prefixes the
    buckets' names in the engine, which keeps error feedback per name."""
    return CompressionHook(spec, group=group, name=name)


# -- the runtime's services ------------------------------------------------------------------

class Monitor:
    """The runtime's monitor (metrics.jsonl, Prometheus /metrics, the live page, the timeline,
    as UNIMSG_MONITOR_* configure it) and the heartbeat's notion of progress. Call ``step()``
    after every optimizer step; under unimsg-run, UNIMSG_FAULT_INJECT acts here too."""

    def __init__(self, total_steps=None):
        init()
        if total_steps is not None:
            _C.set_total_steps(int(total_steps))

    def step(self, step, loss=float("nan"), samples=0):
        _C.step(int(step), float(loss), int(samples))

    def start_timing(self):
        """Steps are timed from here (after a pause that is not training, such as evaluation)."""
        _C.start_timing()

    def event(self, kind, text):
        _C.event(str(kind), str(text))


def restart_count():
    """Which launch this is under unimsg-run (0: the first; UNIMSG_RESTART_COUNT)."""
    text = os.environ.get("UNIMSG_RESTART_COUNT", "0")
    if not text.isdigit():
        raise ConfigError(f"UNIMSG_RESTART_COUNT={text!r}: expected a whole number")
    return int(text)


class Checkpoints:
    """Checkpoints of a ``torch.save``-able state (state dicts of the model and the optimizer,
    where the data stands...) through unimsg's checkpointer: atomic, checksummed, the newest
    ``keep`` kept; restore takes the newest intact one any rank holds. Every rank holds the same
    replicated state in data-parallel training, so rank 0 writes.

    The directory defaults to unimsg-run's --checkpoint-dir (UNIMSG_CHECKPOINT_DIR)."""

    def __init__(self, directory=None, keep=3, writers=(0,)):
        init()
        directory = directory or os.environ.get("UNIMSG_CHECKPOINT_DIR")
        if not directory:
            raise ConfigError("unimsg.torch.Checkpoints: no directory (pass one, or run under "
                              "unimsg-run --checkpoint-dir)")
        self.directory = directory
        self.writes = _C.rank() in writers
        self._checkpointer = _C.Checkpointer(directory, keep) if self.writes else None

    def save(self, step, state, metadata=None):
        """Written in the background (``flush()`` waits)."""
        if not self.writes:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._checkpointer.save(int(step), {"state": buffer.getvalue()},
                                json.dumps(metadata or {}))

    def flush(self):
        if self.writes:
            self._checkpointer.flush()

    def load(self):
        """Collective: (step, state, metadata) of the newest intact checkpoint any rank holds,
        or None when there is none."""
        checkpointer = self._checkpointer or _C.Checkpointer(self.directory, 3)
        found = checkpointer.load_newest()
        if found is None:
            return None
        step, blobs, metadata, _source = found
        if "state" not in blobs:
            raise _C.CheckpointError(f"the checkpoint of step {step} holds no Python state")
        state = torch.load(io.BytesIO(blobs["state"]))
        return step, state, json.loads(metadata)
