"""Overnight faults: kill -9, SIGINT/SIGTERM, failing candidates, parallel workers, bad input."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

import strategies.pipeline
from search.cli import main
from search.tracking import PARENT_TAG, sqlite_uri
from strategies.base import CompressionError
from tests.conftest import ROOT, needs_fashion_mnist
from tests.helpers import SMOKE, finished, load_study, runs_of

pytestmark = needs_fashion_mnist

# Every trial fine-tunes a model that sleeps 50 ms per step: about 2.5 s per trial.
SLOW = [
    "--set",
    "workload.model=tests.faults:slow_to_train",
    "--set",
    "search_space={distillation.epochs: [3, 3], pruning.unstructured_sparsity: [0.0, 0.5]}",
    "--set",
    "search.finetune_size=2000",
    "--set",
    "search.anchors=false",
    "--set",
    "search.early_stop=false",  # every trial runs all its epochs: these tests count COMPLETE ones
]


def cli(*args):
    return [sys.executable, "-m", "search.cli", *args]


def spawn(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_running_trial(run_dir, proc, timeout=180):
    """Block until a trial is RUNNING with its MLflow run open, then give it time to be mid-work."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if (run_dir / "optuna.journal").exists():
            try:
                running = [t for t in load_study(run_dir).trials if t.state.name == "RUNNING"]
            except KeyError:  # the study is not created yet
                running = []
            if running and "mlflow_run_id" in running[0].user_attrs:
                time.sleep(0.5)
                return running[0]
        time.sleep(0.2)
    raise AssertionError("no trial started")


def child_runs_by_trial(run_dir):
    parents, children = runs_of(run_dir)
    assert len(parents) == 1
    by_trial = {}
    for c in children:
        assert c.data.tags[PARENT_TAG] == parents[0].info.run_id
        by_trial.setdefault(int(c.data.tags["optuna.trial"]), []).append(c)
    assert all(len(runs) == 1 for runs in by_trial.values()), "one MLflow run per trial"
    return parents[0], {n: runs[0] for n, runs in by_trial.items()}


