"""Training texts: the finding sentence survives tokenisation, per-step sampling states its findings."""
from unittest import mock

import open_clip
import pytest
import torch

import open_clip_ecg  # noqa: F401  (registers the ECG configs)
from open_clip_ecg.data.record import RecordEntry
from open_clip_ecg.data.text import (
    FINDING_TEMPLATES,
    FindingTexts,
    TrainingTextSampler,
    make_text,
    token_count,
    truncation_counts,
)

NAMES = ["first degree AV block", "atrial fibrillation", "left ventricular hypertrophy", "sinus rhythm"]
LONG_REPORT = " ".join(["sinusrhythmus linkstyp periphere niederspannung unspezifische st-strecken-senkung"] * 12)


@pytest.mark.parametrize("model", ["ECG-RN18-CLIPText", "ECG-RN18-MiniLM"])
def test_the_finding_sentence_is_in_the_tokens_of_a_long_report(model):
    tokenizer = open_clip.get_tokenizer(model)
    entry = RecordEntry("r1", "p1", "path", labels=["AFIB", "LVH"], report=LONG_REPORT)
    text = make_text(entry, {"AFIB": "atrial fibrillation", "LVH": "left ventricular hypertrophy"}, "both")
    sentence = "ECG with atrial fibrillation and left ventricular hypertrophy."
    assert token_count(tokenizer, text) > tokenizer.context_length  # the report alone overflows
    tokens = tokenizer([text])[0].tolist()
    sentence_tokens = [t for t in tokenizer([sentence])[0].tolist() if t != 0]
    inner = sentence_tokens[1:-1]  # without the start/end (CLS/SEP) tokens
    assert any(tokens[i:i + len(inner)] == inner for i in range(len(tokens))), "finding sentence was cut"
    counts = truncation_counts(tokenizer, [(text, sentence), (sentence, sentence)])
    assert counts == {"texts": 2, "truncated": 1, "findings_cut": 0, "context_length": tokenizer.context_length}


def test_truncation_counts_a_findings_sentence_longer_than_the_context():
    tokenizer = open_clip.get_tokenizer("ECG-RN18-CLIPText")
    sentence = "ECG with " + " and ".join(NAMES * 8) + "."
    assert truncation_counts(tokenizer, [(sentence, sentence)])["findings_cut"] == 1


def test_sampled_texts_cover_every_kind_and_state_their_findings():
    sampler = TrainingTextSampler(NAMES, seed=0)
    seen = {"report": 0, "subset": 0, "all": 0, "both": 0}
    for _ in range(400):
        text, stated = sampler("stored text", "sinusrhythmus", [1, 2, 3])
        assert set(stated) <= {1, 2, 3} and stated == sorted(stated) and stated
        if text == "sinusrhythmus":
            seen["report"] += 1
            assert stated == [1, 2, 3]
            continue
        named = [i for i, name in enumerate(NAMES) if name in text]
        assert named == stated, (text, stated)  # the text names exactly the findings it states
        assert any(text.startswith(t.split("{}")[0]) for t in FINDING_TEMPLATES)
        if text.endswith("sinusrhythmus"):
            seen["both"] += 1
        elif len(stated) < 3:
            seen["subset"] += 1
        else:
            seen["all"] += 1
    assert all(n > 30 for n in seen.values()), seen
    orders = {sampler("", None, [1, 2, 3])[0] for _ in range(200)}
    assert len(orders) > 10  # random order and phrasing, not one fixed sentence


def test_sampler_falls_back_without_report_or_findings():
    sampler = TrainingTextSampler(NAMES, weights=(1, 0, 0, 0), seed=0)
    text, stated = sampler("stored", None, [0])
    assert "first degree AV block" in text and stated == [0]  # no report: a findings text
    assert sampler("stored", None, []) == ("stored", [])
    assert sampler("stored", "ein bericht", []) == ("ein bericht", [])


