"""Rerun a logged run from what it logged, and print its metrics next to the new ones.

python -m transferlab.reproduce RUN_ID                               # the default local store
python -m transferlab.reproduce RUN_ID --tracking-uri http://127.0.0.1:5000
python -m transferlab.reproduce RUN_ID trainer.device=cpu paths.cache_dir=/tmp/c   # where, not what

The configuration is rebuilt from the run's ``overrides.json`` (its group choices and command-line
overrides) composed with today's ``conf/``, then every semantic value that differs from the run's
logged ``config.yaml`` is pinned to the logged value. Nothing the run's files name is imported or
called on the way: the result goes through the same typed schema as any command line, whose
``optimizer._target_`` must be a ``torch.optim`` optimizer (an allow-list), and a ``_target_``
anywhere else is refused. Exit status 0 when every result metric is identical, 1 otherwise: timing
and cache use (``*_s``, ``*_cache_hit``) are shown beside them but never decide the verdict.
Below the table, the packages and platform entries of the two runs' ``reproducibility.json`` that
differ (the CPU's instruction set among them): identical results are promised only where none does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from transferlab.schemas import ConfigError, register_configs, semantic_config, to_typed
from transferlab.tracking import flatten, is_bookkeeping

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# What a rerun may change: where things go and what hardware runs them, never what is computed.
WHERE = ("paths.", "mlflow.", "trainer.device=", "trainer.progress=", "trainer.num_workers=")
# Logged overrides that said where the original run lived: today's run lives here.
DROPPED = (
    "hydra.",
    "paths.",
    "mlflow.tracking_uri=",
    "mlflow.artifact_location=",
    "resume",
    "mlflow.run_name=",
)


def _value(value: Any) -> str:
    """A Hydra override value for a plain YAML value (strings quoted, lists and null as YAML)."""
    if isinstance(value, str):
        return json.dumps(value)  # a double-quoted string is Hydra override grammar
    return json.dumps(value)  # numbers, true/false, null and lists are valid override values too


def _find_targets(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        found = [f"{prefix}_target_"] if "_target_" in node else []
        for key, child in node.items():
            found += _find_targets(child, f"{prefix}{key}.")
        return found
    return []


def _compose(choices: dict[str, str], overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*(f"{g}={o}" for g, o in choices.items()), *overrides])


def rebuild(
    logged_overrides: dict[str, Any], logged_config: str, where: list[str]
) -> tuple[DictConfig, list[str]]:
    """The run's config, composed and validated; returns it and the overrides that made it."""
    choices = {
        k: str(v)
        for k, v in logged_overrides.get("choices", {}).items()
        if not k.startswith("hydra") and v not in (None, "None")  # an empty optional group
    }
    overrides = [o for o in logged_overrides.get("overrides", []) if not o.lstrip("+~").startswith(DROPPED)]
    overrides = [o for o in overrides if not any(o.lstrip("+~").startswith(f"{g}=") for g in choices)]
    overrides += ["resume=false", *where]
    raw = _compose(choices, overrides)
    # Safe YAML (OmegaConf's loader is yaml.SafeLoader): plain values only, nothing constructed.
    logged = flatten(semantic_config(OmegaConf.to_container(OmegaConf.create(logged_config), resolve=True)))
    now = flatten(semantic_config(OmegaConf.to_container(raw, resolve=True)))
    pins = [
        f"{key}={_value(value)}"
        for key, value in logged.items()
        if now.get(key, object()) != value and not key.startswith("mlflow.")
    ]
    if pins:  # today's defaults differ from the run's: the run's values win
        logging.getLogger("transferlab.reproduce").info("pinned to the run's logged values: %s", pins)
        raw = _compose(choices, [*overrides, *pins])
    resolved = OmegaConf.to_container(raw, resolve=True)
    extra = [t for t in _find_targets(resolved) if t != "optimizer._target_"]
    if extra:
        raise ConfigError(
            extra[0], "names code to call outside the optimizer", "remove it from the run's config"
        )
    return raw, [*overrides, *pins]


