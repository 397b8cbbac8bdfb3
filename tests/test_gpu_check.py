"""scripts/gpu_check.sh on a machine without CUDA (it must refuse, loudly), and the accounting its
figures come from, on CPU: FLOPs of a step, the fraction of a bf16 peak, the data-wait share read
from open_clip_train's log."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts" / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))
from gpu_check import recipe_train_args  # noqa: E402
from utilization import bf16_peak_tflops, data_wait_shares, fraction_of_peak, training_step_flops  # noqa: E402


def test_gpu_check_refuses_without_cuda_and_does_nothing(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("gpu_check: FAILED: CUDA is not available") and "Nothing was checked." in lines[-1]
    assert "PASSED" not in done.stdout and not (tmp_path / "work").exists()


def test_the_training_step_is_the_quickstarts_ptbxl_recipe_in_bf16(tmp_path):
    from open_clip_ecg.quickstart import PTBXL_TRAIN_FLAGS, SOURCES

    args = recipe_train_args(tmp_path / "shards", tmp_path / "logs", "run", workers=2)
    flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert flag["--model"] == SOURCES["ptbxl"].model == "ECG-RN18-RR-CLIPText"
    assert flag["--precision"] == "amp_bf16" and float(flag["--ecg-seconds"]) == SOURCES["ptbxl"].crop_seconds
    assert " ".join(PTBXL_TRAIN_FLAGS) in " ".join(args)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0), ("NVIDIA B200", 2250.0), ("NVIDIA A10G", None), ("Tesla T4", None),
])
def test_bf16_peaks_by_gpu_name(name, peak):
    assert bf16_peak_tflops(name) == peak


def test_step_flops_are_forward_and_weight_gradient_by_hand():
    """Conv1d 12 -> 8, kernel 5, on 2 x 12 x 100 (96 outputs): forward 2*B*Cout*Cin*K*L multiply-adds
    as FLOPs; backward computes the weight gradient only (the input needs none): as many again."""
    conv = torch.nn.Conv1d(12, 8, 5, bias=False)
    forward = 2 * 2 * 8 * 12 * 5 * 96
    assert training_step_flops(conv, torch.randn(2, 12, 100)) == 2 * forward
    assert conv.weight.grad is not None  # a real backward ran
    linear = torch.nn.Linear(16, 4, bias=False)
    assert training_step_flops(linear, torch.randn(3, 16, requires_grad=True)) == 3 * (2 * 3 * 16 * 4)


def test_the_ecg_tower_costs_what_the_issue_measured():
    """ecg_resnet1d18 on 12 x 500 (the recipe's 5 s crop at 100 Hz): forward + backward 1.2 GFLOP per sample."""
    import timm

    import open_clip_ecg  # noqa: F401  (registers the towers)

    model = timm.create_model("ecg_resnet1d18")
    assert training_step_flops(model, torch.randn(2, 12, 500)) / 2 / 1e9 == pytest.approx(1.19, abs=0.01)


def test_fraction_of_peak():
    assert fraction_of_peak(2e12, 0.5, 8.0) == pytest.approx(0.5)  # 4 TFLOP/s of 8
    with pytest.raises(ValueError, match="must be > 0"):
        fraction_of_peak(1e12, 0.0, 8.0)


LOG = """\
2026-12-05,01:23:45 | INFO | Train Epoch: 0 [16/64 (25%)] Data (t): 1.000 Batch (t): 2.000, 8.0/s, 8.0/s/gpu LR: 0.1 Loss: 1
2026-12-05,01:23:46 | INFO | Train Epoch: 0 [32/64 (50%)] Data (t): 0.100 Batch (t): 0.500, 32.0/s, 32.0/s/gpu LR: 0.1 Loss: 1
2026-12-05,01:23:47 | INFO | Train Epoch: 0 [64/64 (100%)] Data (t): 0.300 Batch (t): 0.600, 26.7/s, 26.7/s/gpu LR: 0.1 Loss: 1
2026-12-05,01:23:48 | INFO | Eval Epoch: 1 clip_val_loss: 2.0
2026-12-05,01:23:49 | INFO | Train Epoch: 1 [64/64 (100%)] Data (t): 0.200 Batch (t): 0.400, 40.0/s, 40.0/s/gpu LR: 0.1 Loss: 1
"""


def test_data_wait_shares_by_hand():
    """Epoch 0's first interval (start-up) is left out; epoch 1 has only one, which stays."""
    figures = data_wait_shares(LOG)
    assert figures["intervals"] == 3
    assert figures["shares"] == pytest.approx([0.2, 0.5, 0.5])
    assert figures["median_share"] == pytest.approx(0.5)
    assert figures["weighted_share"] == pytest.approx((0.1 + 0.3 + 0.2) / (0.5 + 0.6 + 0.4))
    with pytest.raises(ValueError, match="no 'Train Epoch"):
        data_wait_shares("Eval Epoch: 1 clip_val_loss: 2.0\n")


@pytest.mark.slow
def test_data_wait_reads_a_real_training_log(tiny_training_run):
    """The pattern matches open_clip_train's own lines (the shared tiny run logs every step), and the
    CLI prints the share as a user would run it."""
    log = tiny_training_run / "out.log"
    figures = data_wait_shares(log.read_text())
    assert figures["intervals"] >= 3 and all(0 <= share <= 1 for share in figures["shares"])
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmarks" / "utilization.py"), "data-wait",
                           str(log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("data wait: ") and "% of each step" in done.stdout
