"""Command-line overrides checked before Hydra starts: a bad one is one line and exit 2.

Hydra reports a wrong type (``trainer.epochs=three``), a misspelt key or an unknown group option
(``backbone=resnet999``) in a multi-line block that ends in "Set the environment variable
HYDRA_FULL_ERROR=1" and names no fix; in a multirun, a bad value in one sweep axis only surfaces
when its job starts, after the MLflow parent run and earlier jobs. Here every override, and every
value of every swept axis (the command line's and the experiment's ``hydra.sweeper.params``), is
composed with Hydra's Compose API and converted to the typed schema (the same range checks a run
does) once, before any launcher, MLflow run or model exists. Whatever this check does not
understand (``hydra.*`` overrides, Optuna intervals, ``glob``) is left to Hydra, unchanged.
"""

from __future__ import annotations

import difflib
import itertools
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from transferlab.schemas import ConfigError, register_configs, to_typed

# Flags after which Hydra composes nothing or from another config tree: leave those to Hydra.
_SKIP_FLAGS = ("help", "hydra_help", "shell_completion", "config_path", "config_dir", "experimental_rerun")

# The child's signal to its parent that the overrides were refused (its line is already printed).
# SIGUSR1: nothing else in a plain `python -m transferlab.train` process uses it this early (submitit
# preempts with USR2). Windows has none, and no fork: the check runs first there.
_REFUSED = getattr(signal, "SIGUSR1", None)

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _options(group: str, conf_dir: Path) -> list[str]:
    """A group's selectable options (the ``*_schema`` entries are the typed bases, not choices)."""
    folder = conf_dir / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        full = f"{prefix}{key}"
        keys.append(full)
        node = cfg._get_node(key)  # noqa: SLF001 - the node, without resolving interpolations
        if isinstance(node, DictConfig):
            keys += _all_keys(node, f"{full}.")
    return keys


def _is_user(override: Override) -> bool:
    """Project overrides; ``hydra.*`` / ``hydra/...`` belong to Hydra and its plugins."""
    key = override.key_or_group
    return not (key == "hydra" or key.startswith(("hydra.", "hydra/")))


def _values(override: Override) -> list[str] | None:
    """Every value a swept override takes, or None where they are not enumerable (interval, glob)."""
    try:
        return list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - interval()/glob(): the sweeper expands them, not us
        return None


def _combinations(fixed: list[str], swept: dict[str, list[str]]) -> Iterator[list[str]]:
    """The first value of every axis, then each other value once: every value composes at least once."""
    first = {key: values[0] for key, values in swept.items()}
    yield fixed + [f"{k}={v}" for k, v in first.items()]
    for key, values in swept.items():
        for value in values[1:]:
            yield fixed + [f"{k}={value if k == key else v}" for k, v in first.items()]


# Keys that moved to a config group of their own: a launch written for the old layout says where.
MOVED = {
    "data.augment": "augmentation is the augment group: augment=flip is the old data.augment=true; "
    "augment=standard or strong crop at random from the stored image",
}


