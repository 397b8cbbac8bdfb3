"""Zero-shot API on a real (randomly initialised) ECG model: classifier, embeddings, probabilities."""
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from open_clip_ecg.zeroshot import (
    DEFAULT_TEMPLATES,
    build_zeroshot_classifier,
    encode_ecg,
    predict_proba,
    predict_proba_from_embeddings,
)

MODEL_NAME = "ECG-RN18-CLIPText"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL_NAME)
    # A scale and bias that give probabilities away from 0 and 1, so the comparison means something.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(5.0))
        model.logit_bias.fill_(-0.5)
    return model, open_clip.get_tokenizer(MODEL_NAME)


@pytest.fixture(scope="module")
def ecg():
    return torch.randn(5, 12, 1000, generator=torch.Generator().manual_seed(1)) * 0.3


def _text_embedding(model, tokenizer, text):
    with torch.no_grad():
        return model.eval().encode_text(tokenizer([text]), normalize=True)[0]


def test_classifier_is_normalised_mean_over_templates_and_synonyms(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    findings = {"atrial fibrillation": ["atrial fibrillation", "AF"], "normal ECG": ["normal ECG"]}
    templates = ["an ECG showing {}.", lambda name: f"{name} on the tracing"]
    classifier = build_zeroshot_classifier(model, tokenizer, findings, templates, batch_size=3)

    assert classifier.shape == (2, 256)
    for row, names in zip(classifier, findings.values()):
        prompts = [t.format(n) if isinstance(t, str) else t(n) for n in names for t in templates]
        expected = F.normalize(torch.stack([_text_embedding(model, tokenizer, p) for p in prompts]).mean(0), dim=0)
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)


def test_classifier_from_names_uses_default_templates(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    classifier = build_zeroshot_classifier(model, tokenizer, ["sinus rhythm", "left bundle branch block"])
    assert classifier.shape == (2, 256)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(2))
    prompts = [t.format("left bundle branch block") for t in DEFAULT_TEMPLATES]
    expected = F.normalize(torch.stack([_text_embedding(model, tokenizer, p) for p in prompts]).mean(0), dim=0)
    torch.testing.assert_close(classifier[1], expected, rtol=1e-5, atol=1e-5)


def test_encode_ecg_is_eval_mode_batched_and_restores_training(model_and_tokenizer, ecg):
    model, _ = model_and_tokenizer
    model.train()
    whole = encode_ecg(model, ecg, batch_size=64)
    in_pairs = encode_ecg(model, ecg.numpy().astype(np.float16), batch_size=2)
    assert model.training
    assert whole.shape == (5, 256) and whole.dtype == torch.float32 and not whole.requires_grad
    torch.testing.assert_close(whole.norm(dim=-1), torch.ones(5))
    # Eval-mode BatchNorm makes every ECG independent of its batch; float16 input only rounds.
    torch.testing.assert_close(in_pairs, whole, rtol=0, atol=5e-3)
    with torch.no_grad():
        by_hand = model.eval().encode_image(ecg, normalize=True)
    torch.testing.assert_close(whole, by_hand, rtol=1e-5, atol=1e-5)


def test_probabilities_are_siglip_sigmoid_of_scaled_cosine(model_and_tokenizer, ecg):
    model, tokenizer = model_and_tokenizer
    classifier = build_zeroshot_classifier(model, tokenizer, ["atrial fibrillation", "sinus rhythm", "ST elevation"])
    probabilities = predict_proba(model, classifier, ecg)

    with torch.no_grad():
        image = model.eval().encode_image(ecg)
        cos = (image / image.norm(dim=-1, keepdim=True)) @ classifier.T
        expected = torch.sigmoid(5.0 * cos - 0.5)
    assert probabilities.shape == (5, 3)
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-6)
    assert 0.05 < probabilities.min() and probabilities.max() < 0.95

    from_embeddings = predict_proba_from_embeddings(encode_ecg(model, ecg), classifier, 5.0, -0.5)
    torch.testing.assert_close(from_embeddings, probabilities)


@pytest.mark.parametrize("bad_ecg, message", [
    (torch.randn(12, 1000), r"\[N, leads, samples\]"),
    (torch.ones(2, 12, 1000, dtype=torch.int64), "dtype torch.int64"),
    (torch.randn(0, 12, 1000), "non-empty"),
    (torch.randn(2, 6, 1000), "expects 12 leads"),
    (torch.full((2, 12, 1000), float("nan")), "non-finite"),
])
def test_bad_ecg_raises_value_error(model_and_tokenizer, bad_ecg, message):
    model, _ = model_and_tokenizer
    with pytest.raises(ValueError, match=message):
        encode_ecg(model, bad_ecg)


@pytest.mark.parametrize("findings, templates, message", [
    ([], DEFAULT_TEMPLATES, "findings is empty"),
    ("atrial fibrillation", DEFAULT_TEMPLATES, "got the string"),
    ({"AF": []}, DEFAULT_TEMPLATES, "finding 'AF' needs a non-empty list"),
    ([["atrial fibrillation"]], DEFAULT_TEMPLATES, "names must be non-empty strings"),
    (["AF"], ["an ECG"], "exactly one '{}'"),
    (["AF"], [], "non-empty sequence"),
])
def test_bad_findings_or_templates_raise_value_error(model_and_tokenizer, findings, templates, message):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=message):
        build_zeroshot_classifier(model, tokenizer, findings, templates)


def test_model_without_logit_bias_and_mismatched_embeddings_raise(ecg):
    softmax_clip = open_clip.create_model(MODEL_NAME)
    softmax_clip.logit_bias = None
    with pytest.raises(ValueError, match="not trained with a sigmoid"):
        predict_proba(softmax_clip, torch.randn(3, 256), ecg)
    with pytest.raises(ValueError, match=r"classifier \[n_findings, embed_dim\]"):
        predict_proba_from_embeddings(torch.randn(4, 256), torch.randn(3, 128), 10.0, -10.0)