def test_kill_9_mid_trial_then_rerun_completes_the_study(tmp_path):
    run_dir = tmp_path / "run"
    command = cli("run", SMOKE, "--n-trials", "3", "--run-dir", str(run_dir), *SLOW)
    proc = spawn(command)
    victim = wait_for_running_trial(run_dir, proc)
    proc.kill()
    proc.wait()
    # the killed process left its trial and its MLflow run RUNNING
    assert load_study(run_dir).trials[victim.number].state.name == "RUNNING"
    assert MlflowClient(sqlite_uri(run_dir)).get_run(victim.user_attrs["mlflow_run_id"]).info.status == "RUNNING"

    rerun = spawn(command)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    trials = load_study(run_dir).trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3
    killed = trials[victim.number]
    assert killed.state.name == "FAIL" and killed.user_attrs["fail_reason"] == "interrupted"
    retries = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state.name == "COMPLETE"
    parent, runs = child_runs_by_trial(run_dir)
    assert sorted(runs) == [t.number for t in trials]
    assert runs[victim.number].info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in [parent, *runs.values()])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_marks_the_trial_and_exits_cleanly(tmp_path, sig):
    run_dir = tmp_path / "run"
    command = cli("run", SMOKE, "--n-trials", "2", "--run-dir", str(run_dir), *SLOW)
    proc = spawn(command)
    victim = wait_for_running_trial(run_dir, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert code != 0 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    interrupted = load_study(run_dir).trials[victim.number]
    assert interrupted.state.name == "FAIL" and interrupted.user_attrs["fail_reason"] == "interrupted"
    parent, runs = child_runs_by_trial(run_dir)
    assert runs[victim.number].info.status == "KILLED" and parent.info.status == "KILLED"

    rerun = spawn(command)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    trials = load_study(run_dir).trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2
    assert [t.user_attrs.get("retry_of") for t in trials].count(victim.number) == 1
    parent, runs = child_runs_by_trial(run_dir)
    assert all(r.info.status != "RUNNING" for r in [parent, *runs.values()])


def test_failing_candidates_fail_alone_with_their_reason(tmp_path, monkeypatch):
    """NaN weights, a strategy that cannot apply, a time limit and running out of memory each
    fail one trial; the study completes the rest. The limit leaves the other trials (1-2 s
    here) room for a shared machine's load: at 3 s, one failed under load."""
    compress = strategies.pipeline.compress
    calls = []

    def faulty(model, *args, **kwargs):
        calls.append(1)
        model, configs = compress(model, *args, **kwargs)
        if len(calls) == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        elif len(calls) == 2:
            raise CompressionError("this strategy cannot apply to this model")
        elif len(calls) == 3:
            time.sleep(30)
        elif len(calls) == 4:
            torch.empty(1 << 50)  # the allocator refuses
        return model, configs

    monkeypatch.setattr(strategies.pipeline, "compress", faulty)
    run_dir = tmp_path / "run"
    args = ["run", SMOKE, "--n-trials", "6", "--run-dir", str(run_dir), "--set", "search.trial_timeout=10"]
    assert main(args) == 0
    trials = finished(run_dir)
    assert [t.state.name for t in trials] == ["FAIL"] * 4 + ["COMPLETE"] * 2
    reasons = [t.user_attrs["fail_reason"] for t in trials[:4]]
    assert reasons[0].startswith("CompressionError: non-finite values in")
    assert reasons[1] == "CompressionError: this strategy cannot apply to this model"
    assert "time limit" in reasons[2] and "search.trial_timeout = 10 s" in reasons[2]
    assert reasons[3].startswith("OutOfMemory: out of memory")
    assert all(v == v and abs(v) != float("inf") for t in trials[4:] for v in t.values)
    parent, runs = child_runs_by_trial(run_dir)
    assert [runs[t.number].data.tags["fail_reason"] for t in trials[:4]] == reasons
    assert parent.info.status == "FINISHED"
    # none of the failures reaches the front
    assert all(r.data.tags.get("pareto") != "true" for n, r in runs.items() if n < 4)


def test_a_bug_in_our_code_stops_the_run_loudly(tmp_path, monkeypatch, capsys):
    def buggy(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(strategies.pipeline, "compress", buggy)
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, "--n-trials", "3", "--run-dir", str(run_dir)]) == 1
    assert "TypeError: unsupported operand" in capsys.readouterr().err
    trials = load_study(run_dir).trials
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["fail_reason"].startswith("error: TypeError")
    assert all(t.state.name == "WAITING" for t in trials[1:])  # nothing ran after it
    parent, runs = child_runs_by_trial(run_dir)
    assert parent.info.status == "FAILED" and runs[0].info.status == "FAILED"


def test_two_workers_share_one_study(tmp_path):
    run_dir = tmp_path / "run"
    proc = spawn(cli("run", SMOKE, "--n-trials", "10", "--workers", "2", "--run-dir", str(run_dir)))
    assert proc.wait(timeout=600) == 0
    stderr = proc.stderr.read()
    assert "locked" not in stderr.lower()
    trials = load_study(run_dir).trials
    evaluated = [t for t in trials if t.state.is_finished()]
    assert len(evaluated) == 10 and len({t.number for t in evaluated}) == 10
    assert not any(t.state.name == "RUNNING" for t in trials)
    parent, runs = child_runs_by_trial(run_dir)
    assert sorted(runs) == sorted(t.number for t in evaluated)
    assert parent.info.status == "FINISHED" and all(r.info.status != "RUNNING" for r in runs.values())
    # both workers ran trials: each logs its own count
    assert stderr.count("the study has reached its target") == 2


