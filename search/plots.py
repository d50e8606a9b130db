"""The plots a finished search draws: the Pareto plots (the task metric against size and against
latency) and the hypervolume history."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def _save(fig: Any, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0.1 if fig.legends else 0, 1, 1))  # room for a legend below the plots
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FOCUS_BELOW = 0.05  # the plots' vertical axis reaches this far below the baseline's task metric


def write_plot(
    rows: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, float],
    path: Path,
    m: str = "accuracy",
    pick: int | None = None,
) -> Path:
    """Size and latency against the task metric, on log axes. Trials more than FOCUS_BELOW
    below the baseline are drawn at the lower edge (as ▼), so one degenerate trial cannot
    squash the band where the real choices lie."""
    plt = _pyplot()
    from matplotlib import ticker

    done = [r for r in rows if r["state"] == "COMPLETE"]
    floor = baseline[m] - FOCUS_BELOW
    clip = any(r[m] < floor for r in done)
    groups = (
        ("trials", [r for r in done if r.get("feasible", True)], {"s": 18, "c": "0.6"}),
        (
            "outside the constraints",
            [r for r in done if not r.get("feasible", True)],
            {"s": 18, "facecolors": "none", "edgecolors": "0.6"},
        ),
        ("Pareto-optimal", [r for r in done if r["pareto"]], {"s": 36, "c": "tab:red"}),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "size_bytes", "artifact size (kB, log)"),
        (axes[1], "latency_ms", "latency (ms, log)"),
    ):
        scale = 1 / 1024 if key == "size_bytes" else 1.0
        for name, group, style in groups:
            for below in (False, True):
                points = [r for r in group if key in r and (r[m] < floor) == below]
                if points:
                    ys = [floor if below else r[m] for r in points]
                    tag = f"{name}, below {floor:.3f}" if below else name
                    ax.scatter([r[key] * scale for r in points], ys, marker="v" if below else "o", label=tag, **style)
        if key in baseline:
            ax.scatter([baseline[key] * scale], [baseline[m]], marker="*", s=160, c="k", label="baseline")
        for r in (r for r in done if r["trial"] == pick and key in r):
            ax.scatter(
                [r[key] * scale], [max(r[m], floor)], s=160, facecolors="none", edgecolors="k", label="recommended"
            )
        if clip:
            ax.set_ylim(bottom=floor - 0.1 * FOCUS_BELOW)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))  # 1, 2, 5, 10, 20, 50, ...
        for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(label)
        ax.set_ylabel(f"val {m}")
        ax.grid(alpha=0.3)
    # below both plots, where it hides no point
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize="small", frameon=False)
    return _save(fig, path, 110)


def history_plot(history: list[tuple[int, float]], path: Path) -> Path:
    fig, ax = _pyplot().subplots(figsize=(6, 3.2))
    ax.plot([n for n, _ in history], [hv for _, hv in history], drawstyle="steps-post")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    return _save(fig, path, 100)