def _table(old: dict[str, float], new: dict[str, float]) -> tuple[str, bool]:
    keys = sorted(new)  # the run's final metrics (per-epoch histories are not returned by train)
    rows = [f"{'metric':<28} {'logged run':>16} {'rerun':>16}  same"]
    same = True
    for key in keys:
        a, b = old.get(key), new.get(key)
        bookkeeping = is_bookkeeping(key)  # timing and cache hits: shown, never the verdict
        equal = a == b
        same &= equal or bookkeeping
        mark = "(bookkeeping)" if bookkeeping else ("yes" if equal else "NO")
        fmt = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
        rows.append(f"{key:<28} {fmt(a):>16} {fmt(b):>16}  {mark}")
    return "\n".join(rows), same


def _json_artifact(client: MlflowClient, run_id: str, name: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, name, tmp)).read_text())


def _environment(client: MlflowClient, run_id: str) -> dict[str, str]:
    """The packages and platform a run recorded, flat (``packages.torch``, ``platform.cpu_capability``)."""
    try:
        record = _json_artifact(client, run_id, "reproducibility.json")
    except (MlflowException, OSError, ValueError):  # a run without the record: nothing to compare
        return {}
    flat = flatten({k: record.get(k, {}) for k in ("packages", "platform")})
    return {k: str(v) for k, v in flat.items()}


def _environment_table(old: dict[str, str], new: dict[str, str]) -> str:
    """What differs between the two runs' machines and packages: where a DIFFERENT verdict can come from.
    Only what the logged run recorded is compared (older runs recorded less)."""
    differ = [k for k in sorted(old) if old[k] != new.get(k)]
    if not differ:
        return "environment: the packages and platform the logged run recorded are the same here"
    rows = [
        "environment: results are promised identical only on the same CPU kind and packages; these differ:",
        *(f"  {k:<26} {old[k]!r:>24} {new.get(k, '-')!r:>24}" for k in differ),
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferlab.reproduce", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_id")
    parser.add_argument("--tracking-uri", help="the store holding the run (default: this repository's)")
    parser.add_argument("where", nargs="*", help=f"overrides starting with {', '.join(WHERE)}")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from transferlab.train import train  # after argument parsing: --help stays instant

    try:
        bad = [o for o in args.where if not o.startswith(WHERE)]
        if bad:
            raise ConfigError(bad[0].split("=")[0], "would change what is computed", f"use only {WHERE}")
        where = list(args.where)
        if args.tracking_uri:
            where.append(f"mlflow.tracking_uri={args.tracking_uri}")
        uri = args.tracking_uri or str(_compose({}, where).mlflow.tracking_uri)
        client = MlflowClient(uri)
        try:
            run = client.get_run(args.run_id)
        except Exception as exc:  # noqa: BLE001 - any store error is one line
            raise ConfigError(
                "run_id",
                f"cannot read run {args.run_id} from {uri} ({exc})"[:300],
                "check the id and --tracking-uri",
            ) from None
        with tempfile.TemporaryDirectory() as tmp:
            logged_overrides = _json_artifact(client, args.run_id, "overrides.json")
            logged_config = Path(client.download_artifacts(args.run_id, "config.yaml", tmp)).read_text()
            out = tempfile.mkdtemp(prefix="reproduce-")
            raw, used = rebuild(logged_overrides, logged_config, [*where, f"paths.output_dir={out}"])
            raw.mlflow.run_name = f"reproduce-{args.run_id[:8]}"
            cfg = to_typed(raw)
        print(f"rerunning {args.run_id} with: {' '.join(used)}", file=sys.stderr)
        new = train(cfg, raw, logged_overrides.get("choices", {}), used)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import mlflow

    rerun = mlflow.last_active_run()
    if rerun is not None:
        client.set_tag(rerun.info.run_id, "reproduces", args.run_id)
    table, same = _table(dict(run.data.metrics), {k: float(v) for k, v in new.items()})
    print(table)
    if rerun is not None:
        print(_environment_table(_environment(client, args.run_id), _environment(client, rerun.info.run_id)))
    commit = run.data.tags.get("mlflow.source.git.commit")
    print(
        f"\nlogged run {args.run_id} (commit {commit}) vs rerun {rerun.info.run_id if rerun else '?'}: "
        + ("identical" if same else "DIFFERENT (see the NO rows)")
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
