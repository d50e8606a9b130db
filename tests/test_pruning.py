import dataclasses

import optuna
import pytest
import torch
from optuna.trial import FixedTrial

from objectives.complexity import count_macs, count_params
from strategies import pipeline as compression
from strategies.base import CompressionError, Strategy, StrategyConfig
from strategies.distillation import Distillation, DistillationConfig, distill_
from strategies.quantization import Quantization, QuantizationConfig
from strategies.registry import (
    all_space_keys,
    build_strategies,
    parse_space,
    pipeline,
    register_strategy,
    unregister_strategy,
)
from strategies.space import TOP, ChoiceParam, FloatParam, IntParam, parse_param
from strategies.structured import StructuredPruning, StructuredPruningConfig
from strategies.unstructured import (
    RAMP_SHARE,
    UnstructuredPruning,
    UnstructuredPruningConfig,
    prunable_weights,
    prune_per_layer_,
    prune_weights_,
)
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
    assert widths[-1] == 10 and all(w < o for w, o in zip(widths[:-1], originals[:-1], strict=True))


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
    config = StructuredPruning(parse_space({"pruning.structured_ratio": [0.1, 0.2]})).suggest(trial)
    assert 0.1 <= config.ratio <= 0.2 and list(trial.params) == ["pruning.structured_ratio"]


def test_per_layer_sparsity_spares_the_sensitive_layers_and_keeps_the_overall_sparsity():
    from optuna.trial import FixedTrial

    model = trained_like(MODELS["lenet5"])
    strategy = UnstructuredPruning(parse_space({"pruning.per_layer_sparsity": [False, True]}))
    assert UnstructuredPruning().sensitivity(model, context().calibration_x, 32) is None
    ctx = context(n=256)
    scan = strategy.sensitivity(model, ctx.calibration_x, 32)
    sizes = {name: w.numel() for name, w in prunable_weights(model)}
    assert list(scan) == list(sizes) and all(v[1.0] == 0.0 and v[0.01] > v[0.5] for v in scan.values())
    # the first convolution (500 weights) as the most sensitive layer, the 400k-weight one as the least
    names = list(sizes)
    costs = {n: {d: (1 - d) * f for d in scan[n]} for n, f in zip(names, (100.0, 10.0, 0.1, 1.0), strict=True)}
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


# ---------------------------------------------------------------------- gradual pruning


class StepRecorder(Strategy):
    """Not a technique: records, through the fine-tune's step hook, which float weights are
    zero after each step (placed after unstructured pruning, it sees what that hook did)."""

    name = "step_recorder"
    phase = "finetune"
    default_space = {"recorder.on": ChoiceParam((True,))}

    def __init__(self):
        super().__init__()
        self.zeros = []  # (step, total_steps, each layer's zero mask)

    def suggest(self, trial):
        return StrategyConfig()

    def is_active(self, config):
        return False

    def apply(self, model, config, context):
        return model

    def before_finetune(self, model, config, context):
        then = context.on_step

        def record(model, step, total_steps):
            changed = then(model, step, total_steps)
            self.zeros.append((step, total_steps, [(w == 0).clone() for _, w in prunable_weights(model)]))
            return changed

        return config, dataclasses.replace(context, on_step=record)


GRADUAL_SPACE = {"pruning.per_layer_sparsity": [False, True], "pruning.gradual": [False, True]}


def _compressed(sparsity, *, gradual=True, epochs=2, bits=32, per_layer=False, recorder=None):
    """LeNet-300-100 through pipeline.compress with a distillation fine-tune of `epochs` (8
    updates each) on a small synthetic context; the model and the context."""
    model = trained_like(MODELS["lenet300"])
    ctx = context(n=128, batch_size=16)
    with torch.no_grad():
        ctx.teacher_logits = model(ctx.finetune_x)
    unstructured = UnstructuredPruning(parse_space(GRADUAL_SPACE))
    if per_layer:
        ctx.sensitivity = {unstructured.name: unstructured.sensitivity(model, ctx.calibration_x, 16)}
    strategies = [unstructured, *([recorder] if recorder else []), Distillation(), Quantization()]
    configs = {
        unstructured.name: UnstructuredPruningConfig(sparsity, per_layer, gradual),
        "step_recorder": StrategyConfig(),
        "distillation": DistillationConfig(epochs, 4.0, 0.7, 3e-3),
        "quantization": QuantizationConfig(bits, 32),
    }
    return compression.compress(model, strategies, configs, ctx)[0], ctx


def _zeros(model):
    return {name: int((w == 0).sum()) for name, w in prunable_weights(model)}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
