"""End to end: a smoke search on a small Fashion-MNIST subset, through the CLI."""

import json
import logging
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from search.cli import main
from search.tracking import PARENT_TAG, sqlite_uri
from tests.conftest import needs_fashion_mnist
from tests.helpers import SMOKE, finished, load_study, runs_of


@needs_fashion_mnist
def test_smoke_search_logs_every_trial_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, "--n-trials", "3", "--run-dir", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Pareto-optimal" in printed and "speedup" in printed

    study = load_study(run_dir)
    assert len(finished(run_dir)) == 3
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "FAIL", "WAITING"}
    # a new study starts with the anchors, each technique alone
    assert [t.user_attrs.get("anchor") for t in study.trials[:3]] == ["int8", "4-bit", "structured-50"]
    parents, children = runs_of(run_dir)
    assert len(parents) == 1 and len(children) == 3
    parent_id = parents[0].info.run_id
    assert {c.data.tags[PARENT_TAG] for c in children} == {parent_id}
    assert {int(c.data.tags["optuna.trial"]) for c in children} == {0, 1, 2}
    assert all(r.info.status != "RUNNING" for r in parents + children)
    complete = [c for c in children if c.data.tags.get("state") == "COMPLETE"]
    assert complete, [c.data.tags.get("fail_reason") for c in children]
    for child in complete:
        assert {"accuracy", "size_bytes", "latency_ms", "compression_ratio", "speedup", "params", "macs"} <= set(
            child.data.metrics
        )
        assert 0.0 <= child.data.metrics["accuracy"] <= 1.0
        # where the packed file's bytes go, part by part, adds up to the file
        parts = [child.data.metrics[f"size_{p}_bytes"] for p in ("codes", "indices", "scales", "raw", "header")]
        assert sum(parts) == child.data.metrics["size_bytes"]
        # every suggested parameter is logged under its namespaced name
        assert any(k.startswith("quantization.") for k in child.data.params)
    pareto = [c for c in complete if c.data.tags.get("pareto") == "true"]
    assert pareto
    # no Pareto trial is dominated by another completed trial
    keys = (("accuracy", -1), ("size_bytes", 1), ("latency_ms", 1))
    vec = {c.info.run_id: [sign * c.data.metrics[k] for k, sign in keys] for c in complete}
    for p in pareto:
        a = vec[p.info.run_id]
        assert not any(all(x <= y for x, y in zip(b, a, strict=False)) and b != a for b in vec.values())
    assert {"baseline_accuracy", "baseline_test_accuracy"} <= set(parents[0].data.metrics)
    artifacts = {a.path for a in MlflowClient(sqlite_uri(run_dir)).list_artifacts(parent_id)}
    assert {"results.csv", "pareto.png", "finalists.csv"} <= artifacts
    # finalists were rebuilt from their artifacts: same val accuracy, plus a test-split score
    for p in pareto:
        m = p.data.metrics
        assert m["val_accuracy"] == m["accuracy"] and 0 <= m["test_accuracy"] <= 1
        assert m["final_latency_ms"] > 0 and m["final_speedup"] > 0
    assert not any("test_accuracy" in c.data.metrics for c in complete if c not in pareto)
    assert (run_dir / "mlflow.db").exists() and (run_dir / "optuna.journal").exists()

    # every Pareto trial exports to a package that reproduces it
    from experiments.data import load_fashion_mnist
    from search.package import load_package
    from strategies.runtime import check_agreement, ort_session

    val_x = load_fashion_mnist()[1].x[:500]
    for p in pareto:
        number = int(p.data.tags["optuna.trial"])
        out = tmp_path / f"package-{number}"
        assert main(["export", "--run-dir", str(run_dir), "--trial", str(number), "--out", str(out)]) == 0
        assert (out / "weights.acw").stat().st_size == p.data.metrics["size_bytes"]
        model = load_package(out)
        session = ort_session(out / "model.onnx", threads=1)
        runtime = lambda x, s=session: torch.from_numpy(s.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            assert check_agreement(runtime, model, val_x) <= 0.005
            if p.data.params.get("quantization.activation_bits") in (None, "32"):
                assert (runtime(val_x) - model(val_x)).abs().max() <= 1e-4
    assert main(["export", "--run-dir", str(run_dir), "--trial", "99", "--out", str(tmp_path / "x")]) == 2

    # a bare ONNX Runtime session, fed raw test pixels prepared only as the package says,
    # scores the trial's own test accuracy
    import json

    from experiments.data import fashion_mnist_files, read_idx
    from search.workload import Split, subset

    files = fashion_mnist_files()
    raw = Split(
        torch.from_numpy(read_idx(files["test_x"]).copy()), torch.from_numpy(read_idx(files["test_y"]).astype("int64"))
    )
    raw = subset(raw, 500, seed=0)  # the smoke config's test_subset, split_seed 0
    for p in pareto:
        out = tmp_path / f"package-{p.data.tags['optuna.trial']}"
        prep = json.loads((out / "model.json").read_text())["preprocessing"]
        assert len(prep["class_names"]) == 10
        pixels = (raw.x.numpy()[:, None].astype("float32") * prep["scale"] - prep["mean"]) / prep["std"]
        session = ort_session(out / "model.onnx", threads=1)
        predicted = session.run(None, {"input": pixels.astype("float32")})[0].argmax(1)
        assert (predicted == raw.y.numpy()).mean() == pytest.approx(p.data.metrics["test_accuracy"], abs=1e-9)

    # each recorded speedup is re-timed from the trial's exported ONNX file alone
    from search.verify import verify_speedups

    rows = verify_speedups(run_dir, repeats=10)
    assert sorted(r["trial"] for r in rows) == sorted(int(c.data.tags["optuna.trial"]) for c in complete)
    for r in rows:
        recorded = next(c for c in complete if int(c.data.tags["optuna.trial"]) == r["trial"]).data.metrics["speedup"]
        assert r["recorded_speedup"] == recorded and r["standalone_speedup"] > 0

    # the same command with a higher target adds exactly the difference, under the same parent
    assert main(["run", SMOKE, "--n-trials", "4", "--run-dir", str(run_dir)]) == 0
    assert len(finished(run_dir)) == 4
    parents, children = runs_of(run_dir)
    assert len(parents) == 1 and parents[0].info.run_id == parent_id
    assert len(children) == 4 and {c.data.tags[PARENT_TAG] for c in children} == {parent_id}
    assert all(r.info.status != "RUNNING" for r in parents + children)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "search.sampler=annealing"], "search.sampler"),
        (["--set", "search_space.quantization.weight_bits=[3, 7]"], "quantization.weight_bits"),
        (["--set", "workload.model=nowhere.module:fn"], "workload.model"),
    ],
)
@needs_fashion_mnist
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, "--run-dir", str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_missing_dataset_exits_2_with_hint(tmp_path, capsys):
    code = main(["run", SMOKE, "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nothing")])
    assert code == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@needs_fashion_mnist
