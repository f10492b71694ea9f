"""Joining and leaving the gloo group of the distributed tests' worker processes.

A worker is started as ``python WORKER RANK WORLD STORE_PORT OUT_DIR`` by a test that serves a TCPStore on
127.0.0.1 (the port the OS picked, so no port race); :func:`join` connects to it, :func:`leave` ends the worker.
"""

import os
import sys
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

TIMEOUT = timedelta(seconds=60)  # every wait is bounded: a lost peer fails the run instead of hanging it


def join(rank: int, world: int, port: int) -> None:
    """Join the gloo group of ``world`` ranks through the test's TCPStore on ``port``."""
    torch.set_num_threads(1)  # the ranks share two cores
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)


def leave() -> NoReturn:
    """Destroy the group and end the process now, skipping the interpreter's finalization.

    ``destroy_process_group`` does not stop gloo's threads (a ``gloo_tcp_loop`` and two ``pt_gloo_runloop``
    per group): they are joined only when the ``ProcessGroup`` object is freed, and after FSDP2 it is not,
    since its ``DeviceMesh`` objects stay referenced from DTensor's ``functools.lru_cache`` tables
    (``MeshTopoInfo.build_from_mesh``, ``_gen_transform_infos``, sharding propagation). Live gloo threads at
    interpreter finalization aborted about one worker run in five with "terminate called without an active
    exception" (exit code -6). Call it only after every result is written and closed.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
