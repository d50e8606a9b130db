"""A text search end to end, on a tiny randomly initialised BERT-style model and made-up reviews:
named inputs through the trials, the task metric under its own name, and a package that a
plain ONNX Runtime session runs, fed by the tokenizer it ships."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from objectives.task import MacroF1
from search.cli import main
from search.package import load_package
from tests.helpers import TEXT_SMOKE as CONFIG
from tests.helpers import review_texts


def write_config(tmp_path, **changes):
    config = json.loads(json.dumps(CONFIG))
    for section, values in changes.items():
        config[section].update(values)
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_text_search_scores_its_metric_and_exports_a_package_that_runs_from_the_tokenizer(tmp_path, capsys, caplog):
    from mlflow.tracking import MlflowClient
    from tokenizers import Tokenizer

    from search.tracking import PARENT_TAG, sqlite_uri

    run_dir = tmp_path / "run"
    assert main(["run", write_config(tmp_path), "--run-dir", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "val macro_f1" in printed and "test macro_f1" in printed
    # not a terminal: each trial's line says how the run is going, with no progress bar
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[4/4] trial")]
    assert lines and re.search(r"\| [\d.]+ s/trial, about \d+ min left, front \d+", lines[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "macro_f1" and summary["pareto"]

    client = MlflowClient(sqlite_uri(run_dir))
    runs = client.search_runs([client.get_experiment_by_name("text-smoke").experiment_id])
    children = [r for r in runs if PARENT_TAG in r.data.tags and r.data.tags.get("state") == "COMPLETE"]
    assert children
    for child in children:  # the metric is logged under its own name, and its drop beside it
        assert {"macro_f1", "macro_f1_drop", "size_bytes", "latency_ms"} <= set(child.data.metrics)
        assert "accuracy" not in child.data.metrics
    # runs are named by what they turned on; the parent's config is one parameter per key too
    names = {int(r.data.tags["optuna.trial"]): r.info.run_name for r in runs if PARENT_TAG in r.data.tags}
    assert names[0] == "trial-0 weight_bits=8 activation_bits=8"  # the int8 anchor: nothing else on
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    assert parent.data.params["config.workload.metric"] == "macro_f1"
    assert parent.data.params["config.search.n_trials"] == "4"
    # each recorded speedup is re-timed from the trial's ONNX file alone, with named inputs
    from search.verify import verify_speedups

    rows = verify_speedups(run_dir, repeats=5)
    assert {r["trial"] for r in rows} == {int(c.data.tags["optuna.trial"]) for c in children}
    assert {r["batch_size"] for r in rows} == set(CONFIG["latency"]["batch_sizes"])
    assert all(r["standalone_speedup"] > 0 for r in rows)
    # the study storage names its objectives, as optuna-dashboard shows them
    from tests.helpers import load_study

    assert load_study(run_dir, "text-smoke").metric_names == ["macro_f1", "size_bytes", "latency_ms"]

    row = summary["pareto"][0]
    out = tmp_path / "package"
    assert main(["export", "--run-dir", str(run_dir), "--trial", str(row["trial"]), "--out", str(out)]) == 0
    spec = json.loads((out / "model.json").read_text())
    prep = spec["preprocessing"]
    assert spec["metric"] == "macro_f1" and prep["tokenizer"] == "tokenizer.json" and prep["max_length"] == 16
    assert spec["onnx_bytes"] == (out / "model.onnx").stat().st_size
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props["autocompress.trial"] == str(row["trial"]) and props["autocompress.metric"] == "macro_f1"
    assert float(props["autocompress.size_bytes"]) == (out / "weights.acw").stat().st_size
    assert float(props["autocompress.test_macro_f1"]) == row["test_macro_f1"]
    assert json.loads(props["autocompress.params"]) == spec["params"]

    # A deployment with nothing but the package: its tokenizer, its ONNX file, a bare session.
    tokenizer = Tokenizer.from_file(str(out / prep["tokenizer"]))
    tokenizer.enable_truncation(prep["max_length"])
    tokenizer.enable_padding(length=prep["max_length"])
    texts, labels = review_texts(80, seed=1)  # the test split of tests.helpers:tiny_reviews
    encodings = tokenizer.encode_batch(texts)
    feed = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted(prep["inputs"])
    logits = torch.from_numpy(session.run(None, feed)[0])
    assert MacroF1().score(logits, labels, None) == pytest.approx(row["test_macro_f1"], abs=1e-12)
    # and the packed weights rebuild the PyTorch model, which takes the same named inputs
    with torch.no_grad():
        rebuilt = load_package(out)({name: torch.from_numpy(array) for name, array in feed.items()})
    assert (rebuilt.argmax(1) == logits.argmax(1)).float().mean() >= 0.99


def test_an_embedder_is_scored_by_its_fidelity_to_the_pretrained_embeddings(tmp_path, capsys):
    space = {k: v for k, v in CONFIG["search_space"].items() if not k.startswith("distillation.")}
    space["distillation.epochs"] = [0, 1]
    space["distillation.lr"] = [1.0e-4, 1.0e-3]
    config = write_config(
        tmp_path,
        workload={
            "model": "tests.helpers:tiny_bert_embedder",
            "metric": "embedding_fidelity",
            "training": {"epochs": 0},
        },
    )
    raw = yaml.safe_load(open(config))
    raw["search_space"] = space
    open(config, "w").write(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    assert main(["run", config, "--run-dir", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["baseline"]["embedding_fidelity"] == pytest.approx(1.0, abs=1e-5)  # ONNX Runtime vs PyTorch
    assert summary["baseline"]["baseline_test_embedding_fidelity"] == pytest.approx(1.0, abs=1e-5)
    for row in summary["pareto"]:
        assert 0.0 < row["test_embedding_fidelity"] <= 1.0 + 1e-9
    # a classifier's training cannot make an embedder: refused before any work
    bad = write_config(tmp_path, workload={"model": "tests.helpers:tiny_bert_embedder", "metric": "embedding_fidelity"})
    assert main(["run", bad, "--run-dir", str(tmp_path / "bad")]) == 2
    assert "set workload.training.epochs to 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
