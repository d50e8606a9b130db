"""Constraints, hypervolume, samplers, the decision report and the efficiency benchmark."""

import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.efficiency import TABLE_PATH, Table, grid_configs, replay, target_met
from search import front
from search.cli import main
from search.config import ConfigError, parse_config
from search.samplers import resolve_sampler
from search.tracking import sqlite_uri
from tests.conftest import ROOT, needs_fashion_mnist
from tests.helpers import SMOKE, load_study, read_only, runs_of

BASELINE = {"accuracy": 0.90, "size_bytes": 1000.0, "latency_ms": 2.0}
OBJECTIVES = ("accuracy", "size_bytes", "latency_ms")


def point(drop, size_ratio, latency_ratio):
    return {"accuracy": 0.90 - drop, "size_bytes": 1000.0 * size_ratio, "latency_ms": 2.0 * latency_ratio}


def test_hypervolume_is_the_box_to_the_reference_point():
    ref = front.reference_point(OBJECTIVES)
    single = front.hypervolume([point(0.0, 0.5, 0.75)], BASELINE, OBJECTIVES)
    assert single == pytest.approx(ref["accuracy"] * (ref["size_bytes"] - 0.5) * (ref["latency_ms"] - 0.75))
    # a dominated point adds nothing; a point beyond the reference counts nothing
    assert front.hypervolume([point(0.0, 0.5, 0.75), point(0.02, 0.6, 0.8)], BASELINE, OBJECTIVES) == single
    assert front.hypervolume([point(0.0, 1.2, 0.5)], BASELINE, OBJECTIVES) == 0.0
    assert front.hypervolume([point(0.0, 0.5, 0.75), point(0.0, 0.4, 1.0)], BASELINE, OBJECTIVES) > single


def test_latency_counts_as_the_trials_own_same_run_speedup():
    timed = dict(point(0.0, 0.5, 0.75), speedup=2.0)  # its run timed it at half the baseline's latency
    for baseline_latency in (1.0, 2.0, 4.0):  # whatever this process measured for the baseline
        baseline = dict(BASELINE, latency_ms=baseline_latency)
        assert front.relative(timed, baseline, OBJECTIVES)[2] == 0.5
    assert front.relative(point(0.0, 0.5, 0.75), BASELINE, OBJECTIVES)[2] == 0.75  # no speedup: the ratio


def test_recommendation_is_the_smallest_within_the_limit_else_the_knee():
    rows = [
        dict(point(0.002, 0.30, 1.0), trial=0),
        dict(point(0.008, 0.10, 1.0), trial=1),
        dict(point(0.03, 0.02, 0.5), trial=2),
    ]
    pick, rule = front.recommend(rows, BASELINE, OBJECTIVES, max_accuracy_drop=0.01)
    assert pick["trial"] == 1 and "smallest" in rule
    pick, rule = front.recommend(rows, BASELINE, OBJECTIVES, max_accuracy_drop=0.001)
    assert "knee" in rule and pick in rows
    pick, rule = front.recommend(rows, BASELINE, OBJECTIVES, max_accuracy_drop=None)
    assert "knee" in rule
    assert front.recommend([], BASELINE, OBJECTIVES, 0.01)[0] is None


def test_a_degenerate_trial_is_shown_but_does_not_decide_the_knee():
    """Trial 3 scores 0.19 with 10 classes: below halfway from the majority class (0.10) to the
    baseline (0.90). With it, it is the front's tiny extreme and drags the knee toward itself."""
    rows = [
        dict(point(0.0, 0.60, 1.0), trial=0),
        dict(point(0.01, 0.20, 0.9), trial=1),
        dict(point(0.06, 0.05, 0.6), trial=2),
        dict(point(0.71, 0.001, 0.1), trial=3),
    ]
    baseline = dict(BASELINE, trivial_accuracy=0.10)
    assert front.floor(baseline) == pytest.approx(0.50)
    assert [r["trial"] for r in front.sensible(rows, baseline)] == [0, 1, 2]
    with_it = front.knee(rows, baseline, OBJECTIVES)["trial"]
    pick, rule = front.recommend(rows, baseline, OBJECTIVES, max_accuracy_drop=None)
    assert pick["trial"] == front.knee(rows[:3], baseline, OBJECTIVES)["trial"] != with_it
    assert "sensible" in rule
    alternatives = front.alternatives(rows, baseline)
    assert alternatives["smallest within 1 pt"]["trial"] == 1 and alternatives["fastest within 1 pt"]["trial"] == 1


