"""Experiment trackers behind one interface: TensorBoard (the default), Weights & Biases, MLflow.

`open_trackers` is called on rank 0 only (`dreamprm.metrics.MetricsLogger`); every scalar goes to
every tracker, histograms to those that take them (TensorBoard, W&B; MLflow has none). W&B and
MLflow are optional extras, imported only when asked for; a missing one is a `ConfigError` naming
the extra to install.

- ``tensorboard``: event files in ``<output>/tb``.
- ``wandb``: ``WANDB_MODE`` decides when set; otherwise the run is offline unless an API key is
  configured (``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc), since a cluster node often
  has no network. The run folder is ``<output>/wandb``; ``wandb sync`` uploads an offline run later.
- ``mlflow``: ``--mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a file store in
  ``<output>/mlruns`` (``mlflow ui --backend-store-uri <output>/mlruns`` shows it).
"""
from __future__ import annotations

import netrc
import os
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from dreamprm.config import TRACKERS, ConfigError


class Tracker(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def histograms(self, step: int, values: dict[str, torch.Tensor]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def require_extras(names: Sequence[str]) -> None:
    """On every rank, before anything starts: the packages of the trackers named are installed (only
    rank 0 opens them, and a failure there alone would leave the other ranks waiting)."""
    import importlib.util
    for name in names:
        if name in ("wandb", "mlflow"):
            try:
                found = importlib.util.find_spec(name) is not None
            except ValueError:  # in sys.modules as None: an import of it fails
                found = False
            if not found:
                _import_extra(name, name)  # raises the ConfigError that names the extra


def _import_extra(module: str, tracker: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ConfigError(f"--report_to {tracker}: the Python package '{module}' is not installed ({err}); install "
                          f"the extra: pip install 'dreamprm-ds[{tracker}]' (or pip install {module})") from err


class TensorBoardTracker:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(folder / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histograms(self, step: int, values: dict[str, torch.Tensor]) -> None:
        for tag, tensor in values.items():
            self.writer.add_histogram(tag, tensor, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """WANDB_MODE when set; 'online' with an API key configured; else 'offline' (no network assumed)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbTracker:
    def __init__(self, folder: Path, name: str, config: dict[str, Any], project: str):
        self.wandb = _import_extra("wandb", "wandb")
        folder.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(project=project, name=name, dir=str(folder), config=config, mode=wandb_mode(),
                                   settings=self.wandb.Settings(console="off", x_disable_stats=True))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        # Several calls may share a step (losses, then the upper step's values): W&B merges them.
        self.run.log(dict(values), step=step)

    def histograms(self, step: int, values: dict[str, torch.Tensor]) -> None:
        self.run.log({tag: self.wandb.Histogram(t.detach().float().cpu().numpy()) for tag, t in values.items()},
                     step=step)

    def flush(self) -> None:
        pass  # the W&B service writes as it goes

    def close(self) -> None:
        self.run.finish()
        # finish() can return before the W&B service has written the run file (seen offline: the
        # last history records missing right after it); teardown waits for the service to end.
        self.wandb.teardown()


def mlflow_tracking_uri(folder: Path, uri: str | None) -> str:
    """--mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else the file store <output>/mlruns."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # MLflow 3.x refuses its file store (in "maintenance mode") unless asked; a folder beside the run
    # needs no database or server, which is what a cluster job wants. Setting it to false refuses it.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (folder / "mlruns").resolve().as_uri()


class MlflowTracker:
    def __init__(self, folder: Path, name: str, config: dict[str, Any], tracking_uri: str | None, experiment: str):
        _import_extra("mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        self.Metric = Metric
        self.uri = mlflow_tracking_uri(folder, tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        # MLflow caps a parameter's value at 6000 characters; flags are short.
        params = [Param(f"{section}.{key}", str(value)[:6000]) for section, values in config.items()
                  for key, value in values.items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self.Metric(tag, float(value), stamp, step) for tag, value in values.items()]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def histograms(self, step: int, values: dict[str, torch.Tensor]) -> None:
        pass  # MLflow has no histograms

    def flush(self) -> None:
        pass  # every call above is written when it returns

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(names: Sequence[str], folder: str | Path, *, run_name: str, config: dict[str, Any],
                  project: str = "dreamprm", mlflow_uri: str | None = None) -> list[Tracker]:
    """The trackers named in --report_to, opened (rank 0 only). Raises ConfigError for a missing extra."""
    folder = Path(folder)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"--report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(folder))
            elif name == "wandb":
                opened.append(WandbTracker(folder, run_name, config, project))
            else:
                opened.append(MlflowTracker(folder, run_name, config, mlflow_uri, project))
    except Exception as err:
        for tracker in opened:
            tracker.close()
        if isinstance(err, ConfigError):
            raise
        where = f" (tracking URI {mlflow_tracking_uri(folder, mlflow_uri)})" if name == "mlflow" else ""
        raise ConfigError(f"--report_to {name}: the tracker could not be opened{where}: "
                          f"{err.__class__.__name__}: {err}") from err
    return opened
