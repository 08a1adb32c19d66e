"""unimsg from Python.

``import unimsg.torch`` registers the torch.distributed backend ``"unimsg"`` (docs/python.md).
The runtime itself (MPI, the bus, heartbeats, the monitor, the engine) lives in the extension
module ``unimsg._C``, one per process.
"""

import ctypes
import ctypes.util

import torch  # noqa: F401  (libtorch's Python bindings first: _C links against them)


def _load_mpi_globally():
    # Open MPI's components are plug-ins that resolve libmpi's symbols from the global namespace;
    # a Python extension is loaded with local symbols, so libmpi is opened globally first (as
    # mpi4py does): the one _C was linked against, as the build recorded it.
    try:
        from ._build import MPI_LIBRARY
    except ImportError:
        MPI_LIBRARY = None
    ctypes.CDLL(MPI_LIBRARY or ctypes.util.find_library("mpi") or "libmpi.so.40",
                mode=ctypes.RTLD_GLOBAL)


_load_mpi_globally()

from . import _C  # noqa: E402

Error = _C.Error
ConfigError = _C.ConfigError
MismatchError = _C.MismatchError
TimeoutError = _C.TimeoutError
ShutdownError = _C.ShutdownError
CheckpointError = _C.CheckpointError

__all__ = ["Error", "ConfigError", "MismatchError", "TimeoutError", "ShutdownError",
           "CheckpointError"]
