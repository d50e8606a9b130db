import pytest

from experiments.bench import TECHNIQUES, best_within, markdown, technique_config
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
        "distillation": {"structured_pruning", "distillation"},
        "joint": {"structured_pruning", "unstructured_pruning", "distillation", "quantization"},
    }[technique]
    assert names == expected
    if technique in ("pruning", "quantization"):  # a plain fine-tune: no teacher term
        assert config.search_space["distillation.alpha"].to_yaml() == 0.0
    assert config.name == f"bench-lenet5-{technique}"


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
                    "baseline": {"size_bytes": 2048, "test_accuracy": 0.91, "latency_ms": 0.1, "latency_ms_b64": 5.0},
                    "deep_compression_ratio": 39.0,
                    "techniques": {"joint": {"best_ratio": best, "best_speedup_b1": None, "best_speedup_b64": None}},
                }
            },
        }
    )
    assert "20.0x (trial 1, test acc -0.90 pt)" in table and "none within 1 pt" in table and "39x" in table


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
            "test_accuracy": 0.9,
            "test_accuracy_drop": 0.005,
        },
        {
            "trial": 4,
            "pruning.structured_ratio": 0.7,
            "compression_ratio": 9.0,
            "final_speedup": 5.0,
            "final_speedup_b64": 6.0,
            "test_accuracy": 0.8,
            "test_accuracy_drop": 0.1,
        },
    ]
    assert [r["trial"] for r in best_rows(rows)] == [3]  # trial 4 is outside the accuracy limit
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
