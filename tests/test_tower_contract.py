"""One contract over every registered ECG model and tower (as timm's tests/test_models.py runs over its
registry): a new config or entrypoint is tested the day it is registered, with nothing to add here."""
import open_clip
import pytest
import timm
import torch

import open_clip_ecg  # noqa: F401  (registers the towers and configs)

ECG_MODELS = sorted(name for name in open_clip.list_models() if name.startswith("ECG-"))
ECG_TOWERS = sorted(timm.list_models("ecg_*"))
SAMPLES = 256  # above every tower's minimum (32 for ResNets, 50 for the ViT); short keeps it cheap


def _ecg(leads, batch=2):
    return torch.randn(batch, leads, SAMPLES, generator=torch.Generator().manual_seed(0))


def test_the_registries_are_not_empty():
    assert len(ECG_MODELS) >= 8 and len(ECG_TOWERS) >= 6, (ECG_MODELS, ECG_TOWERS)


@pytest.mark.parametrize("name", ECG_MODELS)
def test_every_ecg_model_embeds_to_its_dimension_and_trains(name):
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    config = open_clip.get_model_config(name)
    leads = timm.models.get_pretrained_cfg(config["vision_cfg"]["timm_model_name"]).input_size[0]
    tokenizer = open_clip.get_tokenizer(name)
    model.train()
    out = model(_ecg(leads), tokenizer(["sinus rhythm", "atrial fibrillation"]))
    image, text, scale = out[:3]
    assert image.shape == text.shape == (2, config["embed_dim"]), name
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
    (image @ text.T * scale.exp()).sum().backward()
    trained = [p for p in model.visual.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained), name
    with pytest.raises(ValueError, match="lead"):  # the boundary check names what it expects
        model.encode_image(_ecg(leads + 1))


@pytest.mark.parametrize("name", ECG_TOWERS)
def test_every_timm_ecg_tower_follows_the_timm_model_interface(name):
    model = timm.create_model(name)
    leads = model.pretrained_cfg["input_size"][0]
    assert model.in_chans == leads and model.num_classes == 0
    for method in ("forward_features", "forward_head", "reset_classifier", "group_matcher",
                   "set_grad_checkpointing", "get_classifier"):
        assert callable(getattr(model, method, None)), f"{name} has no {method}"
    assert set(model.group_matcher()) >= {"stem", "blocks"}
    x = _ecg(leads)
    model.eval()
    with torch.no_grad():
        pooled = model(x)
        assert pooled.shape == (2, model.num_features) and torch.isfinite(pooled).all()
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), pooled)
    model.reset_classifier(5)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