def test_run_dir_of_another_config_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, "--n-trials", "1", "--run-dir", str(run_dir)]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["run", SMOKE, "--n-trials", "2", "--run-dir", str(run_dir), "--set", "seed=5"]) == 2
    assert "different config" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def hard_reshape_model():
    """A model structured pruning breaks: its forward hard-codes a channel count."""

    class HardCodedReshape(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 5)
            self.fc = torch.nn.Linear(4 * 24 * 24, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).reshape(x.shape[0], 4 * 24 * 24))

    return HardCodedReshape()


@needs_fashion_mnist
def test_failing_trials_are_recorded_with_reason_and_the_study_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "run",
        SMOKE,
        "--n-trials",
        "2",
        "--run-dir",
        str(run_dir),
        "--set",
        "workload.model=tests.test_search:hard_reshape_model",
        "--set",
        "search_space={pruning.structured_ratio: [0.3, 0.5]}",
    ]
    assert main(args) == 0
    trials = finished(run_dir)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    for t in trials:
        assert "no longer runs after structured pruning" in t.user_attrs["fail_reason"]
    parents, children = runs_of(run_dir)
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED"
        assert child.data.tags["state"] == "FAIL"
        assert "StructuredPruningError" in child.data.tags["fail_reason"]
    assert parents[0].info.status == "FINISHED"
    # failed candidates are results: the same command finds the target met and adds nothing
    assert main(args) == 0
    assert len(finished(run_dir)) == 2


