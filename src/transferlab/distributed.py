"""One run over several processes: ``torchrun`` (or Slurm tasks through submitit) and ``torch.distributed``.

``torchrun --standalone --nproc_per_node=N -m transferlab.train ...`` starts N copies of the same
command; each is one rank of the run. They build the same model from the same seed and the same data,
draw the same epoch order, and each trains on its share of every global batch (``trainer.batch_size``
images per process, ``trainer.batch_size x N`` per update); DistributedDataParallel averages the
gradients, so every rank holds the same weights after every update. Validation, test and the
frozen-feature pass are split by batches across the ranks and gathered, so every rank sees the metrics
of the whole split. Rank 0 alone talks to MLflow and writes the checkpoint (every rank's RNG state in
it); every rank resumes from it. A stop (SIGTERM from torchrun or Slurm) is agreed on after each update,
so all ranks stop at the same step.

A single process (no ``WORLD_SIZE`` in the environment) takes none of these paths: it computes exactly
what it did before this module existed. Nothing here pickles: tensors travel as tensors.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from transferlab.schemas import ConfigError

log = logging.getLogger("transferlab.distributed")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class World:
    """Where this process stands in the run: its rank, how many there are, its GPU on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def is_main() -> bool:
    return _world.rank == 0


def rank_zero_only(fn: F) -> F:
    """Run ``fn`` on rank 0 only (Lightning's idiom): what logs to MLflow, once per run whatever N."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if _world.rank == 0 else None

    return wrapper  # type: ignore[return-value]


# -- joining ----------------------------------------------------------------------------------------
def launched_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, or from a Slurm/submitit job of several
    tasks (``hydra/launcher=slurm_ddp``: submitit's TorchDistributedEnvironment sets torchrun's
    variables and the rendezvous address from the job); None for a single process."""
    tasks = os.environ.get("SUBMITIT_LOCAL_NTASKS") or os.environ.get("SLURM_NTASKS") or "1"
    if "WORLD_SIZE" not in os.environ and int(tasks) > 1:
        _export_submitit()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def _export_submitit() -> None:
    try:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except (ImportError, RuntimeError) as exc:  # not a submitit job: a plain srun of several tasks
        log.warning("several Slurm tasks but no submitit job environment (%s): running one process", exc)


def setup(device: str, backend: str, sync_batchnorm: bool) -> World:
    """Join the run's process group when launched as one of several ranks; check the request first.

    ``device``: ``trainer.device``; each rank takes the GPU of its local rank (``auto`` / ``cuda``).
    ``backend``: ``trainer.dist_backend`` (auto: NCCL on CUDA, gloo on CPU). Bad requests are refused
    on every rank alike, before the process group (and any compute): one line each, exit 2.
    """
    global _world
    if _world.active:  # already joined (a second train() in this process)
        return _world
    ranks = launched_ranks()
    if ranks is None:
        if sync_batchnorm:
            log.info("trainer.sync_batchnorm: one process, nothing to synchronise")
        return _world
    rank, size, local_rank = ranks
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device == "mps" or (
        device == "auto" and not torch.cuda.is_available() and torch.backends.mps.is_available()
    ):
        raise ConfigError(
            "trainer.device",
            f"{size} processes on Apple's GPU (mps): torch.distributed has no backend for it",
            "run one process (python -m transferlab.train), or pass trainer.device=cpu under torchrun",
        )
    if device.startswith("cuda:"):
        raise ConfigError(
            "trainer.device",
            f"{device} names one GPU, but this run has {size} processes: each takes the GPU of its local rank",
            "use trainer.device=auto or trainer.device=cuda (CUDA_VISIBLE_DEVICES chooses the GPUs)",
        )
    if cuda:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                "trainer.device",
                f"process {local_rank} of this node has no GPU: the node has {count} CUDA device(s)",
                f"start at most {count} process(es) per node (torchrun --nproc_per_node={max(count, 1)})",
            )
    chosen = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    if chosen == "nccl" and not cuda:
        raise ConfigError(
            "trainer.dist_backend",
            "nccl runs on CUDA devices only, and this run computes on the CPU",
            "use trainer.dist_backend=gloo (or auto: nccl on GPUs, gloo on CPU)",
        )
    if not dist.is_backend_available(chosen):
        raise ConfigError(
            "trainer.dist_backend",
            f"this torch {torch.__version__} build has no {chosen} backend",
            "use trainer.dist_backend=gloo (or auto)",
        )
    if sync_batchnorm and not cuda:
        raise ConfigError(
            "trainer.sync_batchnorm",
            "PyTorch's SyncBatchNorm runs on GPUs only, and this run computes on the CPU",
            "drop trainer.sync_batchnorm (each process then normalises its own share of a batch)",
        )
    if cuda:
        torch.cuda.set_device(local_rank)
    # A rank that dies leaves the others waiting in a collective: torchrun stops them, and the timeout
    # is a last resort for launchers that do not (a Slurm task is killed with its job step).
    dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=30))
    _world = World(rank, size, local_rank, chosen)
    if rank != 0:  # one voice: the other ranks say only what goes wrong
        logging.getLogger("transferlab").setLevel(logging.WARNING)
    log.info("process group: %d processes, backend %s", size, chosen)
    return _world


