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

    from open_clip_ecg.unpadded_text import enable_unpadded_text

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
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer(["normal", LONG_REPORT, "sinus rhythm with left axis deviation", "normal"])
    encoded = {}
    for m in (model, unpadded):  # the lengths each model's token embedding sees
        with mock.patch.object(torch.nn.Embedding, "forward", autospec=True, side_effect=lambda e, x: (
                encoded.setdefault(m is unpadded, set()).add(x.shape[-1]),
                torch.nn.functional.embedding(x, e.weight, e.padding_idx))[1]):
            m.encode_text(tokens)
    full = tokenizer.context_length
    assert encoded == {False: {full}, True: ({16} if pool_type == "first" else {16, full})}
    features = [m.encode_text(tokens, normalize=True) for m in (model, unpadded)]
    torch.testing.assert_close(features[1], features[0], rtol=0, atol=1e-6)  # and in the batch's order
    for m, f in zip((model, unpadded), features):
        (f * torch.arange(f.shape[1])).sum().backward()
    scale = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    for (name, p), q in zip(model.named_parameters(), unpadded.parameters()):
        if p.grad is not None:
            # the same sums in another order (GEMMs over fewer rows): float32's last bits of this
            # gradient, or of the largest one (attention's key biases get zero, up to that noise)
            atol = 1e-5 * float(p.grad.abs().max()) + 1e-8 * scale
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=atol, msg=name)


def test_pooled_lengths_end_at_each_rows_pooled_position():
    from open_clip_ecg.unpadded_text import pooled_lengths

    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[0, :6] = torch.tensor([49406, 5, 6, 7, 8, 49407])
    tokens[1, :3] = torch.tensor([49406, 5, 49407])
    tokens[2], tokens[2, -1] = 5, 49407  # a text that fills the context
    assert pooled_lengths(tokens, "argmax").tolist() == [6, 3, 77]
    assert pooled_lengths(tokens, "eos", 49407).tolist() == [6, 3, 77]
    assert pooled_lengths(tokens, "first").tolist() == [1, 1, 1]


def test_unpadded_lengths_end_after_each_rows_last_real_token():
    from open_clip_ecg.unpadded_text import unpadded_lengths

    tokens = torch.zeros(3, 128, dtype=torch.long)
    tokens[0, :5], tokens[1, :9] = 7, 7
    assert unpadded_lengths(tokens, 0).tolist() == [5, 9, 1]
    assert unpadded_lengths(tokens, 7).tolist() == [128, 128, 128]  # 0 is not padding there


def test_length_buckets_encode_each_row_once_and_keep_the_order():
    from open_clip_ecg.unpadded_text import encode_in_length_buckets

    text = torch.zeros(5, 77, dtype=torch.long)
    lengths = torch.tensor([3, 40, 17, 77, 16])
    for row, n in enumerate(lengths.tolist()):
        text[row, :n] = row + 1
    calls = []

    def encode_prefix(prefix):  # (row id, row sum, prefix length) per row
        calls.append(prefix.shape)
        return torch.stack([prefix[:, 0], prefix.sum(dim=1), torch.full((len(prefix),), prefix.shape[1])], dim=1)

    out = encode_in_length_buckets(encode_prefix, text, lengths)
    assert out[:, 0].tolist() == [1, 2, 3, 4, 5] and out[:, 1].tolist() == text.sum(dim=1).tolist()
    assert out[:, 2].tolist() == [16, 48, 32, 77, 16]
    assert [c[0] for c in calls] == [2, 2, 2, 2]  # the lone texts of 32, 48 and 77 each beside a copy


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


def test_load_model_encodes_without_the_padding_as_training_does():
    from open_clip_ecg.factory import load_model
    from open_clip_ecg.unpadded_text import _encode_text_unpadded

    model, _ = load_model("ECG-RN18-CLIPText")
    assert vars(model)["encode_text"].__func__ is _encode_text_unpadded


def test_the_training_forward_encodes_without_the_padding():
    from open_clip_ecg.training.label_passing import enable_label_passing
    from open_clip_ecg.unpadded_text import _encode_hf_text_unpadded, _encode_text_unpadded

    for name, encode in (("ECG-RN18-CLIPText", _encode_text_unpadded), ("ECG-RN18-MiniLM", _encode_hf_text_unpadded)):
        model = enable_label_passing(open_clip.create_model(name))
        assert vars(model)["encode_text"].__func__ is encode


def test_torch_compile_trains_as_eager_and_stops_compiling_once_batch_and_length_are_dynamic():
    """``--torchcompile`` compiles the training forward: the steps equal eager ones, and once each
    bucket's batch size and length have varied, new bucket mixes compile nothing new."""
    from open_clip_ecg.data.pipeline import pack_text_and_labels
    from open_clip_ecg.training.synthetic_step import N_LABELS, training_parts

    graphs = []

    def counting_backend(graph_module, example_inputs):  # runs each graph eagerly, counting them
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = training_parts("ECG-RN18-CLIPText", compile_backend=counting_backend)
    torch.manual_seed(0)
    eager = training_parts("ECG-RN18-CLIPText")
    tokenizer = open_clip.get_tokenizer("ECG-RN18-CLIPText")
    # words per text -> bucket lengths 16/32/48/64/77; each step mixes other buckets and counts; lone
    # texts first come after the third step (dynamo would compile a batch of one then, were it encoded alone)
    steps = [[3, 3, 20, 20, 20, 20], [3, 3, 40, 40, 40, 40], [20, 20, 20, 55, 55, 55], [3, 20, 40, 55, 70, 70],
             [70, 70, 70, 70, 70, 3], [20, 55, 55, 3, 3, 40], [3, 3, 3, 3, 3, 3], [3, 20, 40, 55, 70, 10]]
    counts = []
    generator = torch.Generator().manual_seed(0)
    for words in steps:
        tokens = tokenizer([" ".join(["sinus"] * n) for n in words])
        labels = (torch.rand(len(words), N_LABELS, generator=generator) < 0.2).float()
        packed = torch.stack([pack_text_and_labels(t, y) for t, y in zip(tokens, labels)])
        ecg = torch.randn(len(words), 12, 250, generator=generator)
        compiled.step(ecg, packed)
        eager.step(ecg, packed)
        counts.append(len(graphs))
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert counts[2:] == [counts[2]] * (len(steps) - 2), counts  # nothing compiled after the third step
