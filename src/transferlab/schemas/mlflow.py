"""``conf/mlflow/``: where runs are tracked, and how long a tracking-server outage is ridden out."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from transferlab.schemas.errors import ConfigError, positive


@dataclass
class MlflowConfig:
    tracking_uri: str = MISSING
    # Where a new experiment keeps its artifacts (an existing experiment keeps its own).
    artifact_location: str = MISSING
    experiment_name: str = "transferlab"
    run_name: str | None = None
    # A tracking server that stops answering mid-run: metrics are buffered and replayed, training
    # goes on; after this many seconds without the server the run stops (checkpoint kept).
    max_outage_s: float = 600.0
    # One HTTP request to a tracking server gives up after this long (MLflow's default is 120 s).
    request_timeout_s: float = 10.0
    # MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network, and GPU
    # utilisation and memory where nvidia-ml-py sees a GPU): the cost side of freeze vs fine-tune in the
    # UI beside the accuracy. One sample per interval; a run shorter than one interval logs none.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        positive("mlflow.max_outage_s", self.max_outage_s, "use e.g. mlflow.max_outage_s=600")
        positive("mlflow.request_timeout_s", self.request_timeout_s, "use e.g. mlflow.request_timeout_s=10")
        positive(
            "mlflow.system_metrics_interval_s",
            self.system_metrics_interval_s,
            "use e.g. mlflow.system_metrics_interval_s=10, or mlflow.system_metrics=false to log none",
        )
        if not self.experiment_name.strip():
            raise ConfigError(
                "mlflow.experiment_name", "is empty", "name the experiment, e.g. mlflow.experiment_name=elpv"
            )
