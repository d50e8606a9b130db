"""The int8 anchor beside ONNX Runtime's own quantizer, on the same trained model.

ONNX Runtime's `quantize_static` (QDQ, per-channel, its default int8 types, calibrated on the
study's calibration images) quantizes the baseline's exported ONNX file; the study's int8
anchor trial is what autocompress deploys for the same request. The baseline, the anchor
and the reference run in one interleaved timing loop at each configured batch size, and
each is scored on the test split through its own ONNX Runtime session.

    python -m experiments.ort_reference [--config experiments/fmnist_cnn.yaml]   # a study of its own
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from objectives.accuracy import top1_accuracy
from objectives.latency import latency_batch, time_interleaved
from search.prepare import Prepared
from search.rundir import baseline_dir, trial_dir
from strategies.runtime import ONNX_NAME, ort_session

REFERENCE_NAME = "ort_quantize_static.onnx"


def quantize_static_reference(prepared: Prepared, out: Path) -> Path:
    """ONNX Runtime's own static quantization of the baseline, as its documentation shows it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    images = prepared.context.calibration_x.numpy()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images[i : i + 1] for i in range(len(images)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    out.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises pre-processing on the root logger at every call
    try:
        source = baseline_dir(prepared.run_dir) / ONNX_NAME
        quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    finally:
        root.setLevel(level)
    return out


def _predict(session) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def anchor_trial(prepared: Prepared, name: str = "int8") -> int:
    for trial in prepared.study.trials:
        if trial.user_attrs.get("anchor") == name and trial.state.is_finished() and trial.values:
            return trial.number
    raise LookupError(f"the study {prepared.config.name} has no completed {name!r} anchor trial")


def compare(prepared: Prepared, out_dir: Path, repeats: int = 300) -> dict[str, Any]:
    """Baseline, the int8 anchor and `quantize_static`, timed together and scored on test."""
    lat = prepared.config.latency
    number = anchor_trial(prepared)
    paths = {
        "baseline": baseline_dir(prepared.run_dir) / ONNX_NAME,
        "int8 anchor": trial_dir(prepared.run_dir, number) / ONNX_NAME,
        "quantize_static": quantize_static_reference(prepared, out_dir / REFERENCE_NAME),
    }
    sessions = {name: ort_session(path, lat.threads) for name, path in paths.items()}
    test = prepared.workload.test
    rows: dict[str, dict[str, Any]] = {
        name: {"test_accuracy": top1_accuracy(_predict(s), test.x, test.y), "onnx_bytes": paths[name].stat().st_size}
        for name, s in sessions.items()
    }
    rows["int8 anchor"]["trial"] = number
    for batch_size in lat.batch_sizes:
        batch = latency_batch(prepared.workload.example_inputs, batch_size, prepared.config.latency.sequence_length)
        runners = [lambda b, s=s: s.run(None, {"input": b}) for s in sessions.values()]
        stats = time_interleaved(runners, batch, warmup=10, repeats=repeats)
        for name, stat in zip(sessions, stats, strict=True):
            rows[name][f"latency_ms_b{batch_size}"] = stat.median_ms
            rows[name][f"speedup_b{batch_size}"] = stats[0].median_ms / stat.median_ms
    return {"repeats": repeats, "threads": lat.threads, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    batch_keys = sorted({k for r in result["rows"].values() for k in r if k.startswith("speedup_b")}, key=len)
    head = " | ".join(f"batch {k.removeprefix('speedup_b')}" for k in batch_keys)
    lines = [
        f"| model | test accuracy | {head} |",
        "| --- | --- |" + " --- |" * len(batch_keys),
    ]
    for name, row in result["rows"].items():
        cells = " | ".join(f"{row[k.replace('speedup', 'latency_ms')]:.3f} ms, {row[k]:.2f}x" for k in batch_keys)
        lines.append(f"| {name} | {row['test_accuracy']:.4f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from search.config import load_config, parse_config
    from search.loop import run_search
    from search.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parent / "fmnist_cnn.yaml"))
    parser.add_argument("--out", default="runs/ort-reference")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    raw = load_config(Path(args.config)).to_dict()
    raw["name"] = f"ort-reference-{raw['name']}"
    raw["search_space"] = {"quantization.weight_bits": [8, 32], "quantization.activation_bits": [8, 32]}
    raw["search"]["finish_epochs"] = 0
    config = parse_config(raw)
    out = Path(args.out)
    with prepare(config, out / config.name) as prepared:
        run_search(prepared, 1)  # the int8 anchor is the first trial
        print(markdown(compare(prepared, out, args.repeats)))


if __name__ == "__main__":
    main()
