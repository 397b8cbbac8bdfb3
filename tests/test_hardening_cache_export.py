"""Issue 24, second round: the text cache and exported folders attacked as a hostile or careless
user would. Nothing outside the folders the user named is read or written, nothing inconsistent is
accepted, and each failure is one line naming the file and field. One test (at least) per case."""
import ast
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import open_clip_ecg
from open_clip_ecg.exported_folder import CONFIG_FILE, WEIGHTS_FILE
from open_clip_ecg.leads import STANDARD_LEADS
from open_clip_ecg.text_cache import LMEmbedder, TextEmbeddingCache, build_text_cache
from open_clip_ecg.zeroshot import build_zeroshot_classifier
from test_llm_text import _Texts

BASE = "ECG-RN18-CLIPText"
SRC = Path(open_clip_ecg.__file__).parent
VOCAB = [{"id": 0, "code": "AF", "name": "atrial fibrillation"}, {"id": 1, "code": "NORM", "name": "normal ecg"}]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def one_line_error(result, *fragments):
    """The CLI failed with exit 2 and one line that holds every fragment."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def ecg_cfg(model=BASE, **overrides):
    return {"model": model, "sampling_rate": 100.0, "seconds": 2.5, "eval_seconds": 10.0,
            "leads": list(STANDARD_LEADS), "normalize": "center", "text": "report", "vocabulary": VOCAB,
            **overrides}


def save_checkpoint(path, model_name, cfg):
    """open_clip_train's checkpoint layout, recording the ECG preprocessing `cfg`."""
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in open_clip.create_model(model_name).state_dict().items()}
    torch.save({"epoch": 1, "name": "run", "state_dict": state, "ecg_preprocess": cfg}, path)
    return path


