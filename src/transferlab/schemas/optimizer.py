"""``conf/optimizer/``: leaves for ``hydra.utils.instantiate``, called with the trainable parameter groups."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.schemas.errors import ConfigError, positive


def check_optimizer_target(target: str) -> None:
    """``_target_`` names code to call: only optimizers from ``torch.optim`` (an allow-list).

    The same check guards configs read back from a run (``transferlab.reproduce``): a logged
    ``optimizer._target_=os.system`` is refused here, before anything is imported or called.
    """
    module, _, name = target.rpartition(".")
    if module == "torch.optim" and name and not name.startswith("_"):
        # On use, not at import: report and every --help read the schemas without loading torch.
        import torch.optim

        candidate = getattr(torch.optim, name, None)
        if isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
            return
    raise ConfigError(
        "optimizer._target_",
        f"{target!r} is not an optimizer class of torch.optim",
        "use optimizer=adam, adamw or sgd, or a torch.optim class such as torch.optim.RMSprop",
    )


def _check_betas(betas: tuple[float, float]) -> None:
    if not all(0 <= b < 1 for b in betas):
        raise ConfigError("optimizer.betas", f"must be in [0, 1), got {list(betas)}", "use [0.9,0.999]")


@dataclass
class OptimizerConfig:
    """A leaf for ``hydra.utils.instantiate``: called with the trainable parameters only."""

    _target_: str = MISSING
    _partial_: bool = True
    lr: float = MISSING
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_optimizer_target(self._target_)
        positive("optimizer.lr", self.lr, "pass a positive learning rate, e.g. optimizer.lr=1e-3")
        if self.weight_decay < 0:
            raise ConfigError(
                "optimizer.weight_decay",
                f"must be >= 0, got {self.weight_decay}",
                "use 0 to disable weight decay",
            )


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adam"
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self.betas)


@dataclass
class AdamWConfig(OptimizerConfig):
    _target_: str = "torch.optim.AdamW"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self.betas)


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ConfigError("optimizer.momentum", f"must be in [0, 1), got {self.momentum}", "use 0.9")
