"""The finishing stage: the pick (or the whole front) fine-tuned again, longer, before test."""

import json

import pytest

from search.cli import main
from tests.conftest import needs_fashion_mnist
from tests.helpers import SMOKE


@needs_fashion_mnist
@pytest.mark.parametrize("front", [False, True], ids=["pick", "front"])
def test_the_finishing_stage_scores_a_longer_fine_tune_and_ships_the_better_on_val(tmp_path, capsys, front):
    run_dir = tmp_path / "run"
    args = ["run", SMOKE, "--n-trials", "4", "--run-dir", str(run_dir), "--set", "search.finish_epochs=1"]
    if front:
        args += ["--set", "search.finish_front=true"]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    pick = summary["recommended"]
    finished = [r for r in summary["pareto"] if "finished_val_accuracy" in r]
    assert {r["trial"] for r in finished} == ({r["trial"] for r in summary["pareto"]} if front else {pick["trial"]})
    for row in finished:
        assert row["finished_epochs"] == 1
        assert 0.0 <= row["finished_test_accuracy"] <= 1.0
        weights = run_dir / "trials" / f"{row['trial']:04d}" / "finished" / "weights.acw"
        assert weights.stat().st_size == row["finished_size_bytes"]
    assert "finished with a 1-epoch fine-tune" in capsys.readouterr().out
    assert "Finishing stage" in (run_dir / "report.html").read_text()
    # the package holds the finished model exactly when it is at least as accurate on val
    out = tmp_path / "package"
    assert main(["export", "--run-dir", str(run_dir), "--trial", str(pick["trial"]), "--out", str(out)]) == 0
    spec = json.loads((out / "model.json").read_text())
    better = pick["finished_val_accuracy"] >= pick["val_accuracy"]
    assert spec["finished"] is better
    chosen = run_dir / "trials" / f"{pick['trial']:04d}" / ("finished" if better else "")
    assert (out / "weights.acw").read_bytes() == (chosen / "weights.acw").read_bytes()
