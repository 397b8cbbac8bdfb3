"""Shared fixtures and test tiers: offline mode, markers, the real-data folder, small synthetic shards.

Tiers (registered here, nowhere else): ``slow`` (trains more than a few steps or runs > ~10 s),
``distributed`` (spawns several processes), ``realdata`` (reads ``../shared/data``; added automatically
to every test that uses one of the data fixtures below), ``gpu`` (needs CUDA: skips without it, fails
with ``--require-gpu`` as ``scripts/gpu_check.sh`` runs them). ``pytest -m "not slow"`` is the fast loop; CI
runs everything. Real data is found at ``../shared/data`` beside the repository or at
``$OPEN_CLIP_ECG_SHARED_DATA``; when absent its tests skip, or fail with ``--require-data`` (or
``OPEN_CLIP_ECG_REQUIRE_DATA=1``), so a CI that is meant to have the data cannot pass without it.
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (CI runs -n 2 on 2 cores) each worker, and every command it starts, gets its share
# of the cores: torch would otherwise start one thread per core in every worker and oversubscribe them.
# Set before anything imports torch (xdist sets the variable before this file is imported).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, _threads)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("OPEN_CLIP_ECG_SHARED_DATA", REPO.parent / "shared" / "data"))

# fixture name -> (folder under SHARED_DATA, a file that proves the folder is complete)
DATA_FOLDERS = {
    "shared_data": (".", "README.md"),
    "ptbxl_dir": ("ptbxl", "ptbxl_database.csv"),
    "ptbxl2k_dir": ("ptbxl-2k", "ptbxl_database.csv"),
    "cinc_dir": ("cinc", "E00009.hea"),
}


def pytest_addoption(parser):
    parser.addoption("--require-data", action="store_true",
                     default=os.environ.get("OPEN_CLIP_ECG_REQUIRE_DATA", "") not in ("", "0"),
                     help="fail (instead of skip) the tests whose real data in ../shared/data is absent "
                          "(also OPEN_CLIP_ECG_REQUIRE_DATA=1)")
    parser.addoption("--require-gpu", action="store_true",
                     help="fail (instead of skip) the `gpu` tests when CUDA is not available")


def pytest_configure(config):
    # pytest-xdist (>= 3.6) hands out files with the most tests first; keep our order (FILE_SECONDS)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    config.addinivalue_line("markers", "slow: trains more than a few steps or runs for more than about 10 s "
                                       "(deselect with -m 'not slow')")
    config.addinivalue_line("markers", "distributed: starts several processes (torch.distributed, torchrun)")
    config.addinivalue_line("markers", "realdata: reads the real PTB-XL / CinC samples in ../shared/data")
    config.addinivalue_line("markers", "gpu: needs CUDA; skips without it (fails with --require-gpu)")


def pytest_runtest_setup(item):
    """A `gpu` test skips where CUDA is missing, or fails with --require-gpu (scripts/gpu_check.sh)."""
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            if item.config.getoption("--require-gpu"):
                pytest.fail("CUDA is not available and --require-gpu was given", pytrace=False)
            pytest.skip("needs CUDA")


# Seconds a test file took in CI (2 cores, -n 2), the longest ones: they are handed out first, so
# under `--dist loadfile` no long file starts last while the other worker idles. Update when a file
# grows; a file not listed counts as short.
FILE_SECONDS = {"test_ptbxl_study.py": 270, "test_benchmark.py": 260, "test_train.py": 200,
                "test_quickstart.py": 170, "test_hardening.py": 150,
                "test_shards.py": 80, "test_ptbxl_ablations.py": 75, "test_hardening_cache_export.py": 60, "test_classify.py": 60,
                "test_loss_distributed.py": 50}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark every test that asks for a real-data fixture as `realdata`, so `-m` can select it; run
    the longest files first (stable order otherwise)."""
    for item in items:
        if DATA_FOLDERS.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))


def _data_folder(request, fixture_name):
    folder, proof = DATA_FOLDERS[fixture_name]
    path = (SHARED_DATA / folder).resolve()
    if not (path / proof).is_file():
        message = f"real data absent: {path / proof} (set OPEN_CLIP_ECG_SHARED_DATA to its folder)"
        if request.config.getoption("--require-data"):
            pytest.fail(f"{message}; --require-data turns this skip into a failure", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data(request) -> Path:
    """The real-data folder (../shared/data)."""
    return _data_folder(request, "shared_data")


@pytest.fixture(scope="session")
def ptbxl_dir(request) -> Path:
    """353 real PTB-XL records (folds 1-8, 100 and 500 Hz)."""
    return _data_folder(request, "ptbxl_dir")


@pytest.fixture(scope="session")
def ptbxl2k_dir(request) -> Path:
    """1,490 real PTB-XL records at 100 Hz."""
    return _data_folder(request, "ptbxl2k_dir")


@pytest.fixture(scope="session")
def cinc_dir(request) -> Path:
    """28 real PhysioNet/CinC Challenge records at 500 Hz."""
    return _data_folder(request, "cinc_dir")


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """96 synthetic records as 100 Hz, 10 s shards (16 per shard) with train/val/test splits."""
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    csv_path = write_synthetic_dataset(root / "records", n=96, seed=0, progress=False)
    out = root / "shards"
    write_shards(get_reader("csv", csv_path), out,
                 ShardOptions(sampling_rate=100, seconds=10, split_by="random", val_fraction=0.2,
                              test_fraction=0.1, shard_size=16, text="report", progress=False))
    return out


def tiny_run_args(shards, logs, *extra):
    """`open_clip_ecg.train.main` flags of the shared tiny run (logs/tiny); `extra` flags win."""
    return ["--model", "ECG-RN18-CLIPText", "--train-data", str(shards / "train-*.tar"),
            "--val-data", str(shards / "val-*.tar"), "--batch-size", "8", "--epochs", "1", "--workers", "0",
            "--lr", "1e-3", "--warmup", "1", "--logs", str(logs), "--name", "tiny", "--seed", "0",
            "--report-to", "tensorboard", "--zeroshot-frequency", "1", "--log-every-n-steps", "1",
            "--ecg-seconds", "2.5", "--ecg-eval-seconds", "8", "--ecg-normalize", "zscore", *extra]


@pytest.fixture(scope="session")
def tiny_training_run(synthetic_shards, tmp_path_factory):
    """One epoch of ECG-RN18-CLIPText on `synthetic_shards` (batch 8, zscore, 8 s validation crop,
    zero-shot and tensorboard), trained once for every test that reads a finished run; a test that
    continues it copies the folder first and runs :func:`tiny_run_args` with ``--resume latest``.
    Returns the run folder (``logs/tiny``)."""
    import open_clip_ecg.train as ecg_train

    logs = tmp_path_factory.mktemp("tiny-run")
    assert ecg_train.main(tiny_run_args(synthetic_shards, logs)) == 0
    return logs / "tiny"


@pytest.fixture(scope="session")
def random_decoder_lm(tmp_path_factory):
    """Writes a random-weight decoder LM folder (hidden 64, 2 layers, byte-level BPE tokenizer);
    keyword arguments go to :func:`open_clip_ecg.random_lm.write_random_decoder_lm`."""
    from open_clip_ecg.random_lm import write_random_decoder_lm

    def write(name="qwen3", **kwargs):
        return write_random_decoder_lm(tmp_path_factory.mktemp(name), **kwargs)

    return write


@pytest.fixture(scope="session")
def tiny_qwen3(random_decoder_lm):
    """A random Qwen3 folder shared by the LLM text tower tests."""
    return random_decoder_lm("qwen3", model_type="qwen3")
