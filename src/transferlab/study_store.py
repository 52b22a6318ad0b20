"""What an Optuna study searches and where it is stored: the override grammar as distributions, the
storage, and a stored study found again only for the same search (see :mod:`transferlab.study`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from transferlab.schemas import ConfigError

SEARCH_ATTR = "transferlab.search"  # the study's search space, fixed overrides and direction


def distribution(override: Override) -> BaseDistribution | None:
    """A sweep override as an Optuna distribution (upstream's grammar); None for a fixed value."""
    if not override.is_sweep_override():
        return None
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if isinstance(value, RangeSweep):  # shuffle(range(...)): the order is random, the set is not
            choices.sort()
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(float(value.start), float(value.stop), step=float(value.step))
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if not isinstance(value, IntervalSweep):
        raise ValueError(f"{type(value).__name__} cannot be searched by Optuna")
    as_int = isinstance(value.start, int) and isinstance(value.end, int)
    kind = IntDistribution if as_int else FloatDistribution
    return kind(value.start, value.end, log="log" in value.tags)


def search_space(lines: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """``hydra.sweeper.params`` and the command line -> (distributions by key, fixed override lines).

    A key given twice takes its last value (the command line after the params), as Hydra's own
    sweeper does; a range Optuna refuses (low > high, a log interval from 0) is one line.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(list(lines))
    except Exception as exc:  # noqa: BLE001 - Hydra's parse errors: one line
        raise ConfigError(
            "hydra.sweeper.params", str(exc).splitlines()[0], "fix the override syntax"
        ) from None
    last = {override.get_key_element(): override for override in parsed}
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for key, override in last.items():
        try:
            found = distribution(override)
        except ValueError as exc:
            raise ConfigError(
                f"hydra.sweeper.params.{key}",
                f"{override.input_line}: {exc}",
                "e.g. tag(log, interval(1e-5, 1e-2)) (low < high, > 0 on a log scale), choice(a, b), range(1, 5)",
            ) from None
        if found is None:
            assert override.input_line is not None
            fixed.append(override.input_line)
        else:
            space[key] = found
    return space, fixed


def open_storage(storage: str | None) -> Any:
    """An RDB URL or a journal file path -> an Optuna storage (None: in memory); one line if it cannot open."""
    if storage is None:
        return None
    try:
        if "://" in storage:
            if storage.startswith("sqlite:///"):
                Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(storage)
        from optuna.storages.journal import JournalFileBackend

        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(storage))
    except Exception as exc:  # noqa: BLE001 - any driver's error: the same one line
        raise ConfigError(
            "hydra.sweeper.storage",
            f"cannot open {shown(storage)} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})",
            "pass an RDB URL that answers (sqlite:///path/study.db, postgresql://user@host/db) or a "
            "journal file path this user can write (path/study.log), or null for an in-memory study",
        ) from None


def shown(storage: str | None) -> str:
    """The storage as it may be printed and tagged: without a password."""
    if storage is None:
        return "memory"
    if "://" in storage and "@" in storage:
        scheme, rest = storage.split("://", 1)
        userinfo, host = rest.rsplit("@", 1)
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else storage
    return storage


def open_study(
    name: str, storage: Any, shown_storage: str, direction: str, space: dict, fixed: list[str]
) -> optuna.Study:
    """The named study, created or loaded (its sampler is set after); refused when it was created for
    another search."""
    search = {
        "direction": direction,
        "space": {k: distribution_to_json(v) for k, v in sorted(space.items())},
        "fixed": sorted(fixed),
    }
    study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True)
    found = study.user_attrs.get(SEARCH_ATTR)
    if found is None:
        study.set_user_attr(SEARCH_ATTR, search)
    elif found != search:
        differs = [k for k in search if found.get(k) != search[k]]
        raise ConfigError(
            "hydra.sweeper.study_name",
            f"study {name!r} in {shown_storage} was created with another {' and '.join(differs)} "
            f"(stored: {found[differs[0]]}; now: {search[differs[0]]})",
            "choose another hydra.sweeper.study_name for this search, or delete the stored one: "
            f"optuna delete-study --study-name {name} --storage <url>",
        )
    return study