def test_sampler_is_reproducible_with_a_seed_and_differs_per_torch_seed():
    draws = lambda s: [s("", "r", [0, 1, 2, 3]) for _ in range(20)]  # noqa: E731
    assert draws(TrainingTextSampler(NAMES, seed=3)) == draws(TrainingTextSampler(NAMES, seed=3))
    torch.manual_seed(1)
    first = draws(TrainingTextSampler(NAMES))
    torch.manual_seed(2)
    assert draws(TrainingTextSampler(NAMES)) != first


@pytest.mark.parametrize("weights", [(1, 1, 1), (-1, 1, 1, 1), (0, 0, 0, 0)])
def test_sampler_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="text weights"):
        TrainingTextSampler(NAMES, weights=weights)


def test_finding_texts_name_one_finding_per_row_in_varying_phrasings():
    """--ecg-finding-texts: row i states finding i alone, in a template a zero-shot prompt also uses."""
    finding_texts = FindingTexts([*NAMES[:3], "sinus rhythm."], seed=0)
    assert len(finding_texts) == 4
    draws = [finding_texts() for _ in range(50)]
    for texts in draws:
        assert len(texts) == 4
        for text, name in zip(texts, NAMES):
            assert name in text and any(template.format(name) == text for template in FINDING_TEMPLATES)
            assert not any(other in text for other in NAMES if other != name and other not in name)
    assert len({texts[1] for texts in draws}) > 3  # phrased afresh on each call
    again = FindingTexts(NAMES, seed=0)
    assert draws == [again() for _ in range(50)]  # reproducible with a seed
    with pytest.raises(ValueError, match="at least one finding"):
        FindingTexts([])


def test_finding_group_texts_name_their_members_and_skip_repeats():
    """--ecg-finding-groups: a group row names several findings; a group with no member, the same
    findings as an earlier row, or an earlier row's name for other findings gets no text (listed)."""
    groups = [("AV or rhythm finding", [0, 1]), ("first degree AV block", [0, 2]), ("sinus", [3]),
              ("empty", []), ("ECG abnormality.", [0, 1, 2])]
    finding_texts = FindingTexts(NAMES, groups, seed=0)
    assert finding_texts.names == [*NAMES, "AV or rhythm finding", "ECG abnormality"]
    assert finding_texts.members().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
                                                [1, 1, 0, 0], [1, 1, 1, 0]]
    assert finding_texts.skipped == [
        ("first degree AV block", "'first degree AV block' already names other findings"),
        ("sinus", "names the same findings as 'sinus rhythm'"),
        ("empty", "no member finding in the vocabulary")]
    texts = finding_texts()
    assert len(texts) == 6 and "AV or rhythm finding" in texts[4] and "ECG abnormality" in texts[5]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        FindingTexts(NAMES, [("beyond", [1, 9])])


def test_finding_groups_of_a_task_read_its_members_in_the_vocabulary():
    from open_clip_ecg.tasks import finding_groups

    vocabulary = ["NORM", "1AVB", "CLBBB", "LVH", "IMI", "AFIB"]
    groups = dict(finding_groups(["ptbxl-super"], vocabulary))
    assert groups == {"conduction disturbance": [1, 2], "hypertrophy": [3], "myocardial infarction": [4],
                      "normal ECG": [0], "ST/T change": []}
    with pytest.raises(ValueError, match="'labels' is the vocabulary itself"):
        finding_groups(["labels"], vocabulary)


# ----------------------------------------------------------------- encoding without the padding
def _twin_models(model_name, pool_type=None):
    """open_clip's `model_name` and a copy with the padding-skipping encode_text."""
    import copy

    from open_clip_ecg.training.unpadded_text import enable_unpadded_text

    torch.manual_seed(0)
    model = open_clip.create_model(model_name)
    if pool_type:
        model.text_pool_type, model.text_eos_id = pool_type, 49407  # the CLIP tokenizer's end of text
    return model, enable_unpadded_text(copy.deepcopy(model))


