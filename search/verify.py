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

from optuna.trial import TrialState

from objectives.latency import latency_batch, metric_suffix, time_interleaved
from search.rundir import baseline_dir, load_run_config, trial_dir
from search.storage import open_study
from strategies.inputs import from_runtime_feed, runtime_feed
from strategies.runtime import ONNX_NAME, example_feed, ort_session

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
    # Token values do not change an encoder's dense kernels' time, so ones time what the search timed.
    example = from_runtime_feed(example_feed(baseline, lat.sequence_length))
    rows = []
    complete = [t for t in open_study(run_dir, config, create=False).trials if t.state == TrialState.COMPLETE]
    trials = [(t, trial_dir(run_dir, t.number) / ONNX_NAME) for t in complete]
    trials = [(t, path) for t, path in trials if path.exists()]
    for done, (trial, path) in enumerate(trials, 1):
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