def test_malformed_configs_exit_2_before_touching_the_stores(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, "--n-trials", "1", "--run-dir", str(run_dir)]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module, not a state dict
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: smoke\nsearch: {sampler: tpe\n")
    cases = [
        (["--set", "search.samplr=tpe"], "search.samplr"),  # unknown key
        (["--set", "workload.val_size=many"], "workload.val_size"),  # wrong type
        (["--set", "search_space.pruning.structured_ratio=[0.0, 1.0]"], "pruning.structured_ratio"),
        (["--set", "search_space.quantization.weight_bits=[3, 7]"], "quantization.weight_bits"),
        (["--set", "search_space={}"], "search_space"),
        (["--set", "search.objectives=[accuracy, flops]"], "search.objectives"),
        (["--set", "search.sampler=annealing"], "search.sampler"),
        (["--data-dir", str(tmp_path / "nowhere")], "dataset-fashion-mnist"),
        (["--set", f"workload.checkpoint={tmp_path / 'missing.pt'}"], "workload.checkpoint"),
        (["--set", f"workload.checkpoint={pickled}"], "workload.checkpoint"),
        (["--set", "workload.model=nowhere.module:fn"], "workload.model"),
        (["--set", "seed=5"], "different config"),
        (["--set", "search.trial_timeout=-1"], "search.trial_timeout"),
        (["--set", "latency.runtime=tensorrt"], "latency.runtime"),
        (["--storage", "sqlite:///x.db"], "--storage"),
        (["--set", "constraints.max_accuracy_drop=1.5"], "constraints.max_accuracy_drop"),
        (["--set", "constraints.max_size_bytes=0"], "constraints.max_size_bytes"),
    ]
    for extra, key in cases:
        assert main(["run", SMOKE, "--run-dir", str(run_dir), *extra]) == 2, extra
        assert key in capsys.readouterr().err, extra
    assert main(["run", str(bad_yaml), "--run-dir", str(run_dir)]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    # asking for a fresh start moves the old study aside rather than deleting it (a new process:
    # MLflow keeps its database connections for the life of one)
    fresh = spawn(cli("run", SMOKE, "--n-trials", "1", "--run-dir", str(run_dir), "--set", "seed=5", "--fresh"))
    assert fresh.wait(timeout=300) == 0, fresh.stderr.read()
    assert len(finished(run_dir)) == 1
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1
    assert {p.relative_to(run_dir): b for p, b in before.items()} == {
        p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file()
    }


def test_a_second_driver_on_the_same_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    command = cli("run", SMOKE, "--n-trials", "2", "--run-dir", str(run_dir), *SLOW)
    first = spawn(command)
    wait_for_running_trial(run_dir, first)
    second = spawn(command)
    assert second.wait(timeout=120) == 2
    assert "another autocompress run is using" in second.stderr.read()
    assert first.wait(timeout=300) == 0
    assert sum(t.state.name == "COMPLETE" for t in load_study(run_dir).trials) == 2


POSTGRES = os.environ.get("AUTOCOMPRESS_TEST_POSTGRES")  # set by .ci/run, which starts the server


@pytest.mark.skipif(not POSTGRES, reason="set AUTOCOMPRESS_TEST_POSTGRES to a PostgreSQL URL (see .ci/postgres)")
def test_workers_on_other_machines_share_a_postgresql_study(tmp_path):
    import uuid

    name = f"pg-{uuid.uuid4().hex[:8]}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = ["--storage", POSTGRES, "--tracking-uri", tracking, "--set", f"name={name}"]
    driver = spawn(cli("run", SMOKE, "--n-trials", "0", "--run-dir", str(tmp_path / "driver"), *shared))
    assert driver.wait(timeout=300) == 0, driver.stderr.read()
    workers = [
        spawn(cli("worker", SMOKE, "--n-trials", "10", "--run-dir", str(tmp_path / f"machine-{i}"), *shared))
        for i in range(2)
    ]
    errors = [w.stderr.read() for w in workers]
    assert [w.wait(timeout=600) for w in workers] == [0, 0], errors
    assert not any("locked" in e.lower() for e in errors)
    assert all("the study has reached its target" in e for e in errors)

    trials = optuna.load_study(study_name=name, storage=POSTGRES).trials
    evaluated = [t for t in trials if t.state.is_finished()]
    assert len(evaluated) == 10 and len({t.number for t in evaluated}) == 10
    assert not any(t.state.name == "RUNNING" for t in trials)
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and {c.data.tags[PARENT_TAG] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == sorted(t.number for t in evaluated)
    assert all(r.info.status != "RUNNING" for r in runs)