def test_the_trivial_model_scores_the_majority_class_or_the_mean_embedding():
    from objectives.accuracy import Accuracy
    from objectives.task import EmbeddingFidelity, MacroF1

    y = torch.tensor([0, 0, 0, 1, 2])
    logits = torch.randn(5, 3)
    assert Accuracy().trivial(logits, y) == pytest.approx(0.6)
    assert MacroF1().trivial(logits, y) == pytest.approx((2 * 3 / (2 * 3 + 2)) / 3)  # class 0: tp 3, fp 2
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert EmbeddingFidelity().trivial(reference, y[:2], reference) == pytest.approx(2**-0.5)


@pytest.mark.parametrize(
    "constraints, key",
    [
        ({"max_accuracy_drop": 1.0}, "max_accuracy_drop"),
        ({"max_accuracy_drop": -0.1}, "max_accuracy_drop"),
        ({"max_size_bytes": 0}, "max_size_bytes"),
        ({"max_latency_ms": 0}, "max_latency_ms"),
        ({"max_size": 5}, "max_size"),
    ],
)
def test_bad_constraints_name_the_key(constraints, key):
    with pytest.raises(ConfigError, match=key):
        parse_config({"name": "x", "constraints": constraints})


# ------------------------------------------------------------ the shipped table


@pytest.mark.parametrize("path", [TABLE_PATH, TABLE_PATH.with_name("efficiency_lenet5.json")], ids=lambda p: p.stem)
def test_the_shipped_table_covers_its_grid(path):
    table = Table.load(path)
    assert len(table.rows) == len(grid_configs()) >= 200
    assert {table.key(row["params"]) for row in table.rows} == {table.key(p) for p in grid_configs()}
    assert table.front and table.front <= set(table.complete)
    # the exhaustive front is non-dominated, and evaluating everything gives its whole hypervolume
    assert table.hypervolume(range(len(table.rows))) == pytest.approx(table.exhaustive_hv)
    assert table.hypervolume(table.front) == pytest.approx(table.exhaustive_hv)


@pytest.mark.parametrize("sampler", ["auto", "tpe", "gp", "nsga2", "random", "grid"])
def test_every_sampler_searches_the_same_conditional_space(sampler):
    table = Table.load(TABLE_PATH)
    visited = replay(table, sampler, seed=0, n_trials=8)
    assert len(visited) == 8
    # the anchors come first, whatever the sampler
    assert len(set(visited[:6])) == 6
    assert 0 < table.hypervolume(visited) <= table.exhaustive_hv
    assert resolve_sampler("auto", 10) in ("gp", "tpe") and resolve_sampler(sampler, 10) != "auto"


