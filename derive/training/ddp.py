"""``derive train --ddp K``: K processes share every batch, with layer modules sharded over it.

Each process draws the same batch (same generator, same seed), keeps its 1/K of the rows and runs
the per-layer modules that ``derive --shard n`` generates: their reductions over the batch
all-reduce, so each process computes the whole batch's loss and the whole batch's parameter
gradients from its own rows, and the SGD updates stay identical everywhere. The result is the
single-process run's, up to the order of floating-point sums.
"""

from __future__ import annotations

import socket
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from . import mlp

if TYPE_CHECKING:
    from .data import Dataset
    from .train import TrainConfig, TrainRun


def write_sharded_modules(folder: Path) -> None:
    """The layers of :func:`mlp.layer_step`, generated with ``--shard n`` and verified, into ``folder``."""
    from .. import api

    for name in mlp.LAYERS:
        api.run(api.resolve(name), out_dir=folder, shard="n")


def load_modules(folder: Path) -> SimpleNamespace:
    """``folder``'s generated layer modules, by op name."""
    from ..verify import load_module

    return SimpleNamespace(**{name: load_module((folder / f"{name}.py").read_text(), name) for name in mlp.LAYERS})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, config: TrainConfig, data: Dataset, folder: str, port: int) -> None:
    """One process: its slice of every batch, the sharded modules; rank 0 saves the run."""
    import torch.distributed as dist

    from .train import train

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        step = partial(mlp.layer_step, modules=load_modules(Path(folder)), group=dist.group.WORLD)
        run = train(replace(config, ddp=0), data, step_fn=step, rows=(rank, world))
        if rank == 0:
            torch.save({"params": tuple(run.params), "losses": run.losses, "seconds": run.seconds}, f"{folder}/run.pt")
    finally:
        dist.destroy_process_group()


def train_distributed(config: TrainConfig, data: Dataset) -> TrainRun:
    """Train on ``config.ddp`` processes spawned here; the run as rank 0 saw it (all ranks agree)."""
    import torch.multiprocessing as mp

    from .train import TrainRun

    with tempfile.TemporaryDirectory(prefix="derive-ddp-") as folder:
        write_sharded_modules(Path(folder))
        mp.spawn(_worker, args=(config.ddp, config, data, folder, _free_port()), nprocs=config.ddp, join=True)
        result = torch.load(Path(folder) / "run.pt")
    return TrainRun(
        config=config, params=mlp.Params(*result["params"]), losses=result["losses"], seconds=result["seconds"]
    )
