"""benchmarks/scaling.py: the scaling figure is what it claims (images/s of N processes over 1 process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script as _load

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scaling.py"


def load_script():
    return _load("benchmarks/scaling.py", "scaling_benchmark")


def test_summary_takes_the_best_median_and_divides_by_one_process():
    runs = {1: [[1.0, 3.0, 2.0], [1.5, 1.5, 9.0]], 2: [[2.0, 2.5, 3.0], [4.0, 4.0, 4.0]]}
    rows = load_script().summarise(runs, batch_size=4)
    one, two = rows
    assert one["median_step_s"] == 1.5 and one["repeat_medians_s"] == [2.0, 1.5]
    assert one["images_per_s"] == pytest.approx(4 / 1.5) and one["scaling"] == pytest.approx(1.0)
    assert two["global_batch"] == 8 and two["median_step_s"] == 2.5
    assert two["images_per_s"] == pytest.approx(8 / 2.5)
    assert two["scaling"] == pytest.approx((8 / 2.5) / (4 / 1.5)) and two["efficiency"] == pytest.approx(two["scaling"] / 2)


@pytest.mark.slow
def test_two_process_run_on_the_tiny_shape(tmp_path):
    argv = ["--model", "tiny", "--processes", "1,2", "--steps", "2", "--warmup", "1", "--repeats", "1",
            "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "scaling-cpu.json").read_text())
    rows = {row["processes"]: row for row in report["rows"]}
    assert set(rows) == {1, 2}
    for world, row in rows.items():
        assert len(row["repeat_medians_s"]) == 1 and row["median_step_s"] > 0
        assert row["images_per_s"] == pytest.approx(world * 4 / row["median_step_s"])
    assert rows[2]["scaling"] == pytest.approx(rows[2]["images_per_s"] / rows[1]["images_per_s"])
    assert report["meta"]["command"].startswith("python benchmarks/scaling.py --model tiny")
    assert str(tmp_path) not in (tmp_path / "scaling-cpu.md").read_text()  # records name no local path