def edit_config(folder, edit):
    path = Path(folder) / CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def write_cache(folder, rows, texts=None, parts=None, identity="test-identity"):
    """A text cache written by hand (no LLM): one part with `rows` [n, hidden]; `parts` overrides the index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = texts or [f"text {i}" for i in range(len(rows))]
    keys = [hashlib.sha256(identity.encode() + b"\0" + t.encode()).digest() for t in texts]
    save_file({"embeddings": rows.contiguous(), "keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8)},
              str(folder / "part-00000.safetensors"))
    model = {"folder": "/nowhere/llm", "identity": identity, "pooling": "last", "context_length": 16,
             "hidden_size": rows.shape[1], "dtype": "float32"}
    index = {"format": "open_clip_ecg.text_cache/1", "model": model,
             "parts": ["part-00000.safetensors"] if parts is None else parts}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """ECG-RN18-CLIPText exported with the CLI; tests that tamper with it copy it first."""
    root = tmp_path_factory.mktemp("exported")
    checkpoint = save_checkpoint(root / "epoch_1.pt", BASE, ecg_cfg())
    result = run_cli("export", "--model", BASE, "--pretrained", checkpoint, "--out", root / "dir")
    assert result.returncode == 0, result.stderr
    return root / "dir"


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder):
        return Path(shutil.copytree(folder, tmp_path / "copy"))
    return copy


@pytest.fixture(scope="module")
def cached_export(tiny_qwen3, tmp_path_factory):
    """A model trained with a text cache, exported by the CLI with --ecg-text-cache; the LLM folder
    it was built from is deleted afterwards. Returns (folder, model name, training cache)."""
    root = tmp_path_factory.mktemp("cached-export")
    llm = shutil.copytree(tiny_qwen3, root / "llm")
    cache = root / "hc-cache"
    build_text_cache(["sinus rhythm."], LMEmbedder(llm), cache, progress=False)
    name = open_clip_ecg.registry.pair_text_model(BASE, None, cache)
    checkpoint = save_checkpoint(root / "epoch_1.pt", name, ecg_cfg(model=name))
    result = run_cli("export", "--model", BASE, "--ecg-text-cache", cache, "--pretrained", checkpoint,
                     "--out", root / "dir")
    assert result.returncode == 0, result.stderr
    assert "new prompts need the LLM folder" in result.stdout
    shutil.rmtree(llm)
    return root / "dir", name, cache


# ---------------------------------------------------------------------------------------------
# 1. Text-cache parts outside the cache
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("part", ["../outside.safetensors", "/etc/passwd", "ABSOLUTE", "sub/part-00000.safetensors",
                                  7])
def test_cache_parts_outside_the_cache_are_refused(tmp_path, part):
    outside = write_cache(tmp_path / "other", torch.ones(2, 4))
    shutil.copy(outside / "part-00000.safetensors", tmp_path / "outside.safetensors")
    part = str(outside / "part-00000.safetensors") if part == "ABSOLUTE" else part
    cache = write_cache(tmp_path / "cache", torch.zeros(1, 4), parts=[part])
    with pytest.raises(ValueError, match=r"index\.json: part .* is not a part-NNNNN\.safetensors file name inside"):
        TextEmbeddingCache.open(cache)


def test_text_cache_cli_refuses_a_cache_naming_parts_outside_it(tiny_qwen3, synthetic_shards, tmp_path):
    write_cache(tmp_path / "c", torch.zeros(1, 4), parts=["../../../etc/passwd"])
    one_line_error(run_cli("text-cache", "--text-model", tiny_qwen3, "--shards", synthetic_shards,
                           "--out", tmp_path / "c", "--no-progress"),
                   f"{tmp_path / 'c' / 'index.json'}: part '../../../etc/passwd' is not a part-NNNNN")


# ---------------------------------------------------------------------------------------------
# 2. An exported folder must not make loading read or write anywhere
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["absolute", "../../x"])
def test_an_exported_config_cannot_point_the_text_cache_elsewhere(cached_export, tiny_qwen3, copy_of, tmp_path,
                                                                   monkeypatch, target):
    folder = copy_of(cached_export[0])
    shutil.copytree(tiny_qwen3, folder, dirs_exist_ok=True)  # a hostile folder may ship an LLM to embed with
    value = str(tmp_path / "anywhere") if target == "absolute" else target
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")  # "../../x" would land in tmp_path / "x"

    def point_elsewhere(config):
        text_cfg = config["model_cfg"]["text_cfg"]
        text_cfg["ecg_text_tower"]["text_cache"] = text_cfg["tokenizer_kwargs"]["text_cache"] = value

    edit_config(folder, point_elsewhere)
    before = sorted(p for p in tmp_path.rglob("*") if p.parent != folder and folder not in p.parents)
    with pytest.raises(ValueError, match="outside the model folder|neither inside the model's exported folder"):
        open_clip.get_tokenizer(f"local-dir:{folder}")(["a new prompt"])
    with pytest.raises(ValueError, match=r"text_cache .* points outside the model folder"):
        open_clip.create_model(f"local-dir:{folder}")
    after = sorted(p for p in tmp_path.rglob("*") if p.parent != folder and folder not in p.parents)
    assert after == before  # no index.json, lock or part written anywhere
    assert not (tmp_path / "anywhere").exists() and not (tmp_path / "x").exists()


def test_loading_an_exported_cached_model_never_writes(cached_export, copy_of):
    folder = copy_of(cached_export[0])
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with pytest.raises(ValueError, match="new prompts need the LLM folder"):
        tokenizer(["a new prompt"])
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


# ---------------------------------------------------------------------------------------------
# 3 and 14. Preprocessing and model sizes a config declares are checked before any allocation
# ---------------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "huge rate": (lambda c: c["preprocess_cfg"]["ecg"].update(sampling_rate=1e7),
                  "preprocess_cfg.ecg.sampling_rate: 1e+07 Hz is outside the supported 50-10000 Hz"),
    "huge crop": (lambda c: c["preprocess_cfg"]["ecg"].update(seconds=1e9), "preprocess_cfg.ecg.seconds: 1e+09"),
    "zero rate": (lambda c: c["preprocess_cfg"]["ecg"].update(sampling_rate=0), "sampling_rate: 0 Hz is outside"),
    "negative rate": (lambda c: c["preprocess_cfg"]["ecg"].update(sampling_rate=-100), "sampling_rate: -100 Hz"),
    "string rate": (lambda c: c["preprocess_cfg"]["ecg"].update(sampling_rate="100"),
                    "sampling_rate: '100' is not a number of Hz"),
    "no seconds": (lambda c: c["preprocess_cfg"]["ecg"].pop("seconds"), "preprocess_cfg.ecg lacks seconds"),
    "ecg a list": (lambda c: c["preprocess_cfg"].update(ecg=[1, 2]), "preprocess_cfg.ecg must be an object"),
    "negative embed_dim": (lambda c: c["model_cfg"].update(embed_dim=-4), "model_cfg.embed_dim must be a positive"),
    "unknown lead": (lambda c: c["preprocess_cfg"]["ecg"].update(leads=["I", "Z9"]), "preprocess_cfg.ecg.leads"),
    "bad normalize": (lambda c: c["preprocess_cfg"]["ecg"].update(normalize="max"), "preprocess_cfg.ecg.normalize"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_malformed_exported_config_names_the_field_and_folder(exported, copy_of, case):
    edit, message = BAD_CONFIGS[case]
    folder = copy_of(exported)
    edit_config(folder, edit)
    with pytest.raises(ValueError) as err:
        open_clip_ecg.create_model_and_transforms(f"local-dir:{folder}")
    assert f"{folder / CONFIG_FILE}" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        open_clip.create_model(f"local-dir:{folder}")  # plain open_clip is checked the same way


def test_a_checkpoint_declaring_a_huge_rate_or_crop_is_refused_before_allocating(tmp_path):
    from open_clip_ecg.factory import load_model
    from open_clip_ecg.model_preprocess import ECGPreprocess

    checkpoint = save_checkpoint(tmp_path / "epoch_1.pt", BASE, ecg_cfg(sampling_rate=1e7))
    with pytest.raises(ValueError, match=rf"checkpoint {checkpoint}: ecg_preprocess.sampling_rate: 1e\+07 Hz"):
        load_model(BASE, str(checkpoint))
    with pytest.raises(ValueError, match=r"preprocess_cfg.eval_seconds: 1e\+09 is not a crop length"):
        ECGPreprocess(ecg_cfg(eval_seconds=1e9))


# ---------------------------------------------------------------------------------------------
# 9, 11, 12. What a cache holds is checked when it is read
# ---------------------------------------------------------------------------------------------

def test_non_finite_rows_in_a_cache_part_are_refused_naming_the_part(tmp_path):
    rows = torch.zeros(3, 4)
    rows[1, 2] = float("nan")
    cache = write_cache(tmp_path / "c", rows)
    with pytest.raises(ValueError, match=r"part-00000.safetensors: 1 of 3 rows hold NaN or inf values \(first: row 1\)"):
        TextEmbeddingCache.open(cache)


def test_rows_of_another_width_are_refused_naming_the_part(tmp_path):
    cache = write_cache(tmp_path / "c", torch.zeros(3, 4))
    index = json.loads((cache / "index.json").read_text())
    index["model"]["hidden_size"] = 8
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"part-00000.safetensors: embeddings \(3, 4\).* do not match hidden size 8"):
        TextEmbeddingCache.open(cache)


UNREADABLE = {
    "truncated": lambda data: data[:len(data) // 2],
    "random bytes": lambda data: os.urandom(len(data)),
    "a pickle": lambda data: __import__("pickle").dumps({"embeddings": [1.0]}),
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_an_unreadable_cache_part_is_one_clear_error(tmp_path, case):
    cache = write_cache(tmp_path / "c", torch.zeros(2, 4))
    part = cache / "part-00000.safetensors"
    part.write_bytes(UNREADABLE[case](part.read_bytes()))
    with pytest.raises(ValueError, match=rf"{part}: unreadable cache part, not a safetensors file") as err:
        TextEmbeddingCache.open(cache)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_exported_weights_are_one_clear_error(exported, copy_of, case):
    folder = copy_of(exported)
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(UNREADABLE[case](weights.read_bytes()))
    with pytest.raises(ValueError, match=rf"{weights}: unreadable model weights file, not a safetensors file") as err:
        open_clip_ecg.create_model_and_transforms(f"local-dir:{folder}")
    assert "\n" not in str(err.value)


MALFORMED_INDEX = {
    "a list": (lambda index: [index], "must hold a JSON object, got list"),
    "no model": (lambda index: {k: v for k, v in index.items() if k != "model"}, "'model' must be an object"),
    "unknown dtype": (lambda index: {**index, "model": {**index["model"], "dtype": "float128"}},
                      "model.dtype 'float128' is not one of"),
    "hidden size a string": (lambda index: {**index, "model": {**index["model"], "hidden_size": "4"}},
                             "model.hidden_size must be a positive integer, got '4'"),
    "parts not a list": (lambda index: {**index, "parts": "part-00000.safetensors"}, "'parts' must be a list"),
    "unknown pooling": (lambda index: {**index, "model": {**index["model"], "pooling": "cls"}}, "model.pooling"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_INDEX))
def test_a_malformed_cache_index_is_one_clear_error(tmp_path, case):
    edit, message = MALFORMED_INDEX[case]
    cache = write_cache(tmp_path / "c", torch.zeros(2, 4))
    (cache / "index.json").write_text(json.dumps(edit(json.loads((cache / "index.json").read_text()))))
    with pytest.raises(ValueError) as err:
        TextEmbeddingCache.open(cache)
    assert str(err.value).startswith(str(cache / "index.json")) and message in str(err.value)


@pytest.mark.slow
def test_the_text_cache_cli_reports_a_malformed_index_in_one_line(tiny_qwen3, synthetic_shards, tmp_path):
    cache = write_cache(tmp_path / "c", torch.zeros(2, 4))
    (cache / "index.json").write_text(json.dumps(["not", "an", "index"]))
    one_line_error(run_cli("text-cache", "--text-model", tiny_qwen3, "--shards", synthetic_shards, "--out", cache,
                           "--no-progress"), f"{cache / 'index.json'} must hold a JSON object, got list")


# ---------------------------------------------------------------------------------------------
# 10. Exported weights load strictly
# ---------------------------------------------------------------------------------------------

def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS_FILE))
    edit(state)
    save_file(state, str(folder / WEIGHTS_FILE))


@pytest.mark.parametrize("case", ["no weights file", "no logit_bias", "nan weights", "extra tensor"])
def test_exported_weights_load_strictly(exported, copy_of, case):
    folder = copy_of(exported)
    if case == "no weights file":
        (folder / WEIGHTS_FILE).unlink()
        error, message = FileNotFoundError, f"{folder / WEIGHTS_FILE} is missing"
    elif case == "no logit_bias":
        _rewrite_weights(folder, lambda state: state.pop("logit_bias"))
        error, message = ValueError, f"{folder / WEIGHTS_FILE} does not hold the model's weights: 1 missing (e.g. logit_bias)"
    elif case == "nan weights":
        _rewrite_weights(folder, lambda state: state["logit_scale"].fill_(float("nan")))
        error, message = ValueError, f"{folder / WEIGHTS_FILE}: 1 tensor(s) hold NaN or inf values (e.g. logit_scale)"
    else:
        _rewrite_weights(folder, lambda state: state.update(extra=torch.zeros(1)))
        error, message = ValueError, "1 unexpected (e.g. extra)"
    for load in (open_clip.create_model, open_clip_ecg.create_model_and_transforms):
        with pytest.raises((error, ValueError)) as err:
            load(f"local-dir:{folder}")
        assert message in str(err.value) and "\n" not in str(err.value)


def test_a_strict_load_gives_the_exported_logit_bias(exported):
    from safetensors.torch import load_file

    model = open_clip.create_model(f"local-dir:{exported}")
    assert torch.equal(model.logit_bias.detach(), load_file(str(exported / WEIGHTS_FILE))["logit_bias"])


# ---------------------------------------------------------------------------------------------
# 16. Texts missing from the cache, found in a DataLoader worker: one line in the main process
# ---------------------------------------------------------------------------------------------

def test_a_worker_missing_cached_texts_raises_one_line_in_the_main_process(tiny_qwen3, tmp_path):
    build_text_cache(["sinus rhythm."], LMEmbedder(tiny_qwen3), tmp_path / "c", progress=False)
    name = open_clip_ecg.register_ecg_text_model("ECG-hc-workers", None, base_model=BASE, text_cache=tmp_path / "c")
    loader = torch.utils.data.DataLoader(_Texts(open_clip.get_tokenizer(name)), num_workers=1)
    with pytest.raises(ValueError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"1 text(s) are not in the text cache {tmp_path / 'c'}, e.g. 'a report the cache")
    assert "run `open-clip-ecg text-cache" in message


@pytest.mark.slow
def test_training_with_workers_on_a_cache_missing_its_reports_fails_in_one_line(tiny_qwen3, synthetic_shards,
                                                                                 tmp_path):
    from conftest import tiny_run_args

    build_text_cache(["sinus rhythm."], LMEmbedder(tiny_qwen3), tmp_path / "c", progress=False)
    args = tiny_run_args(synthetic_shards, tmp_path / "logs", "--ecg-text-cache", tmp_path / "c", "--workers", "1",
                         "--ecg-normalize", "center", "--train-num-samples", "16")
    result = run_cli("train", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]  # after open_clip_train's log lines
    assert last.startswith("open-clip-ecg train: error: ") and f"are not in the text cache {tmp_path / 'c'}" in last
    assert "run `open-clip-ecg text-cache" in last and last.endswith("(raised in a DataLoader worker)")


# ---------------------------------------------------------------------------------------------
# 17. Exported folders can be moved
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_exported_hf_text_model_folder_can_be_moved(tmp_path, monkeypatch):
    name = "ECG-RN18-MiniLM"
    checkpoint = save_checkpoint(tmp_path / "epoch_1.pt", name, ecg_cfg(model=name))
    one_line_ok = run_cli("export", "--model", name, "--pretrained", checkpoint, "--out", tmp_path / "dir")
    assert one_line_ok.returncode == 0, one_line_ok.stderr
    config_text = (tmp_path / "dir" / CONFIG_FILE).read_text()
    assert str(tmp_path) not in config_text
    texts = ["sinus rhythm", "left bundle branch block"]
    with torch.no_grad():
        before = open_clip.create_model(f"local-dir:{tmp_path / 'dir'}").eval()
        expected = before.encode_text(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'dir'}")(texts))
        moved = Path(shutil.move(tmp_path / "dir", tmp_path / "elsewhere" / "moved"))
        (tmp_path / "cwd").mkdir()
        monkeypatch.chdir(tmp_path / "cwd")
        model = open_clip.create_model(f"local-dir:{moved}").eval()
        assert torch.equal(model.encode_text(open_clip.get_tokenizer(f"local-dir:{moved}")(texts)), expected)


def test_an_exported_live_llm_model_folder_can_be_moved_without_its_llm_folder(tiny_qwen3, tmp_path, monkeypatch):
    from open_clip_ecg.export import export_model

    llm = shutil.copytree(tiny_qwen3, tmp_path / "llm")
    name = open_clip_ecg.registry.pair_text_model(BASE, llm, None)
    checkpoint = save_checkpoint(tmp_path / "epoch_1.pt", name, ecg_cfg(model=name))
    texts = ["sinus rhythm", "atrial fibrillation"]
    with torch.no_grad():
        reference = open_clip.create_model(name, pretrained=str(checkpoint)).eval()
        expected = reference.encode_text(open_clip.get_tokenizer(name)(texts))
        out = export_model(name, str(checkpoint), tmp_path / "dir")
        moved = Path(shutil.move(out, tmp_path / "elsewhere"))
        shutil.rmtree(llm)
        monkeypatch.chdir(tmp_path)
        model = open_clip.create_model(f"local-dir:{moved}").eval()
        assert torch.equal(model.encode_text(open_clip.get_tokenizer(f"local-dir:{moved}")(texts)), expected)


# ---------------------------------------------------------------------------------------------
# 18. A model trained with a text cache is exported from the CLI with its prompts' rows
# ---------------------------------------------------------------------------------------------

def test_a_cached_text_model_exported_by_the_cli_classifies_its_findings_without_the_llm(cached_export, tmp_path,
                                                                                          monkeypatch):
    folder, name, training_cache = cached_export
    config_text = (folder / CONFIG_FILE).read_text()
    assert str(folder.parent) not in config_text  # no absolute cache or LLM path: the folder travels
    moved = Path(shutil.copytree(folder, tmp_path / "moved"))
    monkeypatch.chdir(tmp_path)
    model, _, _ = open_clip_ecg.create_model_and_transforms(f"local-dir:{moved}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{moved}")
    findings = [v["name"] for v in VOCAB]
    classifier = build_zeroshot_classifier(model, tokenizer, findings)  # the LLM folder is gone
    reference = open_clip.create_model(name, pretrained=str(folder.parent / "epoch_1.pt")).eval()
    expected = build_zeroshot_classifier(reference, open_clip.get_tokenizer(name), findings)
    assert torch.allclose(classifier, expected, atol=1e-6)
    with pytest.raises(ValueError, match="new prompts need the LLM folder the model was trained with"):
        build_zeroshot_classifier(model, tokenizer, ["a finding never seen before"])


# ---------------------------------------------------------------------------------------------
# 19. Temporaries of killed cache writers are removed
# ---------------------------------------------------------------------------------------------

def test_leftover_part_temporaries_of_dead_processes_are_removed(tiny_qwen3, tmp_path):
    build_text_cache(["sinus rhythm."], LMEmbedder(tiny_qwen3), tmp_path / "c", progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "c" / f"part-00001.safetensors.tmp{int(dead.stdout)}"
    live = tmp_path / "c" / f"part-00009.safetensors.tmp{os.getpid()}"
    stale.write_bytes(b"half a part")
    live.write_bytes(b"a part being written")
    build_text_cache(["sinus rhythm.", "left axis deviation."], LMEmbedder(tiny_qwen3), tmp_path / "c",
                     progress=False)
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------------------------------------
# Atomic writes keep the user's umask; the export <-> factory import cycle is gone
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_and_exported_weights_keep_the_umask(tmp_path, umask):
    from open_clip_ecg.atomic import write_atomic
    from open_clip_ecg.export import export_model

    checkpoint = save_checkpoint(tmp_path / "epoch_1.pt", BASE, ecg_cfg())
    previous = os.umask(umask)
    try:
        write_atomic(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(1)}, tmp))
        export_model(BASE, str(checkpoint), tmp_path / "dir")
    finally:
        os.umask(previous)
    for path in (tmp_path / "w.safetensors", tmp_path / "dir" / WEIGHTS_FILE, tmp_path / "dir" / CONFIG_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def _imports(module: Path):
    """Modules of the package that `module` imports (at module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and module.parent == SRC:
            names.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("open_clip_ecg."):
            names.add(node.module.split(".")[1])
    return {n.split(".")[0] for n in names}


def test_factory_does_not_import_export():
    reachable, todo = set(), ["factory"]
    while todo:
        name = todo.pop()
        if name in reachable or not (SRC / f"{name}.py").is_file():
            continue
        reachable.add(name)
        todo.extend(_imports(SRC / f"{name}.py"))
    assert "factory" in _imports(SRC / "export.py")  # export loads models through factory ...
    assert "export" not in reachable  # ... and nothing factory imports leads back to export
