"""Trackers for real, offline: TensorBoard event files, the MLflow file store, a W&B offline run
folder; every value read back from what the tracker wrote."""
from __future__ import annotations

import sys

import pytest
import torch

from dreamprm.config import ConfigError
from dreamprm.metrics import MetricsLogger, read_scalars
from dreamprm.trackers import open_trackers, require_extras, wandb_mode

STEPS = {1: {"domain_weight/clean": 1.25, "eval/best_of_4": 0.5},
         3: {"domain_weight/clean": 0.75, "eval/best_of_4": 0.625, "meta_gate/clean": 0.125}}
CONFIG = {"run": {"seed": 1, "weights_path": "out"}, "bilevel": {"meta_lr": 0.1}}


def log_through(names: list[str], folder, **kwargs) -> None:
    """What the trainer does on rank 0: scalars and histograms through MetricsLogger, then close."""
    logger = MetricsLogger(folder, True, 3, trackers=lambda: open_trackers(names, folder, run_name="test",
                                                                            config=CONFIG, **kwargs))
    for step, values in STEPS.items():
        logger.scalars(step, values)
    logger.histograms(3, {"instance_weight/clean": torch.tensor([0.5, 1.0, 1.5]), "instance_weight/empty":
                          torch.tensor([])})
    logger.close()


def expected_series() -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, values in STEPS.items():
        for tag, value in values.items():
            series.setdefault(tag, []).append((step, value))
    return series


def test_tensorboard_receives_every_scalar(tmp_path):
    log_through(["tensorboard"], tmp_path)
    assert read_scalars(tmp_path / "tb") == expected_series()


@pytest.mark.slow  # MLflow runs `uname -p` when it opens a run
def test_mlflow_file_store_receives_every_scalar(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    log_through(["mlflow"], tmp_path, project="dreamprm-test")
    from mlflow.tracking import MlflowClient
    assert (tmp_path / "mlruns").is_dir()  # the file store beside the run
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("dreamprm-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "test"
    assert run.data.params["bilevel.meta_lr"] == "0.1"
    for tag, series in expected_series().items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert got == series, tag


@pytest.mark.slow  # MLflow runs `uname -p` when it opens a run
def test_mlflow_tracking_uri_flag_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "from_env").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    log_through(["mlflow"], tmp_path / "run", mlflow_uri=(tmp_path / "from_flag").as_uri())
    assert (tmp_path / "from_flag").is_dir() and not (tmp_path / "from_env").exists()
    assert not (tmp_path / "run" / "mlruns").exists()


@pytest.mark.parametrize("extra", ["wandb", "mlflow"])
def test_missing_extra_names_what_to_install(tmp_path, monkeypatch, extra):
    monkeypatch.setitem(sys.modules, extra, None)  # as if not installed: `import` raises ImportError
    for check in (lambda: require_extras(["tensorboard", extra]),
                  lambda: open_trackers([extra], tmp_path, run_name="x", config=CONFIG)):
        with pytest.raises(ConfigError) as err:
            check()
        assert f"--report_to {extra}" in str(err.value) and f"pip install 'dreamprm-ds[{extra}]'" in str(err.value)


def test_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown tracker"):
        open_trackers(["neptune"], tmp_path, run_name="x", config=CONFIG)


def test_wandb_mode_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


@pytest.mark.slow  # wandb.init starts the W&B service process
def test_wandb_offline_run_folder_holds_every_scalar(tmp_path, monkeypatch):
    from wandb_offline import history, records, run_file
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    log_through(["wandb", "tensorboard"], tmp_path)
    path = run_file(tmp_path)
    assert "offline-run-" in str(path)
    logged = history(path)
    assert {tag: logged[tag] for tag in expected_series()} == expected_series()
    # The histogram went in as a W&B histogram (not a scalar), the empty one was left out.
    # W&B writes a histogram as one JSON item or, nested, as one item per field (_type, values, bins).
    items = [i for r in records(path) if r.WhichOneof("record_type") == "history" for i in r.history.item
             if (i.key or i.nested_key[0]).startswith("instance_weight/")]
    assert len({i.key or i.nested_key[0] for i in items}) == 1, [i.key or list(i.nested_key) for i in items]
    assert any('"histogram"' in i.value_json.replace('":"', '": "') for i in items)
    assert read_scalars(tmp_path / "tb") == expected_series()  # both trackers got everything
