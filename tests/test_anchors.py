import optuna

from search.anchors import anchor_params, enqueue_anchors
from tests.helpers import strategies_for


def test_every_anchor_is_one_technique_alone_within_the_space():
    strategies = strategies_for(
        {
            "pruning.structured_ratio": [0.0, 0.75],
            "pruning.unstructured_sparsity": [0.0, 0.95],
            "quantization.weight_bits": [2, 4, 8, 32],
            "quantization.mixed_precision": [False, True],
            "pruning.per_layer_sparsity": [False, True],
            "distillation.epochs": [0, 2],
        }
    )
    anchors = anchor_params(strategies)
    assert list(anchors) == ["int8", "4-bit", "structured-50", "unstructured-80", "student-half", "student-smallest"]
    assert anchors["int8"] == {
        "pruning.structured_ratio": 0.0,
        "pruning.unstructured_sparsity": 0.0,
        "pruning.per_layer_sparsity": False,  # one global threshold
        "pruning.gradual": False,  # pruned at once
        "quantization.weight_bits": 8,
        "quantization.activation_bits": 8,
        "quantization.mixed_precision": False,  # the same width everywhere
        "quantization.scheme": "uniform",  # a uniform grid, not a codebook
        "distillation.epochs": 0,
        "distillation.optimizer": "sgd",  # the fine-tune's plain SGD, had it one
    }
    assert anchors["student-half"]["distillation.epochs"] == 2  # the top of the range
    assert anchors["student-half"]["quantization.weight_bits"] == 32
    assert anchors["student-smallest"]["pruning.structured_ratio"] == 0.75  # the top of the range
    assert anchors["student-smallest"]["distillation.epochs"] == 2


def test_an_anchor_that_repeats_an_earlier_one_is_left_out():
    strategies = strategies_for({"pruning.structured_ratio": [0.0, 0.5], "distillation.epochs": [0, 1]})
    anchors = anchor_params(strategies)
    assert list(anchors) == ["structured-50", "student-half"]  # the narrowest student is the half-width one


def test_anchors_outside_the_space_are_skipped_and_off_values_left_to_the_sampler():
    strategies = strategies_for({"pruning.structured_ratio": [0.1, 0.4], "quantization.weight_bits": [4, 32]})
    anchors = anchor_params(strategies)
    assert set(anchors) == {"4-bit"}  # 8-bit, 50 % and the unconfigured techniques do not fit
    assert "pruning.structured_ratio" not in anchors["4-bit"]  # 0 is outside [0.1, 0.4]


def test_anchors_are_enqueued_once_into_a_new_study_only():
    strategies = strategies_for({"quantization.weight_bits": [4, 8, 32]})
    study = optuna.create_study()
    assert enqueue_anchors(study, strategies) == ["int8", "4-bit"]
    trial = study.ask()
    assert trial.user_attrs["anchor"] == "int8"
    assert strategies[0].suggest(trial).weight_bits == 8
    study.tell(trial, 0.0)
    assert enqueue_anchors(study, strategies) == []


def test_the_deep_compression_anchor_needs_both_pruning_options_and_leaves_the_loss_to_the_sampler():
    space = {
        "pruning.unstructured_sparsity": [0.0, 0.95],
        "distillation.epochs": [0, 4],
        "distillation.lr": [1e-4, 3e-2],
    }
    assert "pruned-92-recovered" not in anchor_params(strategies_for(space))  # not in the default experiments
    options = {"pruning.per_layer_sparsity": [False, True], "pruning.gradual": [False, True]}
    anchor = anchor_params(strategies_for({**space, **options}))["pruned-92-recovered"]
    assert anchor["pruning.unstructured_sparsity"] == 0.92 and anchor["pruning.gradual"] is True
    assert anchor["distillation.epochs"] == 4 and anchor["distillation.lr"] == 0.03
    assert "distillation.alpha" not in anchor and "distillation.temperature" not in anchor


def _text_anchors():
    from search.config import load_config
    from strategies.registry import build_strategies
    from tests.conftest import ROOT

    return anchor_params(build_strategies(load_config(ROOT / "experiments" / "rt_minilm.yaml").search_space))


def test_the_text_experiment_starts_from_each_technique_students_and_recovered_low_bit_models():
    anchors = _text_anchors()
    assert list(anchors) == [
        "int8",
        "4-bit",
        "heads-ffn-50",
        "student-half-depth",
        "student-narrow-int8",
        "4-bit-recovered",
    ]
    student = anchors["student-half-depth"]
    assert student["pruning.layer_ratio"] == 0.5 and student["distillation.epochs"] == 1
    assert student["pruning.head_ratio"] == 0.0 and student["quantization.weight_bits"] == 32
    assert "distillation.lr" not in student  # the sampler's
    narrow = anchors["student-narrow-int8"]
    assert (narrow["pruning.head_ratio"], narrow["pruning.ffn_ratio"], narrow["pruning.layer_ratio"]) == (
        0.375,
        0.25,
        0.17,
    )
    assert narrow["quantization.weight_bits"] == narrow["quantization.activation_bits"] == 8
    assert narrow["distillation.epochs"] == 1 and narrow["distillation.lr"] == 2e-4
    low_bit = anchors["4-bit-recovered"]
    assert (low_bit["quantization.weight_bits"], low_bit["quantization.activation_bits"]) == (4, 8)
    assert low_bit["pruning.head_ratio"] == low_bit["pruning.layer_ratio"] == 0.0
    assert low_bit["distillation.epochs"] == 1 and low_bit["distillation.lr"] == 2e-4


def test_the_narrow_int8_student_keeps_7_of_12_heads_three_quarters_of_the_ffn_and_5_of_6_layers():
    """On MiniLM's geometry (6 layers of 12 heads), scaled down: the anchor's ratios remove
    what the README says they remove: Torch-Pruning keeps int(12 x 0.625) = 7 heads, not 7.5 rounded."""
    from strategies.transformer import EncoderPruningConfig, prune_encoder_
    from tests.helpers import texts, tiny_bert

    model = tiny_bert(hidden_size=24, num_hidden_layers=6, num_attention_heads=12, intermediate_size=96)
    narrow = _text_anchors()["student-narrow-int8"]
    x = texts(4)
    ratios = (narrow[f"pruning.{name}"] for name in ("head_ratio", "ffn_ratio", "layer_ratio"))
    prune_encoder_(model, EncoderPruningConfig(*ratios), x[:1])
    stack = model.encoder.encoder.layer
    assert len(stack) == 5
    assert {layer.attention.self.num_attention_heads for layer in stack} == {7}
    assert {layer.intermediate.dense.out_features for layer in stack} == {72}
    assert model(x).shape == (4, 2)