class Preflight:
    def __init__(self, conf_dir: Path, config_name: str) -> None:
        self.conf_dir, self.config_name = conf_dir, config_name

    def compose(self, overrides: Sequence[str], hydra_node: bool = False) -> DictConfig:
        return compose(self.config_name, overrides=list(overrides), return_hydra_config=hydra_node)

    def check(self, overrides: list[str]) -> DictConfig:
        cfg = self.compose(overrides)
        if OmegaConf.is_interpolation(cfg.paths, "output_dir"):  # ${hydra:runtime...}: set at launch
            cfg.paths.output_dir = str(self.conf_dir.parent / "outputs")
        to_typed(cfg)
        return cfg

    def explain(self, exc: Exception, override: str) -> str:
        """One line: the key, what is wrong, and the fix."""
        if isinstance(exc, ConfigError):
            return str(exc)
        if isinstance(exc, OverrideParseException):
            reason = str(exc).splitlines()[0]
            return (
                f"{override}: cannot be parsed ({reason}). Fix: write key=value; quote values with "
                f"commas or brackets, e.g. key='a,b' (https://hydra.cc/docs/advanced/override_grammar/basic)"
            )
        if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
            group, _, name = exc.missing_cfg_file.rpartition("/")
            options = [o for o in _options(group, self.conf_dir) if not o.endswith("schema")]
            close = difflib.get_close_matches(name, options, n=1)
            hint = f"did you mean {group}={close[0]}? " if close else ""
            return f"{group}={name}: no such option. Fix: {hint}use one of {options}"
        cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
        key = getattr(cause, "full_key", None) or override.split("=", 1)[0].lstrip("+~")
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            return self._unknown_key(key)
        problem = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        return f"{key}: {problem}. Fix: {self._typed_fix(key)}"

    def _unknown_key(self, key: str) -> str:
        if key in MOVED:
            return f"{key}: is no longer a key. Fix: {MOVED[key]}"
        group, _, leaf = key.partition(".")
        options = [o for o in _options(group, self.conf_dir) if not o.endswith("schema")] if leaf else []
        composed = {o: self._try(f"{group}={o}") for o in options}
        # A key of another option of the same group (mode.probe_epochs under mode=feature_extract).
        owners = [o for o, cfg in composed.items() if OmegaConf.select(cfg, key) is not None]
        if owners:
            return f"{key}: not a key of the chosen {group}. Fix: it belongs to {group}={' / '.join(owners)}; select one"
        known = set(_all_keys(self.compose([])))
        for cfg in composed.values():  # data.rooot under data=imagefolder: suggest data.root too
            known |= set(_all_keys(cfg))
        close = difflib.get_close_matches(key, sorted(known), n=1)
        fix = f"did you mean {close[0]}?" if close else "remove it; `--cfg job` prints every key"
        return f"{key}: is not a known key. Fix: {fix}"

    def _typed_fix(self, key: str) -> str:
        default = OmegaConf.select(self.compose([]), key, throw_on_missing=False)
        if default is None:
            return "see `python -m transferlab.train --cfg job` for the key's type"
        kind = _KINDS.get(type(default), type(default).__name__)
        shown = str(default).lower() if isinstance(default, bool) else default
        return f"pass {kind}, e.g. {key}={shown} (the default)"

    def _try(self, override: str) -> DictConfig:
        try:
            return self.compose([override])
        except Exception:  # noqa: BLE001 - an option that does not compose alone owns no key
            return OmegaConf.create()

    def run(self, overrides: list[str], multirun: bool) -> None:
        parsed = OverridesParser.create().parse_overrides(overrides)  # syntax errors raise here
        user = [o for o in parsed if _is_user(o)]
        if multirun:  # the experiment's sweep axes, which the command line overrides key by key
            hydra_cfg = self.compose([o.input_line for o in user if not o.is_sweep_override()], True)
            params = OmegaConf.select(hydra_cfg, "hydra.sweeper.params") or {}
            given = {o.get_key_element() for o in user}
            extra = [f"{k}={v}" for k, v in params.items() if k not in given and isinstance(v, str)]
            user += OverridesParser.create().parse_overrides(extra)
        fixed, swept = [], {}
        for o in user:
            if not o.is_sweep_override():
                fixed.append(o.input_line)
            elif (values := _values(o)) is not None:
                swept[o.get_key_element()] = values
        composed = [self.check(combo) for combo in _combinations(fixed, swept)]
        if multirun:
            _check_sweep_keys(composed)


def _check_sweep_keys(composed: list[DictConfig]) -> None:
    """A misspelt sweep.tune or sweep.replicates key would silently be compared instead of tuned or
    averaged over. A key is known if some job's config has it (mode.backbone_lr_scale, tuned over
    mode=full_finetune,lp_ft beside a feature_extract arm that has no such key)."""
    for role, example in (("tune", "optimizer.lr"), ("replicates", "data.split_seed")):
        keys = {k for cfg in composed for k in OmegaConf.select(cfg, f"sweep.{role}") or []}
        absent = object()  # select's answer for a key a config lacks (a null value is a key)
        for key in sorted(keys):
            if all(OmegaConf.select(cfg, key, default=absent) is absent for cfg in composed):
                raise ConfigError(
                    f"sweep.{role}", f"{key!r} is not a key of any job's config",
                    f"name a key `--cfg job` prints, e.g. sweep.{role}=[{example}]",
                )  # fmt: skip


def check_overrides(argv: list[str], conf_dir: Path, config_name: str) -> None:
    """Exit 2 with one line if a command-line override cannot compose; otherwise return silently."""
    from hydra._internal.utils import get_args_parser  # Hydra's own flags (-m, -cn, --cfg ...)

    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in _SKIP_FLAGS):
        return
    overrides: list[str] = args.overrides or []
    checker = Preflight(conf_dir, args.config_name or config_name)
    with initialize_config_dir(str(conf_dir), version_base="1.3", job_name="preflight"):
        try:
            checker.run(overrides, bool(args.multirun))
        except Exception as exc:  # noqa: BLE001 - explained below, or left to Hydra's own report
            culprit = _culprit(exc, overrides)
            line = checker.explain(exc, culprit) if _explainable(exc) else None
            if line is None:
                return  # not a config problem we understand: Hydra reports it as it would
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)


