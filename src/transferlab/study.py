"""An Optuna study as a Hydra sweep: stored, resumed after a kill, trials in parallel, one MLflow parent.

``hydra/sweeper=study`` (``hparams_search=optuna_lr_wd`` selects it; the plugin's shim is
``src/hydra_plugins/transferlab_study``). Each batch of ``hydra.sweeper.n_jobs`` trials is asked from the
study, launched through the configured launcher (``hydra/launcher=joblib`` runs a batch in parallel;
submitit on a cluster) and told its value, ``train.main``'s best validation metric (never a test metric).

* ``hydra.sweeper.storage``: an RDB URL (``sqlite:///study.db``, ``postgresql://...``) or a journal
  file path (``study.log``, optuna's ``JournalFileBackend``, for file systems shared between nodes);
  null keeps the study in memory. ``hydra.sweeper.study_name`` names it there.
* ``hydra.sweeper.n_trials`` counts the study's finished trials (complete, pruned or failed), not this
  launch's: relaunching a killed search continues the same study, trial numbers continue, finished
  trials are not rerun, and a trial the kill left RUNNING is launched again with its own parameters
  (its job resumes its MLflow run from its checkpoint: same config, same hash).
* A study found under that name with another search space, fixed overrides or direction is refused
  in one line (exit 2) before any trial: its trials would answer another question.
* ``hydra.sweeper.sampler`` (any optuna sampler by ``_target_``): a seeded one is seeded with its seed
  plus the number of trials the study holds, so a relaunch does not propose the first launch's values
  again; the search as a whole stays reproducible for the same sequence of launches.
* One sweeper process per study at a time (parallel trials come from the launcher): a second one
  would take the first's RUNNING trials for a stopped launch's and run them again.
* MLflow: the sweep's parent run (:mod:`transferlab.sweep`) is the study's; a relaunch reopens the
  first launch's parent (stored in the study) instead of starting a second one. Each child is tagged
  ``optuna.trial``; at the end the parent carries ``optuna.best_*`` tags and ``optuna_trials.csv``.

Why our own sweeper: the released ``hydra-optuna-sweeper`` (1.3.0) pins ``optuna<3``, whose RDB storage
does not work under SQLAlchemy 2 (which MLflow 3 needs); upstream's unreleased Optuna 4 version asks
``n_trials`` new trials on every launch (no resume); ``hydra-optuna-mlflow-sweeper`` 0.1.3 installs
under upstream's own ``hydra_plugins.hydra_optuna_sweeper`` package (the two cannot be installed side
by side), starts an MLflow parent run of its own beside ours and leaves a killed trial RUNNING. The
override grammar is upstream's (``interval``, ``tag(log, ...)``, ``range``, ``choice``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from transferlab import sweep
from transferlab.schemas import ConfigError
from transferlab.study_store import open_storage, open_study, search_space, shown

log = logging.getLogger("transferlab.study")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
PARENT_ATTR = "transferlab.mlflow_parent_run_id"


# -- the study's one MLflow parent run ------------------------------------------------------
def tag_job(info: sweep.SweepInfo, sweep_dir: str, num: int, tags: dict[str, str]) -> None:
    """Tags on job ``num``'s run (e.g. the Optuna trial it answered), when it ran one: a job skipped as
    already FINISHED points at an earlier run, which keeps the tags it has."""
    record = sweep.job_record(info, sweep_dir, num)
    if record is not None and record.get("status") == "skipped":
        return
    run_id = sweep.job_run(info, num, sweep_dir)
    if run_id is not None:
        client = MlflowClient(info.tracking_uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)


def discard_parent(sweep_dir: str) -> None:
    """Delete the parent run this launch created before any job ran (a sweeper refused its input)."""
    info = sweep.SweepInfo.load(sweep_dir)
    if info is not None:
        MlflowClient(info.tracking_uri).delete_run(info.parent_run_id)
        sweep.SweepInfo.path(sweep_dir).unlink()


def adopt_parent(sweep_dir: str, run_id: str) -> sweep.SweepInfo | None:
    """Continue under an earlier launch's parent run (a resumed Optuna study is one parent): it is
    reopened, and the parent this launch created, which holds nothing yet, is deleted. When that run
    is gone or in another experiment, this launch's own parent stays."""
    info = sweep.SweepInfo.load(sweep_dir)
    if info is None or info.parent_run_id == run_id:
        return info
    client = MlflowClient(info.tracking_uri)
    try:
        earlier = client.get_run(run_id)
    except MlflowException:
        earlier = None
    if (
        earlier is None
        or earlier.info.lifecycle_stage != "active"
        or earlier.info.experiment_id != info.experiment_id
    ):
        log.warning(
            "the study's parent run %s is gone: its trials continue under %s", run_id, info.parent_run_id
        )
        return info
    client.delete_run(info.parent_run_id)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "resumes", str(int(earlier.data.tags.get("resumes", "0")) + 1))
    info = dataclasses.replace(info, parent_run_id=run_id)
    info.save(sweep_dir)
    log.info("continuing under the study's parent run %s", run_id)
    return info


