"""The benchmark suite runs in a reduced mode and writes its JSON and table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
sys.path.insert(0, str(SCRIPT.parent / "benchmarks"))


@pytest.mark.slow
def test_benchmark_suite_quick(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    names = {r["name"] for r in report["results"]}
    assert {"towers", "loss", "shards", "training", "zeroshot", "hardening", "text_cache", "rr_channels"} <= names
    for r in report["results"]:
        assert r["ratios"] and all(v > 0 for v in r["ratios"].values()), r
    table = (tmp_path / "benchmark.md").read_text()
    assert "open_clip_loop_vs_bare" in table and "live_frozen_vs_cached_text_step_large" in table


@pytest.mark.slow
def test_scale_benchmark_runs_on_tiny_mimic_layouts(tmp_path):
    """bench_scale generates both sizes in the MIMIC-IV-ECG layout, writes, trains and evaluates."""
    script = SCRIPT.parent / "benchmarks" / "bench_scale.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--sizes", "8", "20", "--keep", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["figures"]["sizes"] == [8, 20]
    assert all(v > 0 for v in report["ratios"].values()), report
    assert (tmp_path / "mimic-20" / "files").is_dir() and (tmp_path / "shards-20-1" / "manifest.json").is_file()


def test_the_compiled_recipe_step_compiles_nothing_on_a_second_pass(tmp_path):
    """bench_training --compile's figures (the eager backend here: inductor takes minutes on a CPU)."""
    import bench_training
    from open_clip_ecg.data.pipeline import expand_shards

    shards = expand_shards(bench_training._write_recipe_shards(str(tmp_path), None, 32, beats=True), split="train")
    figures = bench_training.compiled_steps(shards, "cpu", "fp32", 8, 3, backend="eager")
    assert figures["compile_graphs_first_pass"] > 0 and figures["compile_graphs_timed_pass"] == 0
    assert figures["recipe_step_s_eager"] > 0 and figures["recipe_step_s_compiled"] > 0
    assert figures["compile_backend"] == "eager" and figures["compile_batches"] == 3
