"""Start T local ranks (or join a torchrun job) with bounded waits.

:func:`launch` spawns ``world_size`` processes on this machine (gloo on CPU,
NCCL with one GPU per rank when ``backend="nccl"``), runs ``fn(ctx, *args)``
in each, and returns every rank's return value. Nothing hangs forever:

- the world size is checked against ``L × G`` before any process starts;
- every process group gets ``timeout_s``: a collective whose peers never
  arrive raises in the waiting ranks after that long;
- the parent polls the ranks; when one dies (exception, signal, ``os._exit``)
  the others are terminated and :class:`DistributedJobError` names the rank
  and its cause; the whole job is also bounded by ``job_timeout_s``.

With torchrun, call :func:`init_from_env` at the top of the script instead.
"""
from __future__ import annotations

import datetime
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from .plan import check_layout


class DistributedJobError(RuntimeError):
    """A rank failed, was killed, or the job ran past its time limit."""


@dataclass(frozen=True)
class RankContext:
    """What a launched function receives first: its rank and the world."""

    rank: int
    world_size: int
    sharding_group_size: Optional[int]
    backend: str
    timeout_s: float


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 60.0,
                       init_method: Optional[str] = None) -> None:
    """``dist.init_process_group`` with a bounded timeout (every later collective inherits it)."""
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, init_method=init_method,
                            timeout=datetime.timedelta(seconds=timeout_s))


def init_from_env(sharding_group_size: Optional[int] = None, backend: Optional[str] = None,
                  timeout_s: float = 120.0) -> RankContext:
    """Initialise from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``).

    Checks ``WORLD_SIZE`` against ``sharding_group_size`` before joining."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedJobError(f"environment variables {missing} are not set: start this script with "
                                  "torchrun --nproc-per-node=T ... or use recopt.distributed.launch()")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if sharding_group_size is not None:
        check_layout(world, sharding_group_size)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    init_process_group(rank, world, backend, timeout_s, init_method="env://")
    return RankContext(rank, world, sharding_group_size, backend, timeout_s)


def _worker(local_rank: int, fn: Callable, args: tuple, world_size: int, sharding_group_size: Optional[int],
            backend: str, timeout_s: float, init_method: str, result_dir: str) -> None:
    # torch.multiprocessing passes the process index first
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(local_rank), str(world_size)
    torch.set_num_threads(1)
    try:
        init_process_group(local_rank, world_size, backend, timeout_s, init_method)
        ctx = RankContext(local_rank, world_size, sharding_group_size, backend, timeout_s)
        result = fn(ctx, *args)
        with open(os.path.join(result_dir, f"rank{local_rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        with open(os.path.join(result_dir, f"rank{local_rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def launch(fn: Callable[..., Any], world_size: int, args: tuple = (), *, sharding_group_size: Optional[int] = None,
           backend: str = "gloo", timeout_s: float = 60.0, job_timeout_s: Optional[float] = 600.0) -> List[Any]:
    """Run ``fn(ctx: RankContext, *args)`` on ``world_size`` local ranks; return their results by rank.

    ``fn`` must be importable (module level) and its results picklable.
    ``timeout_s`` bounds every collective; ``job_timeout_s`` the whole job.
    Raises :class:`DistributedJobError` naming the first failing rank.
    """
    check_layout(world_size, sharding_group_size if sharding_group_size is not None else world_size)
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise DistributedJobError(f"backend='nccl' needs one GPU per rank: {world_size} ranks, "
                                  f"{torch.cuda.device_count()} GPUs")
    import torch.multiprocessing as mp

    result_dir = tempfile.mkdtemp(prefix="recopt_launch_")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    try:
        ctx = mp.start_processes(_worker, args=(fn, args, world_size, sharding_group_size, backend, timeout_s,
                                                init_method, result_dir),
                                 nprocs=world_size, join=False, start_method="spawn")
        while True:
            try:
                if ctx.join(timeout=0.5):
                    break
            except mp.ProcessExitedException as e:
                raise DistributedJobError(_failure_message(e.error_index, result_dir,
                                                           f"exited with code {e.exit_code}"
                                                           + (f" ({_signal_name(e.exit_code)})"
                                                              if e.exit_code and e.exit_code < 0 else ""),
                                                           world_size)) from None
            except mp.ProcessRaisedException as e:
                raise DistributedJobError(_failure_message(e.error_index, result_dir, "raised", world_size)
                                          + f"\n{e}") from None
            if job_timeout_s is not None and time.monotonic() - start > job_timeout_s:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                for p in ctx.processes:
                    p.join(5)
                    if p.is_alive():
                        p.kill()
                alive = [i for i, p in enumerate(ctx.processes) if p.exitcode is None]
                raise DistributedJobError(f"the {world_size}-rank job ran past job_timeout_s={job_timeout_s}s "
                                          f"and was stopped (ranks still running: {alive})")
        results = []
        for r in range(world_size):
            with open(os.path.join(result_dir, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _failure_message(rank: int, result_dir: str, how: str, world_size: int) -> str:
    msg = f"rank {rank} of {world_size} {how}; the other ranks were stopped"
    err = os.path.join(result_dir, f"rank{rank}.err")
    if os.path.exists(err):
        with open(err) as f:
            tail = f.read().strip().splitlines()[-1:]
        msg += f" (rank {rank}: {tail[0] if tail else ''})"
    return msg