class Study:
    """The sweeper's work; ``hydra_plugins.transferlab_study.StudySweeper`` builds it lazily."""

    def __init__(
        self,
        sampler: Any,
        direction: str,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        params: DictConfig | dict | None,
        pruner: Any = None,
    ) -> None:
        self.pruner = pruner  # checked here; built again in each trial's job from the config
        self.sampler_cfg, self.direction, self.storage = sampler, direction, storage
        self.study_name, self.n_trials, self.n_jobs = study_name, n_trials, n_jobs
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = str(config.hydra.sweep.dir)

    # -- the sweep ------------------------------------------------------------------------------
    def check(self) -> None:
        """The sweeper's own settings (Hydra's schema checked their types)."""
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(
                "hydra.sweeper.direction", f"{self.direction!r} is no direction", "maximize or minimize"
            )
        for key, value in (("n_trials", self.n_trials), ("n_jobs", self.n_jobs)):
            if value < 1:
                raise ConfigError(
                    f"hydra.sweeper.{key}", f"must be >= 1, got {value}", "e.g. 20 trials, 1 job"
                )
        if self.pruner is not None and self.storage is None:
            raise ConfigError(
                "hydra.sweeper.pruner",
                "a trial's job reports its epochs to the study, which an in-memory study cannot receive",
                "set hydra.sweeper.storage (e.g. sqlite:///optuna/study.db), or hydra.sweeper.pruner=null",
            )
        if self.storage is not None and not self.study_name:
            raise ConfigError(
                "hydra.sweeper.study_name",
                "a stored study needs a name, by which a relaunch finds it",
                "set hydra.sweeper.study_name=<name>",
            )

    def sweep(self, arguments: list[str]) -> None:
        try:
            self.check()
            space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
            if not space:
                raise ConfigError(
                    "hydra.sweeper.params",
                    "nothing to search: no key has a distribution",
                    "e.g. hydra.sweeper.params.optimizer.lr='tag(log, interval(1e-5, 1e-2))'",
                )
            info = sweep.SweepInfo.load(self.sweep_dir)
            name = self.study_name or (info.name if info else "study")
            study = open_study(
                name, open_storage(self.storage), shown(self.storage), self.direction, space, fixed
            )
            sampler = self._sampler(len(study.trials))
            if sampler is not None:  # None (hydra.sweeper.sampler=null): the study keeps Optuna's default
                study.sampler = sampler
        except ConfigError as exc:  # bad input: one line, exit 2, the parent run made for it removed
            discard_parent(self.sweep_dir)
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        info = self._one_parent(study)
        log.info(
            "study %r in %s: %d of %d trials finished",
            name,
            shown(self.storage),
            self._finished(study),
            self.n_trials,
        )
        # (number, values, id): the id lets a trial's job report to the study (trial._trial_id is the
        # storage's key, which optuna.trial.Trial(study, id) takes: optuna's own way to rebuild a trial).
        stale = [
            (t.number, t.params, t._trial_id)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        ]
        if stale:  # left RUNNING by a launch that was killed: launched again with their own values
            log.info("relaunching trial(s) %s, left running by a stopped launch", [n for n, _, _ in stale])
        queue = stale  # asked but not launched yet: a stopped launch's, or held back (below)
        while (room := self.n_trials - self._finished(study)) > 0:
            batch: list[tuple[int, dict[str, Any], int]] = []
            for trial in list(queue):
                if len(batch) < min(self.n_jobs, room) and all(trial[1] != b[1] for b in batch):
                    batch.append(trial)
                    queue.remove(trial)
            while len(batch) < self.n_jobs and len(batch) + len(queue) < room:
                asked = study.ask(space)
                trial = (asked.number, asked.params, asked._trial_id)
                # The same values twice in one batch would train one config twice at once (the second
                # stops at the first's lock): it waits for the next batch, where the first's run answers it.
                (queue if any(trial[1] == b[1] for b in batch) else batch).append(trial)
            self._share(name, batch)
            self._run(study, batch, fixed, info)
        for number, _, _ in queue:  # n_trials was lowered below what a stopped launch had started
            study.tell(number, state=TrialState.FAIL)
        self._finish(study, name, info)

    def _share(self, name: str, batch: list[tuple[int, dict[str, Any], int]]) -> None:
        """What a trial's job needs to report its epochs to the study (only when it prunes)."""
        node = OmegaConf.select(self.config, "hydra.sweeper.pruner")
        shared = {
            "storage": self.storage,
            "study_name": name,
            "pruner": OmegaConf.to_container(node, resolve=True) if node is not None else None,
            "trial_ids": {str(number): trial_id for number, _, trial_id in batch},
        }
        path = Path(self.sweep_dir) / sweep.STATE_DIR / sweep.STUDY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(shared, indent=2))

    def _sampler(self, earlier: int) -> Any:
        """``hydra.sweeper.sampler``, its seed moved on by the study's ``earlier`` trials: a seeded sampler
        started again from its seed would propose the first launch's values again (TPE's start-up
        trials are random draws), which the sweep would skip as configs already run."""
        node = OmegaConf.select(self.config, "hydra.sweeper.sampler")
        if node is None:
            return self.sampler_cfg  # built by Hydra, or None: Optuna's default
        spec = OmegaConf.to_container(node, resolve=True)
        assert isinstance(spec, dict)
        if spec.get("seed") is not None:
            spec["seed"] = int(spec["seed"]) + earlier
        return instantiate(spec)

    @staticmethod
    def _finished(study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=FINISHED))

    def _one_parent(self, study: optuna.Study) -> sweep.SweepInfo | None:
        """The study's MLflow parent run: the first launch's, reopened by every relaunch."""
        first = study.user_attrs.get(PARENT_ATTR)
        info = adopt_parent(self.sweep_dir, first) if first else sweep.SweepInfo.load(self.sweep_dir)
        if info is not None and first != info.parent_run_id:
            study.set_user_attr(PARENT_ATTR, info.parent_run_id)
        return info

    def _run(
        self,
        study: optuna.Study,
        batch: list[tuple[int, dict[str, Any], int]],
        fixed: list[str],
        info: sweep.SweepInfo | None,
    ) -> None:
        """Launch a batch (the job number is the trial number) and tell the study each value."""
        groups: list[list[tuple[int, dict[str, Any], int]]] = []
        for trial in batch:  # consecutive numbers share a launch; a relaunched trial may stand apart
            if groups and groups[-1][-1][0] + 1 == trial[0]:
                groups[-1].append(trial)
            else:
                groups.append([trial])
        for group in groups:
            overrides = [
                tuple(f"{k}={v}" for k, v in params.items()) + tuple(fixed) for _, params, _ in group
            ]
            returns = self.launcher.launch(overrides, initial_job_idx=group[0][0])
            for (number, _, _), ret in zip(group, returns, strict=True):
                try:
                    value = float(ret.return_value)  # a failed job (sweep.FailedJob) raises here
                except Exception as exc:  # noqa: BLE001 - recorded by the sweep callback; the study goes on
                    log.warning("trial %d failed: %s", number, exc)
                    study.tell(number, state=TrialState.FAIL)
                else:
                    if isinstance(ret.return_value, sweep.PrunedValue):  # its job's pruner ended it
                        study.tell(number, state=TrialState.PRUNED)
                    else:
                        study.tell(number, value)  # a NaN is told FAIL by Optuna
                if info is not None:
                    tag_job(info, self.sweep_dir, number, {"optuna.trial": str(number)})

    def _finish(self, study: optuna.Study, name: str, info: sweep.SweepInfo | None) -> None:
        """The best trial on the parent run and in ``optimization_results.yaml``; the trials as CSV."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results: dict[str, Any] = {"name": "optuna", "study": name, "storage": shown(self.storage)}
        tags = {
            "optuna.study": name,
            "optuna.storage": shown(self.storage),
            "optuna.trials": str(len(study.trials)),
        }
        # Over every launch of the study (the sweep.* tags count this launch's jobs only).
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            tags[f"optuna.{state.name.lower()}"] = str(len(study.get_trials(deepcopy=False, states=(state,))))
        if complete:
            best = study.best_trial
            results |= {"best_trial": best.number, "best_params": best.params, "best_value": best.value}
            tags |= {"optuna.best_trial": str(best.number), "optuna.best_value": repr(best.value)}
            tags |= {f"optuna.best.{k}": str(v) for k, v in best.params.items()}
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), Path(self.sweep_dir) / "optimization_results.yaml")
        if info is None:
            return
        client = MlflowClient(info.tracking_uri)
        if complete:
            run_id = sweep.job_run(info, study.best_trial.number, self.sweep_dir)
            if run_id is not None:
                tags["optuna.best_run_id"] = run_id
        for key, value in tags.items():
            client.set_tag(info.parent_run_id, key, value)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "optuna_trials.csv"
            study.trials_dataframe().to_csv(path, index=False)
            client.log_artifact(info.parent_run_id, str(path))


# -- in a trial's job ---------------------------------------------------------------------------
class Pruning:
    """The trial a job answers: each epoch's monitored validation value is reported (step = the global
    epoch); ``__call__`` is true when the study's pruner ends the trial there."""

    def __init__(self, trial: optuna.trial.Trial) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def __call__(self, step: int, value: float) -> bool:
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            log.info("pruned by the study's pruner after epoch %d (value %.4f)", step, value)
            return True
        return False


def pruning(sweep_dir: str, num: int) -> Pruning | None:
    """Job ``num``'s trial, rebuilt from what the sweeper shared, with the study's pruner; None when it
    shared none for this job (a plain multirun, or a job launched outside the study)."""
    shared = json.loads((Path(sweep_dir) / sweep.STATE_DIR / sweep.STUDY_FILE).read_text())
    trial_id = shared["trial_ids"].get(str(num))
    if trial_id is None or shared["pruner"] is None:
        return None
    study = optuna.load_study(
        study_name=shared["study_name"],
        storage=open_storage(shared["storage"]),
        pruner=instantiate(shared["pruner"]),
    )
    return Pruning(optuna.trial.Trial(study, trial_id))