@pytest.mark.parametrize("mode", ["float", "int8-aware", "per-layer"])
def test_gradual_pruning_reaches_its_target_exactly(sparsity, mode):
    model, ctx = _compressed(sparsity, bits=8 if mode == "int8-aware" else 32, per_layer=mode == "per-layer")
    zeros = _zeros(model)
    if mode == "per-layer":  # each layer at the level the one-shot per-layer prune gives it
        scan = ctx.sensitivity["unstructured_pruning"]
        assert zeros == _zeros(prune_per_layer_(trained_like(MODELS["lenet300"]), sparsity, scan))
    else:
        total = sum(w.numel() for _, w in prunable_weights(model))
        assert sum(zeros.values()) == round(sparsity * total)


@pytest.mark.parametrize("bits", [32, 4])
def test_gradual_sparsity_rises_on_the_cubic_schedule_and_what_it_pruned_stays_pruned(bits):
    recorder = StepRecorder()
    target = 0.9
    model, _ = _compressed(target, bits=bits, recorder=recorder)
    total = sum(w.numel() for _, w in prunable_weights(model))
    assert [(step, n) for step, n, _ in recorder.zeros] == [(step, 16) for step in range(17)]
    sparsity = [sum(int(m.sum()) for m in masks) / total for _, _, masks in recorder.zeros]
    # from the unpruned weights (the one-shot prune put back), up s_f (1 - (1 - t/n)^3) ...
    end = round(16 * RAMP_SHARE)
    for step in range(end + 1):
        assert abs(sparsity[step] - target * (1 - (1 - step / end) ** 3)) <= 1 / total, step
    # ... to the target, reached by the end of the first of two epochs (where the search's early
    # check looks) and kept while the rest of the fine-tune recovers
    assert sparsity[end:] == [round(target * total) / total] * (17 - end)
    for (_, _, before), (_, _, after) in zip(recorder.zeros[1:], recorder.zeros[2:], strict=False):
        assert all(bool(now[then].all()) for then, now in zip(before, after, strict=True))
    final = [w == 0 for _, w in prunable_weights(model)]
    assert all(torch.equal(a, b) for a, b in zip(final, recorder.zeros[-1][2], strict=True))


def test_without_a_fine_tune_gradual_is_the_one_shot_prune_and_off_is_the_one_shot_fine_tune():
    one_shot = _state(_compressed(0.9, gradual=False, epochs=0)[0])
    assert _same(_state(_compressed(0.9, epochs=0)[0]), one_shot)
    # off: the one-shot prune and its fine-tune, byte for byte as without the option
    model = prune_weights_(trained_like(MODELS["lenet300"]), 0.9)
    ctx = context(n=128, batch_size=16)
    with torch.no_grad():
        logits = trained_like(MODELS["lenet300"])(ctx.finetune_x)
    distill_(model, ctx.finetune_x, ctx.finetune_y, logits, DistillationConfig(2, 4.0, 0.7, 3e-3), batch_size=16)
    assert _same(_state(_compressed(0.9, gradual=False)[0]), _state(model))
    gradual = _compressed(0.9)[0]
    assert not _same(_state(gradual), _state(model)) and _zeros(gradual) != _zeros(model)


