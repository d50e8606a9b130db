import json

import pytest

from experiments.bench import TECHNIQUES, axes, best_within, markdown, technique_config
from search.config import load_config
from strategies.registry import build_strategies
from tests.conftest import ROOT


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_each_technique_searches_only_its_own_parameters(technique):
    base = load_config(ROOT / "experiments" / "fmnist_cnn.yaml")
    config = technique_config(base, "lenet5", technique)
    strategies = build_strategies(config.search_space)
    names = {s.name for s in strategies}
    expected = {
        "pruning": {"structured_pruning", "unstructured_pruning", "distillation"},
        "quantization": {"quantization", "distillation"},
        "weight sharing": {"quantization", "distillation"},
        "distillation": {"structured_pruning", "distillation"},
        "joint": {"structured_pruning", "unstructured_pruning", "distillation", "quantization"},
    }[technique]
    assert names == expected
    if technique in ("pruning", "quantization", "weight sharing"):  # a plain fine-tune: no teacher term
        assert config.search_space["distillation.alpha"].to_yaml() == 0.0
    space = config.search_space
    scheme = {"weight sharing": ["codebook"], "joint": ["uniform", "codebook"]}.get(technique)
    assert (space["quantization.scheme"].to_yaml() if "quantization.scheme" in space else None) == scheme
    if technique in ("pruning", "joint"):  # the options the default experiments leave off
        assert space["pruning.gradual"].to_yaml() == [False, True]
        assert space["pruning.per_layer_sparsity"].to_yaml() == [False, True]
    assert config.name == f"bench-lenet5-{technique.replace(' ', '-')}"
    assert config.constraints.max_accuracy_drop is None  # the whole front; the bench selects on test


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_the_text_benchmark_shapes_its_student_by_heads_ffn_and_depth(technique):
    base = load_config(ROOT / "experiments" / "rt_minilm.yaml")
    config = technique_config(base, "minilm", technique)
    space = config.search_space
    names = {s.name for s in build_strategies(space)}
    expected = {
        "pruning": {"encoder_pruning", "distillation"},
        "quantization": {"quantization", "distillation"},
        "weight sharing": {"quantization", "distillation"},
        "distillation": {"encoder_pruning", "distillation"},
        "joint": {"encoder_pruning", "distillation", "quantization"},
    }[technique]
    assert names == expected
    assert "pruning.gradual" not in space  # no unstructured sparsity to take the options
    if technique == "distillation":
        assert {"pruning.head_ratio", "pruning.ffn_ratio", "pruning.layer_ratio"} <= set(space)
        assert space["distillation.epochs"].to_yaml() == 1  # one epoch of MiniLM takes minutes
    elif "distillation.epochs" in space:
        assert space["distillation.epochs"].to_yaml() == [0, 1]
    assert list(axes(config)) == ["best_ratio", "best_speedup_b1", "best_speedup_b32"]


def test_best_within_respects_the_accuracy_limit():
    rows = [
        {"trial": 0, "compression_ratio": 50.0, "test_accuracy": 0.80, "test_accuracy_drop": 0.10},
        {"trial": 1, "compression_ratio": 20.0, "test_accuracy": 0.90, "test_accuracy_drop": 0.009},
        {"trial": 2, "compression_ratio": 10.0, "test_accuracy": 0.91, "test_accuracy_drop": -0.001},
    ]
    best = best_within(rows, "compression_ratio")
    assert best["trial"] == 1 and best["compression_ratio"] == 20.0
    assert best_within(rows[:1], "compression_ratio") is None
    table = markdown(
        {
            "n_trials": 3,
            "models": {
                "lenet5": {
                    "axes": axes(load_config(ROOT / "experiments" / "fmnist_cnn.yaml")),
                    "baseline": {"size_bytes": 2048, "test_accuracy": 0.91, "latency_ms": 0.1, "latency_ms_b64": 5.0},
                    "deep_compression_ratio": 39.0,
                    "techniques": {"joint": {"best_ratio": best, "best_speedup_b1": None, "best_speedup_b64": None}},
                }
            },
        }
    )
    assert "20.0x (trial 1, test acc -0.90 pt)" in table and "none within 1 pt" in table and "39x" in table
    assert "5.000 ms (batch 64)" in table


