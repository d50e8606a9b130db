"""Which convolutions ONNX Runtime runs faster in integer: the measurement behind
`strategies.activations.runs_faster_in_integer`.

Each case is a convolution (then ReLU) whose output feeds an int8 1×1 convolution, so the
QuantizeLinear of that next layer is paid either way. The case's own convolution is
exported twice through the trial path (`strategies.runtime`): with an int8 input (QLinearConv)
and with a float input (weight-only codes, ORT's float kernel). Both run in one interleaved
timing loop, one thread; the ratio integer / float is the figure (below 1: integer wins).

    python -m experiments.kernels [--batch-size 64] [--repeats 200] [--out experiments/results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from objectives.latency import time_interleaved
from strategies.activations import round_bias_to_accumulator_, set_input_quantization_, uint8_qparams
from strategies.quantization import quantize_weights_
from strategies.runtime import cpu_has_vnni, export_onnx, ort_session, quantize_onnx_weights_

# (input channels, output channels, kernel, image side): first layers on 1 and 3 channels, then wider ones
CASES = [(1, 20, 5, 28), (1, 32, 3, 28), (3, 32, 3, 32), (3, 16, 5, 32)]
CASES += [(4, 32, 3, 28), (8, 32, 3, 28), (16, 32, 3, 28), (20, 50, 5, 12)]


def _model(cin: int, cout: int, k: int, side: int, integer: bool) -> nn.Module:
    """The case's conv (int8 or float input, 8-bit weight codes either way), then an int8 1×1 conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, k), nn.ReLU(), nn.Conv2d(cout, 16, 1)).eval()
    x = torch.rand(64, cin, side, side)
    quantize_weights_(model, lambda _: 8)
    with torch.no_grad():
        hidden = model[:2](x)  # ranges on float activations, as calibration observes them
    set_input_quantization_(model[2], *uint8_qparams(float(hidden.min()), float(hidden.max())))
    if integer:
        set_input_quantization_(model[0], *uint8_qparams(float(x.min()), float(x.max())))
    round_bias_to_accumulator_(model)
    return model


def measure(cin: int, cout: int, k: int, side: int, batch_size: int, repeats: int) -> dict:
    sessions = []
    with tempfile.TemporaryDirectory() as tmp:
        for integer in (True, False):
            model = _model(cin, cout, k, side, integer)
            path = export_onnx(model, torch.zeros(1, cin, side, side), Path(tmp) / f"{integer}.onnx")
            quantize_onnx_weights_(path, model)
            sessions.append(ort_session(path, 1))
    batch = np.random.default_rng(0).random((batch_size, cin, side, side), dtype=np.float32)
    runners = [lambda b, s=s: s.run(None, {"input": b}) for s in sessions]
    integer, floating = time_interleaved(runners, batch, warmup=10, repeats=repeats)
    return {
        "in_channels": cin,
        "out_channels": cout,
        "kernel": k,
        "side": side,
        "integer_ms": integer.median_ms,
        "float_ms": floating.median_ms,
        "integer_over_float": integer.median_ms / floating.median_ms,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default="runs/kernels.json")
    args = parser.parse_args(argv)
    rows = [measure(*case, args.batch_size, args.repeats) for case in CASES]
    result = {"batch_size": args.batch_size, "repeats": args.repeats, "threads": 1, "vnni": cpu_has_vnni()}
    result["rows"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| conv | integer | float | integer / float |\n| --- | --- | --- | --- |")
    for r in rows:
        shape = f"{r['in_channels']}→{r['out_channels']} {r['kernel']}×{r['kernel']}, {r['side']}²"
        print(f"| {shape} | {r['integer_ms']:.3f} ms | {r['float_ms']:.3f} ms | {r['integer_over_float']:.2f} |")


if __name__ == "__main__":
    main()
