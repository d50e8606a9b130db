"""Config validation: every bad input names its key and the valid values."""

import pytest
import torch
import yaml

from objectives.registry import get_objective
from search.config import ConfigError, apply_override, load_config, parse_config
from strategies.registry import build_strategies
from tests.conftest import ROOT


def smoke_raw():
    return yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())


@pytest.mark.parametrize(
    "name, pruning",
    [
        ("fmnist_cnn", {"structured_pruning", "unstructured_pruning"}),
        ("fmnist_mlp", {"structured_pruning", "unstructured_pruning"}),
        ("smoke", {"structured_pruning", "unstructured_pruning"}),
        ("rt_minilm", {"encoder_pruning"}),
    ],
)
def test_shipped_configs_load_and_validate(name, pruning):
    config = load_config(ROOT / "experiments" / f"{name}.yaml")
    strategies = build_strategies(config.search_space)
    objectives = [get_objective(name) for name in config.search.objectives]
    assert config.name == name
    assert [o.name for o in objectives] == list(config.search.objectives)
    assert {s.name for s in strategies} == pruning | {"quantization", "distillation"}


@pytest.mark.parametrize(
    "override, key",
    [
        ("colour=blue", "colour"),
        ("workload.epochs=3", "workload.epochs"),
        ("workload.val_size=many", "workload.val_size"),
        ("workload.val_size=0", "workload.val_size"),
        ("workload.training.lr=-1", "workload.training.lr"),
        ("search.sampler=annealing", "search.sampler"),
        ("search.objectives=[accuracy, flops]", "search.objectives"),
        ("search.objectives=[]", "search.objectives"),
        ("latency.runtime=tensorrt", "latency.runtime"),
        ("latency.threads=0", "latency.threads"),
        ("search_space.pruning.structured_ratio=[0.0, 1.5]", "pruning.structured_ratio"),
        ("search_space.quantization.weight_bits=[4, 7]", "quantization.weight_bits"),
        ("search_space.pruning.magic=0.3", "pruning.magic"),
        ("name=bad/name", "name"),
    ],
)
def test_bad_values_name_their_key(override, key):
    raw = smoke_raw()
    apply_override(raw, override)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value)


def test_empty_search_space_is_refused():
    raw = smoke_raw()
    raw["search_space"] = {}
    with pytest.raises(ConfigError, match="search_space is empty"):
        parse_config(raw)


def test_override_parses_yaml_values_and_dotted_space_keys():
    raw = smoke_raw()
    apply_override(raw, "search_space.quantization.weight_bits=[2, 8]")
    apply_override(raw, "latency.batch_sizes=[1, 64]")
    config = parse_config(raw)
    assert config.search_space["quantization.weight_bits"].choices == (2, 8)
    assert config.latency.batch_sizes == (1, 64)
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(raw, "latency.batch_sizes")


def test_identity_ignores_trial_budget_only():
    a = parse_config(smoke_raw())
    raw = smoke_raw()
    raw["search"]["n_trials"] = 99
    assert parse_config(raw).identity() == a.identity()
    raw["seed"] = 7
    assert parse_config(raw).identity() != a.identity()


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", r"search.device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        pytest.param(
            "cuda",
            r"search.device is 'cuda', but torch finds no CUDA GPU on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_a_training_device_that_is_not_there_is_refused_before_any_work(device, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "experiments" / "smoke.yaml", [f"search.device={device}"])


def test_the_workload_s_task_metric_is_the_searched_objective_and_the_accuracy_limit_s_target():
    raw = smoke_raw()
    raw["search"].pop("objectives", None)
    raw["workload"]["metric"] = "macro_f1"
    raw["constraints"] = {"max_accuracy_drop": 0.01, "max_size_bytes": 5000}
    config = parse_config(raw)
    assert config.metric == "macro_f1"
    assert config.search.objectives == ("macro_f1", "size_bytes", "latency_ms")
    assert config.limits() == {"macro_f1_drop": 0.01, "size_bytes": 5000.0}
    assert parse_config(smoke_raw()).limits().keys() <= {"accuracy_drop", "size_bytes", "latency_ms"}
    raw["workload"]["metric"] = "bleu"
    with pytest.raises(
        ConfigError, match=r"workload.metric must be one of \['accuracy', 'embedding_fidelity', 'macro_f1'\]"
    ):
        parse_config(raw)
    raw["workload"]["metric"] = "macro_f1"
    raw["search"]["objectives"] = ["accuracy", "size_bytes"]
    with pytest.raises(
        ConfigError, match="search.objectives names the task metric 'accuracy', but workload.metric is 'macro_f1'"
    ):
        parse_config(raw)