def test_the_joint_study_starts_from_the_single_techniques_best_finalists():
    import optuna

    from experiments.bench import best_rows, seed_joint

    rows = [
        {
            "trial": 3,
            "pruning.structured_ratio": 0.5,
            "compression_ratio": 4.0,
            "final_speedup": 3.0,
            "final_speedup_b64": 4.0,
            "val_accuracy": 0.89,
        },
        {
            "trial": 4,
            "pruning.structured_ratio": 0.7,
            "compression_ratio": 9.0,
            "final_speedup": 5.0,
            "final_speedup_b64": 6.0,
            "val_accuracy": 0.87,
        },
    ]
    lenet = axes(load_config(ROOT / "experiments" / "fmnist_cnn.yaml"))
    assert {axis: r["trial"] for axis, r in best_rows(rows, 0.9, lenet).items()} == dict.fromkeys(
        ["best_ratio", "best_speedup_b1", "best_speedup_b64"], 3
    )  # trial 4 is more than 2 validation points behind
    assert best_rows(rows, 0.95, lenet) == {}  # nothing near enough: no seeds
    joint = load_config(ROOT / "experiments" / "fmnist_cnn.yaml")
    config = technique_config(joint, "lenet5", "joint")
    assert config.search_space["distillation.alpha"].low == 0.0  # holds the plain fine-tune of the singles
    study = optuna.create_study(directions=["maximize", "minimize"])
    seeds = {(("pruning.structured_ratio", 0.5),): "pruning trial 3"}
    strategies = build_strategies(config.search_space)
    assert seed_joint(study, strategies, seeds) == 1
    assert seed_joint(study, strategies, seeds) == 1  # resuming does not enqueue again
    (trial,) = study.trials
    assert trial.user_attrs["seeded_from"] == "pruning trial 3"
    params = study.get_trials()[0].system_attrs["fixed_params"]
    assert params["pruning.structured_ratio"] == 0.5 and params["quantization.weight_bits"] == 32


def test_the_stacks_combine_each_single_techniques_own_parameters():
    from experiments.bench import stacked

    pruned = {
        "trial": 1,
        "pruning.structured_ratio": 0.3,
        "pruning.unstructured_sparsity": 0.9,
        "distillation.epochs": 4,
    }
    quantized = {"trial": 2, "quantization.weight_bits": 4, "quantization.activation_bits": 8, "distillation.epochs": 1}
    shared = {"trial": 3, "quantization.weight_bits": 3, "distillation.epochs": 2}
    student = {"trial": 4, "pruning.structured_ratio": 0.6, "distillation.alpha": 0.7, "distillation.epochs": 3}
    int8 = {"trial": 5, "quantization.weight_bits": 8, "quantization.activation_bits": 8}
    narrow = {"trial": 6, "pruning.structured_ratio": 0.5, "pruning.unstructured_sparsity": 0.0}
    bests = {
        "pruning": {"best_ratio": pruned, "best_speedup_b64": narrow},
        "quantization": {"best_ratio": quantized, "best_speedup_b64": int8},
        "weight sharing": {"best_ratio": shared},
        "distillation": {"best_speedup_b64": student},
    }
    stacks = dict((origin, params) for params, origin in stacked(bests, "best_speedup_b64"))
    assert stacks["pruning best_ratio + quantization best_ratio"] == {
        "pruning.structured_ratio": 0.3,
        "pruning.unstructured_sparsity": 0.9,
        "distillation.epochs": 4,  # the pruned model's fine-tune, not the quantized one's
        "distillation.alpha": 0.0,  # and its study's fixed values: the plain fine-tune
        "distillation.temperature": 1.0,
        "quantization.weight_bits": 4,
        "quantization.activation_bits": 8,
    }
    ws = stacks["pruning best_ratio + weight sharing best_ratio"]
    assert ws["quantization.scheme"] == "codebook" and ws["quantization.weight_bits"] == 3  # its fixed scheme
    fast = stacks["distillation best_speedup_b64 + quantization best_speedup_b64"]
    assert fast["pruning.structured_ratio"] == 0.6 and fast["quantization.activation_bits"] == 8
    narrow_int8 = stacks["pruning best_speedup_b64 + quantization best_speedup_b64"]
    assert narrow_int8["pruning.structured_ratio"] == 0.5 and narrow_int8["quantization.weight_bits"] == 8
    assert stacked({"pruning": {"best_ratio": pruned}}, "best_speedup_b64") == []  # nothing to stack it with