def test_the_efficiency_benchmark_reports_every_budget_against_both_reference_points(tmp_path, capsys):
    out = tmp_path / "eff"
    args = ["efficiency", "--samplers", "auto", "random-plain", "--seeds", "2", "--budgets", "6", "50"]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads((out / "efficiency.json").read_text())
    assert set(results["references"]) == {"nadir", "box"}
    for per_ref in results["references"].values():
        assert set(per_ref["samplers"]) == {"auto", "random-plain"}
        for per_budget in per_ref["samplers"].values():
            for n in ("6", "50"):
                assert len(per_budget[n]["hv_ratio"]) == 2 and all(0 < r <= 1 for r in per_budget[n]["hv_ratio"])
            # a sampler does not know its budget: the longer run only adds to the shorter one
            assert all(a <= b for a, b in zip(per_budget["6"]["hv_ratio"], per_budget["50"]["hv_ratio"], strict=False))
        assert 0 <= per_ref["samplers"]["auto"]["50"]["p_vs_random-plain"] <= 1
    # the same replays, measured twice: the nadir is the table's worst point, so every configuration
    # adds to its volume, while the search's own box holds less of it
    nadir, box = (results["references"][r]["samplers"]["auto"]["50"] for r in ("nadir", "box"))
    assert nadir["pareto_share"] == box["pareto_share"] and nadir["hv_ratio"] != box["hv_ratio"]
    exhaustive = {r: per_ref["exhaustive_hypervolume"] for r, per_ref in results["references"].items()}
    assert exhaustive["box"] < exhaustive["nadir"]
    printed = capsys.readouterr().out
    for reference in ("nadir", "box"):
        met, figures = target_met(results, reference)
        assert f"{'met' if met else 'NOT met'} ({figures})" in printed
        assert met == (
            results["references"][reference]["samplers"]["auto"]["50"]["hv_ratio_median"] >= 0.99
            and results["references"][reference]["samplers"]["auto"]["50"]["p_vs_random-plain"] < 0.05
        )

    assert main([*args, "--seeds", "1", "--out", str(out)]) == 2
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--reference", "worst", "--out", str(out)])
    assert exit_info.value.code == 2
    assert json.loads((out / "efficiency.json").read_text()) == results  # bad input leaves the results alone
    assert main([*args, "--reference", "box", "--out", str(tmp_path / "box")]) == 0
    assert list(json.loads((tmp_path / "box" / "efficiency.json").read_text())["references"]) == ["box"]


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def constrained_run(tmp_path_factory):
    """A smoke search with a 2-point accuracy limit: (run_dir, printed output)."""
    run_dir = tmp_path_factory.mktemp("constrained") / "run"
    args = ["run", SMOKE, "--n-trials", "8", "--run-dir", str(run_dir), "--set", "constraints.max_accuracy_drop=0.02"]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("AUTOCOMPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        assert main(args) == 0
    return run_dir, out.getvalue()


@needs_fashion_mnist
def test_constrained_search_recommends_a_feasible_model_and_reports_it(constrained_run, tmp_path):
    run_dir, printed = constrained_run
    assert "recommended: trial" in printed
    # what the pick costs against the baseline, in points on val and test, and how to get it
    assert re.search(r"val accuracy 0\.\d{4} \([+-]\d+\.\d{2} pt\); test 0\.\d{4} \([+-]\d+\.\d{2} pt\)", printed)
    assert f"get it: autocompress export --run-dir {run_dir} --trial" in printed
    assert "or from the MLflow Model Registry: models:/smoke/1" in printed
    assert max(len(line) for line in printed.splitlines() if str(run_dir) not in line) <= 120  # paths aside

    study = load_study(run_dir)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done and all("accuracy_drop" in t.constraints for t in done)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pareto"], "no feasible trial in a smoke run with a 2-point limit"
    for row in summary["pareto"]:  # the recommended set is feasible on val
        assert summary["baseline"]["accuracy"] - row["accuracy"] <= 0.02 + 1e-12
    pick = summary["recommended"]
    within = [r for r in summary["pareto"] if summary["baseline"]["accuracy"] - r["accuracy"] <= 0.02 + 1e-12]
    assert pick["size_bytes"] == min(r["size_bytes"] for r in within)

    page = (run_dir / "report.html").read_text()
    for section in ("Recommendation", "Pareto front", "Failures by reason", "Hypervolume"):
        assert f"<h2>{section}</h2>" in page
    assert f"Ship trial {pick['trial']}" in page and page.count("data:image/png;base64,") == 2
    assert f"--trial {pick['trial']} --out" in page and " pt)" in page
    for label, other in summary["alternatives"].items():  # each alternative by its trial number
        assert other["trial"] == pick["trial"] or f"<li>{label}: trial {other['trial']}, val accuracy" in page
    assert not re.search(r"(src|href)=\"(http|/)", page)  # self-contained

    parents, children = runs_of(run_dir)
    client = MlflowClient(sqlite_uri(run_dir))
    history = client.get_metric_history(parents[0].info.run_id, "hypervolume")
    assert [m.step for m in history] == list(range(1, 9))
    values = [m.value for m in history]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False)) and all(math.isfinite(v) for v in values)
    assert "report.html" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    versions = client.search_model_versions("name = 'smoke'")
    assert len(versions) == 1 and versions[0].run_id == pick["mlflow_run_id"]
    files = {a.path for a in client.list_artifacts(pick["mlflow_run_id"], "package")}
    assert {"package/model.onnx", "package/weights.acw", "package/model.json", "package/state_dict.npz"} <= files
    state = np.load(client.download_artifacts(pick["mlflow_run_id"], "package/state_dict.npz", str(tmp_path)))
    assert state.files  # a plain array archive: np.load refuses pickles by default

    # each completed trial's logged model has a signature; the registered pick loads as an MLflow model
    import mlflow

    mlflow.set_tracking_uri(sqlite_uri(run_dir))
    for child in (c for c in children if c.data.tags.get("state") == "COMPLETE"):
        info = mlflow.models.get_model_info(
            load_study(run_dir).trials[int(child.data.tags["optuna.trial"])].user_attrs["model_uri"]
        )
        assert info.signature.inputs.inputs[0].shape == (-1, 1, 28, 28) and info.run_id == child.info.run_id
    loaded = mlflow.pyfunc.load_model("models:/smoke/1")
    assert loaded.metadata.signature is not None

    # the report can be written again from the run directory; registering twice adds nothing
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    assert len(client.search_model_versions("name = 'smoke'")) == 1


