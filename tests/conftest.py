"""Shared fixtures: offline mode, the real-data folder, and small synthetic shards."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs for more than about 10 s (deselect with -m 'not slow')")


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or $OPEN_CLIP_ECG_SHARED_DATA."""
    return Path(os.environ.get("OPEN_CLIP_ECG_SHARED_DATA", REPO.parent / "shared" / "data"))


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
