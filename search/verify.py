"""Check that every recorded speedup is reproduced by the trial's exported ONNX model alone.

Each trial's `model.onnx` and the baseline's are loaded into fresh ONNX Runtime sessions,
outside the search process, and timed interleaved. A trial whose recorded gain its file does
not reproduce within the tolerance is reported: the search would have claimed more than what
is deployed delivers. A file faster alone than recorded is no false claim, and passes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState

from objectives.latency import latency_batch, metric_suffix, time_interleaved
from search.rundir import baseline_dir, load_run_config, trial_dir
from search.storage import open_study
from strategies.inputs import TENSOR_INPUT_NAME, Inputs, NamedInputs, runtime_feed
from strategies.runtime import ONNX_NAME, ort_session

logger = logging.getLogger(__name__)


def verify_speedups(run_dir: Path, repeats: int = 200, tolerance: float = 0.15) -> list[dict[str, Any]]:
    """One row per COMPLETE trial and batch size: recorded speedup, standalone speedup, verdict.

    A recorded speedup counts as reproduced when the standalone one is at least as large, less
    `tolerance` (relative) or the largest of the measurements' spreads, whichever is wider.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    lat = config.latency
    baseline = ort_session(baseline_dir(run_dir) / ONNX_NAME, lat.threads)
    example = _example_inputs(baseline, lat.sequence_length)
    rows = []
    trials = [
        t
        for t in open_study(run_dir, config, create=False).trials
        if t.state == TrialState.COMPLETE and (trial_dir(run_dir, t.number) / ONNX_NAME).exists()
    ]
    for done, trial in enumerate(trials, 1):
        path = trial_dir(run_dir, trial.number) / ONNX_NAME
        session = ort_session(path, lat.threads)
        for index, batch_size in enumerate(lat.batch_sizes):
            suffix = metric_suffix(index, batch_size)
            recorded = trial.user_attrs.get(f"speedup{suffix}")
            if recorded is None:
                continue
            batch = latency_batch(example, batch_size, lat.sequence_length)
            mine, base = time_interleaved(
                [lambda b, s=session: s.run(None, runtime_feed(b)), lambda b: baseline.run(None, runtime_feed(b))],
                batch,
                lat.warmup,
                repeats,
            )
            alone = base.median_ms / mine.median_ms
            allowed = max(tolerance, mine.spread, base.spread, trial.user_attrs.get(f"latency_spread{suffix}", 0.0))
            rows.append(
                {
                    "trial": trial.number,
                    "batch_size": batch_size,
                    "recorded_speedup": recorded,
                    "standalone_speedup": alone,
                    "reproduced": math.log(alone / recorded) >= -math.log1p(allowed),
                }
            )
            logger.info(
                "[%d/%d] trial %d, batch %d: recorded %.2fx, alone %.2fx",
                done,
                len(trials),
                trial.number,
                batch_size,
                recorded,
                alone,
            )
    return rows


_TORCH_TYPES = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}


def _example_inputs(session: Any, sequence_length: int | None) -> Inputs:
    """A batch of one shaped like the baseline's ONNX inputs: zeros for one float tensor; for named
    inputs (token ids, masks), ones, at `sequence_length` where an axis is dynamic. An encoder's
    dense kernels take as long whatever the token values, so this times what the search timed."""
    inputs = session.get_inputs()
    tensors = {}
    for spec in inputs:
        if spec.type not in _TORCH_TYPES:
            raise ValueError(
                f"the baseline's ONNX input {spec.name!r} has type {spec.type}, not one of {list(_TORCH_TYPES)}"
            )
        shape = [d if isinstance(d, int) else sequence_length for d in spec.shape[1:]]
        if None in shape:
            raise ValueError(
                f"the baseline's ONNX input {spec.name!r} has a dynamic per-sample shape {spec.shape[1:]}, "
                "and the run's config sets no latency.sequence_length"
            )
        tensors[spec.name] = torch.ones(1, *shape, dtype=_TORCH_TYPES[spec.type])
    if len(inputs) == 1 and inputs[0].name == TENSOR_INPUT_NAME:
        return torch.zeros_like(tensors[TENSOR_INPUT_NAME])
    return NamedInputs(tensors)
