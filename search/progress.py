"""What a running search shows: one line per finished trial, and how the whole run is going.

Each line ends with the time per trial, an estimate of the time left, the size of the feasible
front and its smallest model. On a terminal a progress bar stays below the lines; in a log
file or CI there is no bar, only the lines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any, Iterator, TextIO

from search.prepare import Prepared
from search.records import feasible, feasible_points, finished_trials, pareto_trials, reason

logger = logging.getLogger("autocompress")


def describe_trial(trial: Any, count: int, n_trials: int, metric: str) -> str:
    """`[count/n] trial N STATE` and its figures, or the reason it did not complete."""
    attrs, head = trial.user_attrs, f"[{count}/{n_trials}] trial {trial.number}"
    if trial.state.name != "COMPLETE":
        return f"{head} {trial.state.name}  {reason(attrs)}"
    nan = float("nan")
    return (
        f"{head} COMPLETE  {'acc' if metric == 'accuracy' else metric} {attrs.get(metric, nan):.4f}  "
        f"size {attrs.get('size_bytes', nan) / 1024:.1f} kB ({attrs.get('compression_ratio', nan):.1f}x)  "
        f"latency {attrs.get('latency_ms', nan):.3f} ms ({attrs.get('speedup', nan):.2f}x)  "
        f"{attrs.get('trial_seconds', nan):.1f}s"
    )


class Progress:
    """The `on_trial` callback of a run: call it with (study, trial) as each trial finishes."""

    def __init__(self, p: Prepared, n_trials: int, stream: TextIO | None = None) -> None:
        self.metric, self.n_trials = p.config.metric, n_trials
        self.started, self.first = time.monotonic(), finished_trials(p.study)
        stream = stream or sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=n_trials, initial=self.first, unit="trial", file=stream, dynamic_ncols=True)

    def status(self, study: Any, count: int) -> str:
        """Time per trial and left (from this process's own trials), the feasible front."""
        ran = count - self.first
        per = (time.monotonic() - self.started) / ran if ran > 0 else math.nan
        left = max(0, self.n_trials - count) * per / 60
        front = [t for t in pareto_trials(study) if feasible(t)]
        parts = [f"{per:.3g} s/trial, about {left:.0f} min left" if ran > 0 else "", f"front {len(front)}"]
        points = [p for p in feasible_points(study.get_trials(deepcopy=False)) if "size_bytes" in p]
        if points:
            best = min(points, key=lambda p: p["size_bytes"])
            parts.append(
                f"smallest feasible {best['size_bytes'] / 1024:.1f} kB ({self.metric} {best[self.metric]:.4f})"
            )
        return ", ".join(part for part in parts if part)

    def __call__(self, study: Any, trial: Any) -> None:
        count = finished_trials(study)
        line = describe_trial(trial, count, self.n_trials, self.metric)
        if self.bar is None:  # a log file: the run's state on every line
            logger.info("%s  | %s", line, self.status(study, count))
            return
        logger.info("%s", line)
        self.bar.n = count  # the bar shows the rate and the time left itself
        self.bar.set_postfix_str(self.status(study, count), refresh=True)

    @contextlib.contextmanager
    def showing(self) -> Iterator[Progress]:
        """Around the run: log lines print above the bar, which is removed at the end."""
        if self.bar is None:
            yield self
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger()]):
                yield self
        finally:
            self.bar.close()
