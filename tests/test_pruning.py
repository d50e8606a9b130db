import pytest
import torch

from objectives.complexity import count_macs, count_params
from strategies.base import CompressionError
from strategies.structured import StructuredPruning, StructuredPruningConfig
from strategies.unstructured import UnstructuredPruning, UnstructuredPruningConfig, prunable_weights, prune_weights_
from tests.helpers import MODELS, context, trained_like


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_structured_pruning_shrinks_params_and_macs_and_keeps_output_shape(name, ratio):
    ctx = context()
    model = trained_like(MODELS[name])
    params, macs = count_params(model), count_macs(model, ctx.example_inputs)
    pruned = StructuredPruning().apply(model, StructuredPruningConfig(ratio), ctx)
    assert count_params(pruned) < params * (1 - ratio / 2)
    assert count_macs(pruned, ctx.example_inputs) < macs * (1 - ratio / 2)
    assert pruned(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    # the classifier keeps its 10 outputs; hidden layers really lost channels
    widths = [m.weight.shape[0] for m in pruned.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    originals = [
        m.weight.shape[0] for m in MODELS[name]().modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert widths[-1] == 10 and all(w < o for w, o in zip(widths[:-1], originals[:-1]))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_structured_ratio_out_of_range_names_the_key(ratio):
    with pytest.raises(ValueError, match=r"pruning.structured_ratio must be in \[0, 1\)"):
        StructuredPruningConfig(ratio)


def test_structured_pruning_that_breaks_the_model_is_a_compression_error():
    class HardCodedReshape(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3)
            self.fc = torch.nn.Linear(8 * 26 * 26, 10)

        def forward(self, x):  # a constant width the dependency graph cannot update
            return self.fc(self.conv(x).reshape(x.shape[0], 8 * 26 * 26))

    with pytest.raises(CompressionError, match="no longer runs"):
        StructuredPruning().apply(HardCodedReshape(), StructuredPruningConfig(0.5), context())


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_unstructured_pruning_hits_global_sparsity_with_exact_zeros(sparsity):
    model = trained_like(MODELS["lenet300"])
    before = {n: w.detach().clone() for n, w in prunable_weights(model)}
    pruned = UnstructuredPruning().apply(model, UnstructuredPruningConfig(sparsity), context())
    weights = prunable_weights(pruned)
    total = sum(w.numel() for _, w in weights)
    zeros = sum(int((w == 0).sum()) for _, w in weights)
    assert abs(zeros / total - sparsity) < 0.005
    # within each layer the kept weights are unchanged and larger than the dropped ones
    for name, w in weights:
        dropped = before[name][w == 0]
        if len(dropped) and (w != 0).any():
            assert dropped.abs().max() <= w[w != 0].abs().min()
    for name, w in weights:
        assert torch.equal(w[w != 0], before[name][w != 0])
    assert not any(hasattr(m, "weight_orig") for m in pruned.modules())


def test_unstructured_pruning_that_would_empty_a_layer_fails():
    model = trained_like(MODELS["lenet300"])
    with torch.no_grad():
        # equal magnitudes score about 1 std, below the kept tail of the other layers' spread
        model[5].weight.copy_(torch.sign(torch.randn_like(model[5].weight)) * 0.1)
    with pytest.raises(CompressionError, match="removes every weight of layer 5"):
        prune_weights_(model, 0.9)


def test_suggest_uses_namespaced_params():
    import optuna

    study = optuna.create_study()
    trial = study.ask()
    config = StructuredPruning({"pruning.structured_ratio": [0.1, 0.2]}).suggest(trial)
    assert 0.1 <= config.ratio <= 0.2 and list(trial.params) == ["pruning.structured_ratio"]


def test_per_layer_sparsity_spares_the_sensitive_layers_and_keeps_the_overall_sparsity():
    from optuna.trial import FixedTrial

    model = trained_like(MODELS["lenet5"])
    strategy = UnstructuredPruning({"pruning.per_layer_sparsity": [False, True]})
    assert UnstructuredPruning().sensitivity(model, context().calibration_x, 32) is None
    ctx = context(n=256)
    scan = strategy.sensitivity(model, ctx.calibration_x, 32)
    sizes = {name: w.numel() for name, w in prunable_weights(model)}
    assert list(scan) == list(sizes) and all(v[1.0] == 0.0 and v[0.01] > v[0.5] for v in scan.values())
    # the first convolution (500 weights) as the most sensitive layer, the 400k-weight one as the least
    names = list(sizes)
    costs = {n: {d: (1 - d) * f for d in scan[n]} for n, f in zip(names, (100.0, 10.0, 0.1, 1.0))}
    ctx.sensitivity = {"unstructured_pruning": costs}

    config = strategy.suggest(FixedTrial({"pruning.unstructured_sparsity": 0.9, "pruning.per_layer_sparsity": True}))
    assert config == UnstructuredPruningConfig(0.9, per_layer=True)
    pruned = strategy.apply(trained_like(MODELS["lenet5"]), config, ctx)
    zeros = {name: int((w == 0).sum()) for name, w in prunable_weights(pruned)}
    assert sum(zeros.values()) >= 0.9 * sum(sizes.values()) - len(sizes)  # the overall target holds
    assert zeros[names[0]] / sizes[names[0]] < zeros[names[2]] / sizes[names[2]]
    record = strategy.layer_record(pruned, config)["pruning.layer_sparsity"]
    assert record.split()[2] == f"{names[2]}:{zeros[names[2]] / sizes[names[2]]:.3f}"
    assert strategy.layer_record(pruned, UnstructuredPruningConfig(0.9)) == {}

    with pytest.raises(CompressionError, match="sensitivity scan"):
        strategy.apply(trained_like(MODELS["lenet5"]), config, context())
    with pytest.raises(ValueError, match=r"pruning.per_layer_sparsity must be one of \[False, True\]"):
        UnstructuredPruningConfig(0.5, per_layer="yes")