@pytest.mark.parametrize("model_name, pool_type", [("ECG-RN18-CLIPText", "argmax"), ("ECG-RN18-CLIPText", "eos"),
                                                   ("ECG-RN18-CLIPText", "first"), ("ECG-RN18-MiniLM", None)])
def test_unpadded_text_gives_open_clips_features_and_gradients(model_name, pool_type):
    model, unpadded = _twin_models(model_name, pool_type)
    assert unpadded.encode_text != model.encode_text
    tokens = open_clip.get_tokenizer(model_name)(["sinus rhythm with left axis deviation"] * 3 + ["normal"])
    encoded = []
    with mock.patch.object(torch.nn.Embedding, "forward", autospec=True,
                           side_effect=lambda m, x: (encoded.append(x.shape[1]), torch.nn.functional.embedding(
                               x, m.weight, m.padding_idx))[1]):
        features = [m.encode_text(tokens, normalize=True) for m in (model, unpadded)]
    assert encoded[0] == tokens.shape[1] and encoded[-1] <= 16  # it does skip the padding
    torch.testing.assert_close(features[1], features[0], rtol=0, atol=1e-6)
    for m, f in zip((model, unpadded), features):
        (f * torch.arange(f.shape[1])).sum().backward()
    for (name, p), q in zip(model.named_parameters(), unpadded.parameters()):
        if p.grad is not None:
            # the same sums in another order (the MLP's GEMMs over fewer rows): float32's last bits
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()), msg=name)


def test_unpadded_length_keeps_each_rows_pooled_position():
    from open_clip_ecg.training.unpadded_text import unpadded_length

    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :6] = torch.tensor([49406, 5, 6, 7, 8, 49407])
    tokens[1, :3] = torch.tensor([49406, 5, 49407])
    assert unpadded_length(tokens, "argmax", multiple=1) == 6
    assert unpadded_length(tokens, "eos", 49407, multiple=1) == 6
    assert unpadded_length(tokens, "first", multiple=1) == 1
    assert unpadded_length(tokens, "argmax") == 8  # rounded up to the multiple
    tokens[1] = 5
    tokens[1, -1] = 49407  # a text that fills the context
    assert unpadded_length(tokens, "argmax") == 77


def test_unpadded_hf_length_keeps_every_column_that_is_not_all_padding():
    from open_clip_ecg.training.unpadded_text import unpadded_hf_length

    tokens = torch.zeros(2, 128, dtype=torch.long)
    tokens[0, :5], tokens[1, :9] = 7, 7
    assert unpadded_hf_length(tokens, 0, multiple=1) == 9
    assert unpadded_hf_length(tokens, 0) == 16
    assert unpadded_hf_length(tokens, 7, multiple=1) == 128  # 0 is not padding there


@pytest.mark.parametrize("change", ["no causal mask", "last pooling", "token outputs"])
def test_text_towers_that_read_the_padding_keep_open_clips_encode_text(change):
    from open_clip_ecg.training.label_passing import enable_label_passing

    model = open_clip.create_model("ECG-RN18-MiniLM" if change == "token outputs" else "ECG-RN18-CLIPText")
    if change == "no causal mask":
        model.attn_mask = None
    elif change == "last pooling":
        model.text_pool_type = "last"  # the last position reads every pad before it
    else:
        model.text.output_tokens = True  # the token features would lose their padding columns
    assert enable_label_passing(model).encode_text == model.encode_text.__func__.__get__(model)
    assert "encode_text" not in vars(model)


def test_the_training_forward_encodes_without_the_padding():
    from open_clip_ecg.training.label_passing import enable_label_passing
    from open_clip_ecg.training.unpadded_text import _encode_text_unpadded

    model = enable_label_passing(open_clip.create_model("ECG-RN18-CLIPText"))
    assert vars(model)["encode_text"].__func__ is _encode_text_unpadded