@needs_fashion_mnist
def test_the_mlflow_server_shows_the_decision(constrained_run, tmp_path):
    """Through MLflow's REST API, as the UI and remote clients see it."""
    # served from a copy elsewhere, read-only: the UI finds the copy's own artifacts
    run_dir = shutil.copytree(constrained_run[0], tmp_path / "copied")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        read_only(run_dir, [sys.executable, "-m", "search.cli", "ui", "--run-dir", run_dir, "--port", port]),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def call(path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                experiment = call("/experiments/get-by-name?experiment_name=smoke")["experiment"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)
        search = {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}
        # the UI opens on the runs (an experiment of model development, not GenAI), and the link says so
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
        printed = [server.stdout.readline().strip() for _ in range(2)]
        assert printed[0] == f"{run_dir} is read-only: the UI serves a copy of its MLflow store, and keeps no edit"
        assert printed[1].startswith(
            f"MLflow UI: http://127.0.0.1:{port}/#/experiments/{experiment['experiment_id']}/runs"
        )
        assert experiment["artifact_location"] == (run_dir / "mlartifacts").as_uri()
        parents = call("/runs/search", {**search, "filter": "tags.role = 'study'"})["runs"]
        assert len(parents) == 1
        parent = parents[0]["info"]["run_id"]
        history = call(f"/metrics/get-history?run_id={parent}&metric_key=hypervolume")["metrics"]
        assert len(history) == 8
        pareto = call("/runs/search", {**search, "filter": "tags.pareto = 'true'"})["runs"]
        assert pareto
        for run in pareto:
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert tags["mlflow.parentRunId"] == parent
        artifacts = {f["path"] for f in call(f"/artifacts/list?run_id={parent}").get("files", [])}
        assert "report.html" in artifacts
        assert parents[0]["info"]["artifact_uri"].startswith((run_dir / "mlartifacts").as_uri() + "/")
        page = f"http://127.0.0.1:{port}/get-artifact?path=report.html&run_uuid={parent}"
        with urllib.request.urlopen(page, timeout=30) as response:
            assert response.read() == (run_dir / "report.html").read_bytes()
        model = call("/registered-models/get?name=smoke")["registered_model"]
        versions = model["latest_versions"]
        assert versions and versions[0]["run_id"] in {r["info"]["run_id"] for r in pareto}
        # every completed trial's deployable is a logged model with a signature; the registered
        # version is one of them; runs are named by what they tried; the splits are run inputs
        children = call("/runs/search", {**search, "filter": "tags.state = 'COMPLETE'"})["runs"]
        logged = call("/logged-models/search", {"experiment_ids": [experiment["experiment_id"]]})["models"]
        by_run = {m["info"]["source_run_id"]: m for m in logged}
        assert all(m["info"]["artifact_uri"].startswith((run_dir / "mlartifacts").as_uri()) for m in logged)
        assert {c["info"]["run_id"] for c in children} <= set(by_run)
        assert versions[0]["source"] == f"models:/{by_run[versions[0]['run_id']]['info']['model_id']}"
        names = {c["info"]["run_name"] for c in children}
        assert "trial-0 weight_bits=8 activation_bits=8" in names  # the int8 anchor, by what it turned on
        assert all(n.startswith("trial-") for n in names)
        inputs = call(f"/runs/get?run_id={parent}")["run"]["inputs"]["dataset_inputs"]
        contexts = {t["value"] for i in inputs for t in i["tags"] if t["key"] == "mlflow.data.context"}
        assert contexts == {"train", "val", "test"} and all(i["dataset"]["digest"] for i in inputs)
    finally:
        server.terminate()
        server.wait(timeout=30)


@needs_fashion_mnist
def test_a_copied_run_directory_keeps_its_artifacts_and_a_read_only_one_still_exports(constrained_run, tmp_path):
    import mlflow

    original, _ = constrained_run
    pick = json.loads((original / "summary.json").read_text())["recommended"]
    # copied elsewhere and written to (the report): MLflow finds the copy's artifacts, not the original's
    moved = shutil.copytree(original, tmp_path / "moved")
    # this process opened the original's runs already, and MLflow keeps each run's artifact
    # location per process: forget them, as a new process would
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()
    assert main(["report", "--run-dir", str(moved)]) == 0
    client = MlflowClient(sqlite_uri(moved))
    parents, _ = runs_of(moved)
    assert parents[0].info.artifact_uri.startswith((moved / "mlartifacts").as_uri() + "/")
    report = client.download_artifacts(parents[0].info.run_id, "report.html", str(tmp_path))
    assert open(report, "rb").read() == (moved / "report.html").read_bytes()
    mlflow.set_tracking_uri(sqlite_uri(moved))
    assert mlflow.pyfunc.load_model("models:/smoke/1").metadata.signature is not None

    # read-only: export works and changes nothing in the run directory
    frozen = shutil.copytree(original, tmp_path / "frozen")
    before = {p: p.read_bytes() for p in frozen.rglob("*") if p.is_file()}
    out = tmp_path / "package"
    command = [
        sys.executable,
        "-m",
        "search.cli",
        "export",
        "--run-dir",
        frozen,
        "--trial",
        pick["trial"],
        "--out",
        out,
    ]
    done = subprocess.run(read_only(frozen, command), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {"model.onnx", "weights.acw", "model.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "model.json").read_text())["trial"] == pick["trial"]
    assert {p: p.read_bytes() for p in frozen.rglob("*") if p.is_file()} == before


@needs_fashion_mnist
def test_nothing_feasible_is_said_with_the_closest_candidates(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", SMOKE, "--n-trials", "3", "--run-dir", str(run_dir), "--set", "constraints.max_size_bytes=1000"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "no trial meets the constraints" in printed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pareto"] == [] and summary["recommended"] is None and summary["closest"]
    violations = [r["violation"] for r in summary["closest"]]
    assert violations == sorted(violations) and violations[0] > 0
    assert "No trial meets the constraints" in (run_dir / "report.html").read_text()


# The README's sampler table (10 seeds on the shipped LeNet-300-100 table): the replay is
# deterministic, so any change to the samplers, the anchors or the search space shows here.
README_MEDIANS = {
    ("nadir", "auto"): {"20": 0.987936, "50": 0.993339, "100": 0.995884},
    ("nadir", "random-plain"): {"20": 0.945890, "50": 0.962294, "100": 0.977429},
    ("box", "auto"): {"20": 0.909516, "50": 0.970973, "100": 0.982469},
    ("box", "random-plain"): {"20": 0.781547, "50": 0.821997, "100": 0.881502},
}


def test_the_efficiency_replay_reproduces_the_readme_figures():
    from experiments.efficiency import run_efficiency

    results = run_efficiency(TABLE_PATH, ["auto", "random-plain"], seeds=10, budgets=[20, 50, 100])
    for (reference, sampler), medians in README_MEDIANS.items():
        figures = results["references"][reference]["samplers"][sampler]
        assert {n: round(figures[n]["hv_ratio_median"], 6) for n in medians} == medians


def test_a_wide_table_is_cut_into_blocks_that_fit_the_terminal():
    from search.report import final_columns, format_table

    params = {f"pruning.option_{i}": 0.5 for i in range(8)}
    figures = {"val_accuracy": 0.9, "test_accuracy": 0.89, "size_bytes": 2048.0, "compression_ratio": 4.0}
    latency = {f"final_{k}{b}": 1.5 for b in ("", "_b32", "_b64") for k in ("latency_ms", "speedup")}
    rows = [{"trial": n, **params, **figures, **latency} for n in (3, 11)]
    text = format_table(rows, final_columns("accuracy", rows), width=120)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120
    headings = [line for line in lines if line.lstrip().startswith("trial")]
    assert len(headings) >= 2  # it did not fit in one block, and every block names its trials
    for name in ("option_7", "val_acc", "speedup_b32", "latency_b64"):
        assert sum(name in h.split() for h in headings) == 1  # each column once, whole
    assert format_table(rows[:1], ("val_accuracy",), width=1000).count("trial") == 1


def test_the_plots_keep_a_degenerate_trial_at_the_edge_instead_of_stretching_the_axis(tmp_path, monkeypatch):
    import search.plots as report

    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path, dpi: figures.append(fig) or path)
    baseline = {"accuracy": 0.91, "size_bytes": 400_000.0, "latency_ms": 1.0}
    rows = [
        {"trial": 0, "state": "COMPLETE", "pareto": True, "accuracy": 0.905, "size_bytes": 20_000.0, "latency_ms": 0.5},
        {"trial": 1, "state": "COMPLETE", "pareto": True, "accuracy": 0.19, "size_bytes": 2_000.0, "latency_ms": 0.2},
    ]
    report.write_plot(rows, baseline, tmp_path / "p.png", pick=0)
    for ax in figures[0].axes:
        ring = [c for c in ax.collections if c.get_label() == "recommended"]
        assert ring and ring[0].get_offsets()[0][1] == pytest.approx(0.905)  # the pick is marked
        bottom, top = ax.get_ylim()
        assert 0.85 < bottom < 0.86 and top < 0.95  # the 0.19 trial does not stretch the axis...
        edge = [c for c in ax.collections if c.get_label().startswith("Pareto-optimal, below")]
        assert edge and edge[0].get_offsets()[0][1] == pytest.approx(0.86)  # ...it sits at the edge
        assert ax.get_xscale() == "log" and ("kB" in ax.get_xlabel() or "ms" in ax.get_xlabel())