def test_gradual_is_searched_only_where_listed_and_where_weights_are_pruned():
    listed = UnstructuredPruning(parse_space({"pruning.gradual": [False, True]}))
    on = {"pruning.unstructured_sparsity": 0.9, "pruning.gradual": True}
    assert listed.suggest(FixedTrial(on)) == UnstructuredPruningConfig(0.9, gradual=True)
    assert listed.suggest(FixedTrial({"pruning.unstructured_sparsity": 0.0})) == UnstructuredPruningConfig(0.0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        assert not UnstructuredPruning().suggest(trial).gradual and "pruning.gradual" not in trial.params
        study.tell(trial, 0.0)
    with pytest.raises(ValueError, match=r"pruning.gradual must be one of \[False, True\]"):
        UnstructuredPruningConfig(0.5, gradual=1)


# ------------------------------------------- every strategy: its search space and the registry


def test_search_space_errors_name_the_key():
    with pytest.raises(
        ValueError, match=r"unknown search_space key 'pruning.ratio'; valid keys are \[.*'pruning.structured"
    ):
        parse_space({"pruning.ratio": 0.5})
    with pytest.raises(ValueError, match=r"search_space is empty; name at least one of \['distillation.alpha'"):
        parse_space({})
    with pytest.raises(ValueError, match=r"pruning.structured_ratio must lie within \[0.0, 0.9\], got \[0.0, 0.95\]"):
        parse_space({"pruning.structured_ratio": [0.0, 0.95]})
    with pytest.raises(
        ValueError, match=r"quantization.weight_bits must be chosen from \[2, 3, 4, 5, 6, 8, 32\], got 7"
    ):
        parse_space({"quantization.weight_bits": [4, 7]})
    with pytest.raises(ValueError, match=r"distillation.epochs must be whole numbers within \[0, 20\], got \[0, 1.5\]"):
        parse_space({"distillation.epochs": [0, 1.5]})
    with pytest.raises(TypeError, match="pruning.structured_ratio"):
        StructuredPruning({"pruning.structured_ratio": [0.1, 0.2]})  # raw YAML: parse_space first


def test_parse_space_returns_the_listed_keys_narrowed_with_their_off_values():
    space = parse_space({"quantization.weight_bits": [32, 4], "pruning.structured_ratio": [0.1, 0.4]})
    assert space == {
        "pruning.structured_ratio": FloatParam(0.1, 0.4, off=0.0),  # 0 is outside, and still the off value
        "quantization.weight_bits": ChoiceParam((4, 32), off=32),
    }
    strategies = build_strategies(space)
    assert [s.name for s in strategies] == ["structured_pruning", "quantization"]
    assert strategies[1].space["quantization.mixed_precision"] == ChoiceParam((False,), off=False)  # off unless listed


def _narrowed(param):
    if isinstance(param, ChoiceParam):
        return [param.choices[0], param.choices[-1]]
    return [param.low, (param.low + param.high) // 2 if isinstance(param, IntParam) else (param.low + param.high) / 2]


@pytest.mark.parametrize("cls", pipeline(), ids=lambda cls: cls.__name__)
def test_params_write_back_the_yaml_they_parse_from(cls):
    for key, default in cls.default_space.items():
        assert parse_param(key, default.to_yaml(), default) == default
        narrowed = parse_param(key, _narrowed(default), default)
        assert parse_param(key, narrowed.to_yaml(), default) == narrowed and narrowed.off == default.off
        assert default.off is None or default.admits(default.off)
    assert FloatParam(0.5, 0.5).to_yaml() == 0.5 and IntParam(0, 3).to_yaml() == [0, 3]
    assert not ChoiceParam((4, 8)).admits(True) and not ChoiceParam((False, True)).admits(1)


@pytest.mark.parametrize("cls", pipeline(), ids=lambda cls: cls.__name__)
def test_off_values_turn_the_strategy_off(cls):
    from optuna.trial import FixedTrial

    strategy = cls()
    off = {key: param.off for key, param in strategy.space.items() if param.off is not None}
    assert off, "a strategy needs a parameter that turns it off"
    assert not strategy.is_active(strategy.suggest(FixedTrial(off)))


def test_anchors_are_in_rank_order_and_inside_the_default_space():
    anchors = sorted((a for cls in pipeline() for a in cls.anchors), key=lambda a: a.rank)
    names = [
        "int8",
        "4-bit",
        "structured-50",
        "heads-ffn-50",
        "unstructured-80",
        "student-half",
        "student-smallest",
        "pruned-92-recovered",
        "student-half-depth",
        "student-narrow-int8",
        "4-bit-recovered",
    ]
    assert [a.name for a in anchors] == names
    defaults = {key: param for cls in pipeline() for key, param in cls.default_space.items()}
    for anchor in anchors:
        assert all(value is TOP or defaults[key].admits(value) for key, value in anchor.params.items()), anchor


class Toy(Strategy):
    """A fifth technique, registered for one test at a time."""

    name = "toy"
    phase = "finetune"
    default_space = {"toy.level": IntParam(0, 3, off=0)}

    def suggest(self, trial):
        return self._suggest(trial, "toy.level")

    def apply(self, model, config, context):
        return model


def test_a_registered_strategy_takes_its_place_by_phase():
    assert [cls.phase for cls in pipeline()] == ["prune", "prune", "prune", "finetune", "quantize"]
    early = type("EarlyToy", (Toy,), {"phase": "prune"})
    register_strategy(early)
    try:
        order = [
            "StructuredPruning",
            "EncoderPruning",
            "UnstructuredPruning",
            "EarlyToy",
            "Distillation",
            "Quantization",
        ]
        assert [cls.__name__ for cls in pipeline()] == order
        assert "toy.level" in all_space_keys()
        strategies = build_strategies(parse_space({"distillation.epochs": 1, "toy.level": [0, 2]}))
        assert [s.name for s in strategies] == ["toy", "distillation"]
    finally:
        unregister_strategy(early)
    assert "toy.level" not in all_space_keys()


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"phase": "export"}, r"Bad.phase must be one of \['prune', 'finetune', 'quantize'\], got 'export'"),
        ({"name": "quantization"}, r"strategy name 'quantization' of Bad is already registered by Quantization"),
        (
            {"default_space": {"quantization.weight_bits": ChoiceParam((4, 8))}},
            r"Bad's search_space key 'quantization.weight_bits' is already registered by Quantization",
        ),
        ({"default_space": {"level": IntParam(0, 3)}}, r"Bad's search_space key 'level' must be namespaced"),
    ],
)
def test_register_strategy_refuses_an_unknown_phase_and_taken_names(attrs, message):
    bad = type("Bad", (Toy,), attrs)
    with pytest.raises(ValueError, match=message):
        register_strategy(bad)
    assert bad not in pipeline()
