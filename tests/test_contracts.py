"""One suite over every registered strategy and every registered objective (as Optuna runs
one suite over every sampler): what the search layer relies on of each, checked on each."""

import optuna
import pytest
import torch
from optuna.trial import FixedTrial

from objectives.base import EvalContext, LatencySettings, ObjectiveError
from objectives.registry import OBJECTIVES
from strategies import pipeline
from strategies.base import PHASES
from strategies.registry import build_strategies, parse_space
from strategies.registry import pipeline as registered
from strategies.runtime import materialize
from tests.helpers import context, mlp_bn, random_model, text_context, texts, tiny_bert

STRATEGIES = registered()


def _full(cls):
    """The strategy with its whole default space (unlisted options turned on too)."""
    return cls(dict(cls.default_space))


def _model_and_context(strategy):
    """A model the strategy is for and the context a study would build for it: teacher logits,
    and the strategy's sensitivity scan where its space needs one."""
    if strategy.name == "encoder_pruning":  # a BERT-style encoder's heads, FFN neurons and layers
        model, ctx = tiny_bert(), text_context(texts(16))
    else:
        model, ctx = random_model(mlp_bn), context(n=64)  # small, with a BatchNorm to fold
    with torch.no_grad():
        ctx.teacher_logits = model(ctx.finetune_x)
    ctx.teacher = model
    scan = strategy.sensitivity(model, ctx.calibration_x, ctx.batch_size)
    if scan is not None:
        ctx.sensitivity = {strategy.name: scan}
    return model, ctx


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.name)
def test_keys_are_namespaced_and_the_phase_is_known(cls):
    assert cls.phase in PHASES
    prefixes = {key.split(".")[0] for key in cls.default_space}
    assert len(prefixes) == 1, f"{cls.name} spans namespaces {prefixes}"
    assert all(key.count(".") == 1 and all(key.split(".")) for key in cls.default_space)
    assert set(cls.unlisted_space) <= set(cls.default_space)


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.name)
def test_suggest_records_only_its_own_keys(cls):
    strategy = _full(cls)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        strategy.suggest(trial)
        assert set(trial.params) <= set(cls.default_space)
        study.tell(trial, 0.0)


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.name)
def test_the_off_values_are_the_identity(cls):
    strategy = _full(cls)
    off = {key: param.off for key, param in strategy.space.items() if param.off is not None}
    assert off, f"{cls.name} declares no off value, so no anchor or grid can turn it off"
    config = strategy.suggest(FixedTrial(off))
    assert not strategy.is_active(config)
    model, ctx = _model_and_context(strategy)
    x = ctx.finetune_x[:8]
    with torch.no_grad():
        before = model(x)
    compressed, _ = pipeline.compress(model, [strategy], {strategy.name: config}, ctx)
    with torch.no_grad():
        assert torch.equal(compressed(x), before)


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.name)
def test_errors_name_the_key(cls):
    for key in cls.default_space:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            parse_space({key: "many"})
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            parse_space({key: [1e9, 2e9]})


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.name)
def test_apply_keeps_the_output_shape(cls):
    strategy = _full(cls)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    applied = 0
    for _ in range(30):
        trial = study.ask()
        config = strategy.suggest(trial)
        study.tell(trial, 0.0)
        if not strategy.is_active(config) or getattr(config, "epochs", 0) > 2:
            continue  # off, or a long fine-tune the shape does not need
        model, ctx = _model_and_context(strategy)
        with torch.no_grad():
            shape = model(ctx.finetune_x[:5]).shape
        compressed, resolved = pipeline.compress(model, [strategy], {strategy.name: config}, ctx)
        assert compressed(ctx.finetune_x[:5]).shape == shape
        assert set(resolved) == {strategy.name}
        applied += 1
        if applied == 3:
            break
    assert applied, f"no active configuration of {cls.name} was drawn"


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.name)
def test_a_strategy_is_on_exactly_when_its_keys_are_listed(cls):
    key = next(iter(cls.default_space))
    on = build_strategies(parse_space({key: cls.default_space[key].to_yaml()}))
    assert [type(s) for s in on] == [cls]


# ------------------------------------------------------------------ objectives


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    model = random_model()
    out = tmp_path_factory.mktemp("deployed")
    return materialize(model, out, runtime="onnxruntime", threads=1, example_inputs=torch.zeros(1, 1, 28, 28))


def _eval_context(n=20, reference=None):
    x = torch.randn(n, 1, 28, 28)
    val_reference = None if reference is None else reference(x)  # the baseline's outputs, for fidelity
    return EvalContext(
        x, torch.arange(n) % 10, x[:1], LatencySettings(warmup=1, repeats=3), val_reference=val_reference
    )


@pytest.mark.parametrize("cls", list(OBJECTIVES.values()), ids=lambda c: c.name)
def test_an_objective_measures_a_finite_number_of_a_real_model(cls, deployed):
    assert cls.direction in ("maximize", "minimize") and cls.unit and cls.reference > 0
    value = cls().evaluate(deployed, _eval_context(reference=deployed.predict))
    assert isinstance(value, float) and value == value and abs(value) != float("inf")
    metrics = cls().measure(deployed, _eval_context(reference=deployed.predict))
    assert cls.name in metrics
    baseline = dict(metrics)
    assert cls().relative(metrics, baseline) in (0.0, 1.0)  # the baseline itself: no change
    assert cls.limit() in {cls.name, *cls().derived(metrics, baseline)}


class Broken:
    """A deployed model gone wrong: NaN outputs, an empty weights file."""

    def __init__(self, path):
        path.write_bytes(b"")
        self.artifact_path = path
        self.model = None

    def run(self, batch):
        return None

    def predict(self, x):
        return torch.full((len(x), 10), float("nan"))


@pytest.mark.parametrize("cls", list(OBJECTIVES.values()), ids=lambda c: c.name)
def test_an_objective_never_returns_a_non_finite_value(cls, tmp_path):
    try:
        value = cls().evaluate(Broken(tmp_path / "weights.acw"), _eval_context())
    except ObjectiveError:
        return
    assert value == value and abs(value) != float("inf")