def test_unexpected_errors_exit_1(tmp_path, monkeypatch, capsys):
    import search.prepare

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(search.prepare, "prepare", broken)
    assert main(["run", SMOKE, "--run-dir", str(tmp_path / "run")]) == 1
    assert "disk on fire" in capsys.readouterr().err


def test_console_script_exit_codes(tmp_path):
    import shutil
    import subprocess
    import sys

    exe = shutil.which("autocompress") or str(Path(sys.executable).parent / "autocompress")
    bad = subprocess.run(
        [exe, "run", SMOKE, "--set", "search.sampler=annealing", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "search.sampler must be one of" in bad.stderr
    usage = subprocess.run([exe, "run"], capture_output=True, text=True)
    assert usage.returncode == 2 and "config" in usage.stderr
    missing = subprocess.run([exe, "run", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read config" in missing.stderr


@needs_fashion_mnist
def test_runtime_that_disagrees_with_the_simulation_fails_the_trial(tmp_path, monkeypatch):
    import search.trial

    monkeypatch.setattr(search.trial, "check_agreement", lambda *args, **kwargs: 0.02)
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, "--n-trials", "2", "--run-dir", str(run_dir)]) == 0
    trials = finished(run_dir)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all("disagree on 2.00% of validation samples" in t.user_attrs["fail_reason"] for t in trials)


@needs_fashion_mnist
@pytest.mark.parametrize("early_stop", [True, False])
def test_a_trial_far_below_its_neighbours_after_one_epoch_stops_early(tmp_path, monkeypatch, capsys, early_stop):
    """Every trial is the same 8-bit model fine-tuned for 2 epochs, so trial 0 is no larger
    than any later one; the check then scores each later trial 0 after its first epoch."""
    import search.early_stop
    import search.finalize

    class Zero:  # the task metric, scoring every model 0.0 after its first epoch and as a finalist
        def on(self, *args, **kwargs):
            return 0.0

    for module in (search.early_stop, search.finalize):
        monkeypatch.setattr(module, "task_metric", lambda config: Zero())
    run_dir = tmp_path / "run"
    space = (
        "search_space={quantization.weight_bits: [8], quantization.activation_bits: [32], "
        "distillation.epochs: 2, distillation.lr: 0.01, distillation.alpha: 0.5, distillation.temperature: 2.0}"
    )
    args = [
        "run",
        SMOKE,
        "--n-trials",
        "3",
        "--run-dir",
        str(run_dir),
        "--set",
        space,
        "--set",
        "search.objectives=[accuracy, size_bytes]",
        "--set",
        f"search.early_stop={str(early_stop).lower()}",
    ]
    assert main(args) == 0
    trials = finished(run_dir)
    printed = capsys.readouterr().out
    if not early_stop:
        assert [t.state.name for t in trials] == ["COMPLETE"] * 3
        assert "3 complete, 0 failed, 0 stopped early" in printed
        return
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert "1 complete, 0 failed, 2 stopped early" in printed
    for t in trials[1:]:
        assert t.user_attrs["probe_size_bytes"] == pytest.approx(trials[0].user_attrs["size_bytes"], rel=0.001)
        assert t.user_attrs["early_accuracy"] == 0.0 and t.user_attrs["cpu_seconds"] > 0
        reason = t.user_attrs["stop_reason"]
        assert reason.startswith("stopped early: after fine-tune epoch 1 of 2") and "below trial 0" in reason
    assert not list(run_dir.glob("probe-*"))  # the probes' files are gone
    assert "<b>stopped early</b>: 2 trials (1, 2)" in (run_dir / "report.html").read_text()
    _, children = runs_of(run_dir)
    pruned = [c for c in children if c.data.tags["state"] == "PRUNED"]
    assert len(pruned) == 2 and all(c.info.status == "FINISHED" and "stop_reason" in c.data.tags for c in pruned)
    assert main(args) == 0  # stopped trials count toward the target
    assert len(finished(run_dir)) == 3


@needs_fashion_mnist
def test_per_layer_search_scans_once_and_records_each_layers_level(tmp_path):
    from strategies.artifact import load_artifact
    from strategies.base import weight_layers
    from tests.helpers import MODELS

    run_dir = tmp_path / "run"
    space = (
        "search_space={quantization.weight_bits: [3, 4, 8], quantization.mixed_precision: [true], "
        "pruning.unstructured_sparsity: [0.5, 0.9], pruning.per_layer_sparsity: [true]}"
    )
    args = ["run", SMOKE, "--n-trials", "3", "--run-dir", str(run_dir), "--set", space, "--set", "search.anchors=false"]
    assert main(args) == 0
    scans = json.loads((run_dir / "sensitivity.json").read_text())
    assert set(scans) == {"quantization", "unstructured_pruning"}
    assert set(scans["quantization"]) == {"1", "3", "5"}
    assert all(set(v) == {"3", "4", "8"} for v in scans["quantization"].values())
    trials = finished(run_dir)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:
        assert t.params["quantization.mixed_precision"] is True and t.params["pruning.per_layer_sparsity"] is True
        stored = load_artifact(run_dir / "trials" / f"{t.number:04d}" / "weights.acw", MODELS["lenet300"])
        layers = list(weight_layers(stored))
        # what was recorded is what was deployed
        assert t.user_attrs["quantization.layer_bits"] == " ".join(f"{n}:{int(m.weight_bits)}" for n, m in layers)
        sparsity = " ".join(f"{n}:{float((m.weight == 0).float().mean()):.3f}" for n, m in layers)
        assert t.user_attrs["pruning.layer_sparsity"] == sparsity
    assert main(["export", "--run-dir", str(run_dir), "--trial", "0", "--out", str(tmp_path / "pkg")]) == 0
    spec = json.loads((tmp_path / "pkg" / "model.json").read_text())
    assert spec["params"]["quantization.layer_bits"] == trials[0].user_attrs["quantization.layer_bits"]
    [parent], children = runs_of(run_dir)
    assert "sensitivity.json" in [a.path for a in MlflowClient(sqlite_uri(run_dir)).list_artifacts(parent.info.run_id)]
    assert all({"quantization.layer_bits", "pruning.layer_sparsity"} <= set(c.data.params) for c in children)


@needs_fashion_mnist
def test_a_grid_smaller_than_the_budget_ends_the_run_normally(tmp_path):
    run_dir = tmp_path / "run"
    space = "search_space={quantization.weight_bits: [4, 8], quantization.activation_bits: [32]}"
    args = [
        "run",
        SMOKE,
        "--n-trials",
        "4",
        "--run-dir",
        str(run_dir),
        "--set",
        space,
        "--set",
        "search.sampler=grid",
        "--set",
        "search.anchors=false",
    ]
    assert main(args) == 0
    trials = finished(run_dir)
    assert sorted(t.params["quantization.weight_bits"] for t in trials) == [4, 8]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert (run_dir / "report.html").exists()
    assert main(args) == 0 and len(finished(run_dir)) == 2  # resuming finds nothing left to run


def test_on_a_terminal_the_progress_bar_shows_the_front_and_the_trial_lines_stay_readable(caplog):
    import io
    import types

    from optuna.trial import create_trial

    from search.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    screen = Terminal()
    progress = Progress(types.SimpleNamespace(config=types.SimpleNamespace(metric="accuracy"), study=study), 3, screen)
    with caplog.at_level(logging.INFO, logger="autocompress"), progress.showing():
        for accuracy, size in [(0.90, 2048), (0.80, 4096)]:
            attrs = {"accuracy": accuracy, "size_bytes": size, "compression_ratio": 2.0, "latency_ms": 1.0}
            study.add_trial(create_trial(values=[accuracy, size, 1.0], user_attrs={**attrs, "speedup": 1.0}))
            progress(study, study.trials[-1])
    bar = screen.getvalue()
    assert "2/3" in bar and "front 1, smallest feasible 2.0 kB (accuracy 0.9000)" in bar
    assert [r.getMessage().split("  ")[0] for r in caplog.records if "trial" in r.getMessage()][-1].startswith(
        "[2/3] trial 1 COMPLETE"
    )