def teardown() -> None:
    global _world
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def device_for(name: str) -> torch.device | None:
    """The device a rank computes on when CUDA is used over several processes: its local GPU."""
    if _world.active and (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return torch.device("cuda", _world.local_rank)
    return None


# -- the training step ------------------------------------------------------------------------------
def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over what trains in this stage (rebuilt per stage: its gradient hooks
    are registered for the parameters that require gradients when it is built)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm statistics over the global batch; timm's converter keeps its norm+act layers whole."""
    from timm.layers import convert_sync_batchnorm as convert

    return convert(model)


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch (contiguous; sizes differ by one at most)."""
    return torch.tensor_split(batch, _world.size)[_world.rank]


def _collective_device() -> torch.device:
    return torch.device("cuda", _world.local_rank) if _world.backend == "nccl" else torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """The sums over the ranks (float64: counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on one: a stop or a prune that every rank obeys at once."""
    if not _world.active:
        return flag
    return all_sum([float(flag)])[0] > 0


def gather_rows(mine: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (same trailing shape, any number of rows), in rank order, on every rank."""
    device = _collective_device()
    rows = torch.tensor([mine.shape[0]], device=device)
    counts = [torch.zeros_like(rows) for _ in range(_world.size)]
    dist.all_gather(counts, rows)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *mine.shape[1:]), dtype=mine.dtype, device=device)
    padded[: mine.shape[0]] = mine.to(device)
    parts = [torch.zeros_like(padded) for _ in range(_world.size)]
    dist.all_gather(parts, padded)
    return [p[: int(c.item())].to(mine.device) for p, c in zip(parts, counts, strict=True)]


def shares(batches: int) -> bool:
    """Whether :func:`map_batches` splits this many batches across the ranks (each gets one or more)."""
    return _world.active and batches >= _world.size


def map_batches(batches: list[torch.Tensor], compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``compute`` over ``batches``, rank r taking batches r, r+N, ...; the outputs of all, in order.

    Whole batches, never re-cut: each output is what one process computes for that batch, so a
    gathered result is the same bits as a single process's (the feature cache's key relies on it).
    Fewer batches than ranks (a tiny split): every rank computes them all (see :func:`shares`).
    """
    if not shares(len(batches)):
        return torch.cat([compute(b) for b in batches])
    gathered = gather_rows(torch.cat([compute(b) for b in batches[_world.rank :: _world.size]]))
    sizes = [len(b) for b in batches]
    out, taken = [], [0] * _world.size
    for j, size in enumerate(sizes):  # batch j came from rank j % N, after that rank's earlier ones
        owner = j % _world.size
        out.append(gathered[owner][taken[owner] : taken[owner] + size])
        taken[owner] += size
    return torch.cat(out)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank updated its own from
    its share of the last batches; evaluation and the checkpoint use rank 0's, as DDP's next forward would."""
    if not _world.active:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def lead(main: Callable[[Callable[[], Any]], Any], joined: Callable[[], Any]) -> Any:
    """Rank 0 runs ``main(collective)``; when (if) it calls ``collective()``, every rank runs ``joined()``
    together with it. The feature cache: rank 0 holds the entry's lock, and on a miss all ranks compute
    the features (sharded), rank 0 stores them. Returns ``main``'s result on rank 0, None elsewhere."""
    go, done = 1.0, 0.0
    device = _collective_device()

    def signal(value: float) -> None:
        dist.broadcast(torch.tensor([value], device=device), src=0)

    if _world.is_main:

        def collective() -> Any:
            signal(go)
            return joined()

        try:
            return main(collective)
        finally:
            signal(done)
    while True:
        flag = torch.zeros(1, device=device)
        dist.broadcast(flag, src=0)
        if flag.item() == done:
            return None
        joined()


def rng_states() -> torch.Tensor | None:
    """Every rank's torch generator states (CPU, and its GPU's), one row per rank, on every rank; the
    shares of a batch differ in size, so dropout moves each rank's generator by its own amount."""
    if not _world.active:
        return None
    mine = torch.get_rng_state()
    if torch.cuda.is_available() and _world.backend == "nccl":
        mine = torch.cat([mine, torch.cuda.get_rng_state(_world.local_rank)])
    return torch.stack([row[0] for row in gather_rows(mine.unsqueeze(0))])


def set_rng_states(rows: torch.Tensor | None) -> None:
    if rows is None or not _world.active:
        return
    mine = rows[_world.rank]
    cpu = len(torch.get_rng_state())
    # Copies: torch reads a state tensor from its storage's start (a row view of rank > 0 crashes it).
    torch.set_rng_state(mine[:cpu].clone())
    if len(mine) > cpu:
        torch.cuda.set_rng_state(mine[cpu:].clone(), _world.local_rank)