# Hydra's flags that print something from the config and run no job.
_INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion")


def refuse_a_sweep_inside_torchrun(multirun: bool) -> None:
    """``torchrun ... -m transferlab.train -m ...``: every process would run the whole sweep."""
    if multirun and os.environ.get("TORCHELASTIC_RUN_ID"):  # set by torchrun in every process
        print(
            "error: --multirun: a sweep inside torchrun would run the whole sweep in every process. "
            "Fix: torchrun one run per command, or sweep DDP runs with -m hydra/launcher=slurm_ddp",
            file=sys.stderr,
        )
        sys.exit(2)


def answer_without_compute(argv: list[str], conf_dir: Path, config_name: str) -> Callable[[], None]:
    """An entrypoint's first step, run before torch, timm, torchvision and MLflow are imported
    (seconds on a small machine): a bad override is refused (exit 2), and ``--help``,
    ``--hydra-help``, ``--cfg``, ``--info`` and ``--shell-completion`` are answered by Hydra from
    the config alone (exit 0). Anything else returns, for the real entrypoint to run: it calls the
    returned function before its first use of the config (see :func:`check_beside`)."""
    from hydra._internal.utils import get_args_parser

    register_configs()  # the schemas the YAML options extend
    args, _ = get_args_parser().parse_known_args(argv)

    def check() -> None:
        check_overrides(argv, conf_dir, config_name)
        refuse_a_sweep_inside_torchrun(args.multirun)

    if not any(getattr(args, flag, None) for flag in _INFO_FLAGS):
        return check_beside(check)
    check()
    # Hydra answers these flags itself, before calling the task function: it never runs. It names the
    # job after the task's module: the entrypoint's (hydra.job.name=train, as a real run's).
    _no_task.__module__ = f"transferlab.{config_name}"
    hydra.main(version_base="1.3", config_path=str(conf_dir), config_name=config_name)(_no_task)()
    sys.exit(0)


def check_beside(check: Callable[[], None]) -> Callable[[], None]:
    """Run ``check`` (which prints a refusal and exits 2) in a forked child while this process goes
    on importing torch, timm and MLflow: on 2 cores the overrides' check (composing the config and the
    typed schema's checks, which import torch.optim) then runs beside the imports. A refusal still comes at once: the child prints its line and signals
    this process, which exits 2 wherever its imports are. The returned ``wait`` gives the child's
    verdict: it returns when the check passed, and otherwise exits with the child's code (its
    output already printed). Only on Linux, in a process of one thread: elsewhere (Windows: no fork;
    macOS, where a forked child that imports torch's frameworks is not safe; a Jupyter kernel or a
    debugger, with threads) the check runs here, first."""
    if sys.platform != "linux" or threading.active_count() > 1 or _REFUSED is None:
        check()
        return lambda: None
    sys.stdout.flush()  # a buffer left unflushed would be printed twice, by the child too
    sys.stderr.flush()
    if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:  # inherited: waitpid would find no child
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    parent = os.getpid()
    before = signal.signal(_REFUSED, lambda *_: os._exit(2))
    pid = os.fork()
    if pid == 0:  # the child: one verdict, then gone without running the parent's exit handlers
        code = 1
        try:
            code = 0
            check()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        except KeyboardInterrupt:
            code = 130  # the parent got the same Ctrl-C: it stops on its own
        except BaseException:  # noqa: BLE001 - a crash, reported as the check before would have
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stderr.flush()
                sys.stdout.flush()
                if code == 2 and os.getppid() == parent:  # not a reused pid: the parent is alive
                    os.kill(parent, _REFUSED)
            except BaseException:  # noqa: BLE001, S110 - a closed pipe, a parent gone: exit anyway
                pass
            os._exit(min(code, 255))

    def wait() -> None:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        signal.signal(_REFUSED, before)
        if code != 0:
            sys.exit(code if code > 0 else 128 - code)  # killed by signal N: 128 + N, as a shell says

    return wait


def _no_task(cfg: DictConfig) -> None:
    raise AssertionError("unreachable: Hydra answers its information flags without running the task")


def _explainable(exc: Exception) -> bool:
    return isinstance(exc, (ConfigError, OverrideParseException, MissingConfigException)) or isinstance(
        exc.__cause__ or exc, OmegaConfBaseException
    )


def _culprit(exc: Exception, overrides: list[str]) -> str:
    """The command-line override an error is about (for messages that do not name their key)."""
    if isinstance(exc, OverrideParseException) and exc.override is not None:
        return str(exc.override)
    text = str(exc)
    return next((o for o in overrides if o in text), next(itertools.chain(overrides, [""])))