def test_the_benchmark_runs_every_study_and_row_end_to_end(tmp_path):
    """On the smoke workload, two trials per study: every row is written, the ORT reference is
    timed beside the int8 anchor, and the bit-packed file of the best-ratio trial is larger."""
    import json
    import shutil

    from experiments.bench import run_bench

    experiments = tmp_path / "experiments"
    experiments.mkdir()
    shutil.copy(ROOT / "experiments" / "smoke.yaml", experiments / "fmnist_mlp.yaml")
    results = run_bench(tmp_path / "bench", ["lenet300"], 2, experiments)
    entry = results["models"]["lenet300"]
    assert set(entry["techniques"]) == {*TECHNIQUES, "joint, finished", "joint, bit-packed"}
    reference = entry["ort_reference"]["rows"]
    assert set(reference) == {"baseline", "int8 anchor", "quantize_static"}
    assert all(0 < row["test_accuracy"] <= 1 and row["speedup_b1"] > 0 for row in reference.values())
    packed = entry["techniques"]["joint, bit-packed"]["best_ratio"]
    if packed is not None:
        assert packed["size_bytes"] >= packed["coded"]["size_bytes"]
    written = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert written["models"]["lenet300"]["deep_compression_ratio"] == 40.0
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert "| lenet300 | weight sharing |" in table and "quantize_static (ORT reference" in table


def test_the_text_benchmark_runs_every_study_on_a_tiny_bert(tmp_path):
    """The text row: each technique alone and the joint search on the tiny BERT, with the
    speedups at the workload's own batch sizes, and no LeNet-only rows."""
    import copy

    import yaml

    from experiments.bench import run_bench
    from tests.helpers import TEXT_SMOKE

    config = copy.deepcopy(TEXT_SMOKE)
    config["workload"]["metric"] = "accuracy"  # what the benchmark's limit reads
    config["search_space"]["pruning.layer_ratio"] = [0.0, 0.5]
    config["latency"]["batch_sizes"] = [1, 4]
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "rt_minilm.yaml").write_text(yaml.safe_dump(config))
    entry = run_bench(tmp_path / "bench", ["minilm"], 1, experiments)["models"]["minilm"]
    assert set(entry["techniques"]) == {*TECHNIQUES, "joint, bit-packed"}
    assert list(entry["axes"]) == ["best_ratio", "best_speedup_b1", "best_speedup_b4"]
    assert "ort_reference" not in entry and "deep_compression_ratio" not in entry
    assert entry["baseline"]["latency_ms_b4"] > 0
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert "| minilm | weight sharing |" in table and "(batch 4)" in table and "Deep Compression" not in table


def test_the_kernel_measurement_times_the_integer_and_the_float_input_of_one_conv(tmp_path):
    from experiments import kernels

    for integer in (True, False):
        model = kernels._model(1, 4, 3, 8, integer)
        assert hasattr(model[0], "input_scale") is integer and hasattr(model[2], "input_scale")
    row = kernels.measure(1, 4, 3, 8, batch_size=2, repeats=3)
    assert row["integer_ms"] > 0 and row["float_ms"] > 0
    assert row["integer_over_float"] == row["integer_ms"] / row["float_ms"]
    kernels.main(["--repeats", "2", "--batch-size", "2", "--out", str(tmp_path / "k.json")])
    assert len(json.loads((tmp_path / "k.json").read_text())["rows"]) == len(kernels.CASES)
