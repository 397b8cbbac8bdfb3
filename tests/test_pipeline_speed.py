"""The fast data pipeline (issue 22): beats stored with each shard sample and used for the RR channels,
older shards detected at read time, the same channels wherever they are computed, the band-pass
designed once per rate, tokens cached for repeated texts."""
import json

import numpy as np
import open_clip
import pytest
import torch

from open_clip_ecg.data import rhythm
from open_clip_ecg.data.manifest import read_shard_info
from open_clip_ecg.data.pipeline import (
    CachedTokenizer,
    ContrastivePair,
    ECGSamplePreparer,
    EvalRecord,
    expand_shards,
    iterate_samples,
    unpack_text_and_labels,
)
from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.shard_format import ShardFormatError, SampleSchema, check_beats
from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
from open_clip_ecg.data.synthetic import write_synthetic_dataset
from open_clip_ecg.data.transforms import Normalize
from open_clip_ecg.embed import map_shards
from open_clip_ecg.leads import LEAD_SETS, STANDARD_LEADS
from open_clip_ecg.model_preprocess import ECGPreprocess

RATE = 100
RR_LEADS = LEAD_SETS["12+rr"]


@pytest.fixture(scope="module")
def shard_pair(tmp_path_factory):
    """The same 24 synthetic records written with stored beats (today's writer) and without (older shards)."""
    root = tmp_path_factory.mktemp("beats")
    csv_path = write_synthetic_dataset(root / "records", n=24, seed=3, progress=False)
    folders = {}
    for beats in (True, False):
        folders[beats] = root / ("with-beats" if beats else "older")
        write_shards(get_reader("csv", csv_path), folders[beats],
                     ShardOptions(sampling_rate=RATE, seconds=10, split_by="random", val_fraction=0.0,
                                  test_fraction=0.0, shard_size=8, beats=beats, progress=False))
    return {beats: expand_shards(str(folder), split="train") for beats, folder in folders.items()}


def _eval_ecgs(shards, leads=RR_LEADS):
    preparer = ECGSamplePreparer(1000, 0, train=False, leads=leads, sampling_rate=RATE)
    return torch.stack([preparer.ecg(s) for s in iterate_samples(shards)])


def test_the_writer_stores_the_beats_a_reader_would_find_and_names_the_detector(shard_pair):
    info = read_shard_info(shard_pair[True])
    assert info["beats"] == rhythm.BEAT_DETECTOR
    assert read_shard_info(shard_pair[False])["beats"] is None
    samples = list(iterate_samples(shard_pair[True]))
    assert len(samples) == 24
    for sample in samples:
        np.testing.assert_array_equal(sample["beats"], rhythm.detect_beats(sample["ecg"], RATE))
        assert len(sample["beats"]) >= 3  # synthetic records have a rhythm: the channels are not all zero
    assert all("beats" not in s for s in iterate_samples(shard_pair[False]))


def test_stored_beats_are_used_and_older_shards_detect_at_read_time(shard_pair, monkeypatch):
    expected = _eval_ecgs(shard_pair[False])  # older shards: beats detected here

    def no_detection(*args, **kwargs):
        raise AssertionError("beats detected at read time")

    monkeypatch.setattr(rhythm, "detect_beats", no_detection)
    with_beats = _eval_ecgs(shard_pair[True])  # would raise if the stored beats were not used
    torch.testing.assert_close(with_beats, expected, rtol=0, atol=0)
    assert with_beats[:, 12:].abs().sum() > 0
    with pytest.raises(AssertionError, match="detected at read time"):
        _eval_ecgs(shard_pair[False])
    with pytest.raises(AssertionError, match="detected at read time"):  # other leads: their own beats
        _eval_ecgs(shard_pair[True], leads=["I", "II"] + list(RR_LEADS[-2:]))


def test_beats_of_another_detector_version_are_not_used(shard_pair, tmp_path, monkeypatch):
    folder = tmp_path / "other-version"
    folder.mkdir()
    source = shard_pair[True][0].rsplit("/", 1)[0]
    for name in ("vocabulary.json", "sizes.json", "train-000000.tar"):
        (folder / name).write_bytes(open(f"{source}/{name}", "rb").read())
    manifest = json.loads(open(f"{source}/manifest.json").read())
    manifest["options"]["beats"] = dict(rhythm.BEAT_DETECTOR, version=rhythm.BEAT_DETECTOR["version"] - 1)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert all("beats" not in s for s in iterate_samples(str(folder / "train-000000.tar")))
    calls = []
    real = rhythm.detect_beats
    monkeypatch.setattr(rhythm, "detect_beats", lambda *a: calls.append(1) or real(*a))
    _eval_ecgs(str(folder / "train-000000.tar"))
    assert len(calls) == 8


def test_the_channels_are_the_same_in_training_evaluation_embed_and_the_raw_signal_preprocess(shard_pair):
    shards = shard_pair[True]
    evaluation = _eval_ecgs(shards)
    embedded, _ = map_shards(lambda ecg: ecg, shards, 1000, RR_LEADS, batch_size=5, sampling_rate=RATE)
    torch.testing.assert_close(torch.from_numpy(embedded), evaluation, rtol=0, atol=0)

    # training: a crop of the whole record is the record, whatever the random offset
    training = ECGSamplePreparer(1000, 0, train=True, leads=RR_LEADS, sampling_rate=RATE)
    torch.testing.assert_close(torch.stack([training.ecg(s) for s in iterate_samples(shards)]), evaluation,
                               rtol=0, atol=0)

    # the exported model's preprocess, from the raw signal (the stored record, leads shuffled by name)
    cfg = {"sampling_rate": RATE, "seconds": 5.0, "eval_seconds": 10.0, "leads": RR_LEADS, "normalize": "center"}
    preprocess = ECGPreprocess(cfg, train=False)
    order = list(reversed(STANDARD_LEADS))
    raw = torch.stack([preprocess(s["ecg"][[STANDARD_LEADS.index(n) for n in order]], RATE, order)
                       for s in iterate_samples(shards)])
    torch.testing.assert_close(raw, evaluation, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(raw[:, 12:], evaluation[:, 12:], rtol=0, atol=0)


def test_contrastive_pairs_of_older_and_new_shards_agree(shard_pair):
    """Training pairs (sampled text, RR channels) of shards with and without beats are the same."""
    info = read_shard_info(shard_pair[True])
    from open_clip_ecg.data.text import TrainingTextSampler

    def pairs(shards):
        preparer = ECGSamplePreparer(1000, len(info["vocabulary"]), train=True, leads=RR_LEADS, sampling_rate=RATE)
        pair = ContrastivePair(preparer, lambda text: torch.tensor([[len(text), 1, 2]]),
                               TrainingTextSampler([v["name"] for v in info["vocabulary"]], seed=0))
        return [pair(s) for s in iterate_samples(shards)]

    for (ecg_new, text_new), (ecg_old, text_old) in zip(pairs(shard_pair[True]), pairs(shard_pair[False])):
        torch.testing.assert_close(ecg_new, ecg_old, rtol=0, atol=0)
        assert torch.equal(text_new, text_old)


def test_bad_stored_beats_are_one_clear_error():
    schema = SampleSchema(12, 1000, ("A",), beats=True)
    np.testing.assert_array_equal(check_beats([5, 90, 700], schema, "s.tar (key k)"), [5, 90, 700])
    for bad in ([5, 5, 9], [3, 1000], [-1, 4], ["5"], {"beats": [1]}, [1.0, 2.0]):
        with pytest.raises(ShardFormatError, match=r"s\.tar \(key k\): beats\.json"):
            check_beats(bad, schema, "s.tar (key k)")


def test_a_sample_missing_the_declared_beats_is_named(shard_pair, tmp_path):
    import tarfile

    source = shard_pair[True][0]
    folder = tmp_path / "lacking"
    folder.mkdir()
    base = source.rsplit("/", 1)[0]
    for name in ("vocabulary.json", "sizes.json", "manifest.json"):
        (folder / name).write_bytes(open(f"{base}/{name}", "rb").read())
    with tarfile.open(source) as src, tarfile.open(folder / "train-000000.tar", "w", format=tarfile.GNU_FORMAT) as dst:
        first = src.getnames()[0].split(".")[0]
        for member in src.getmembers():
            if member.name != f"{first}.beats.json":
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(ShardFormatError, match="lacks beats.json"):
        list(iterate_samples(str(folder / "train-000000.tar")))


def test_the_band_pass_is_designed_once_per_rate(monkeypatch):
    import scipy.signal

    calls = []
    real = scipy.signal.butter  # qrs_filter imports it from scipy.signal on each call
    monkeypatch.setattr(scipy.signal, "butter", lambda *a, **k: calls.append(k["fs"]) or real(*a, **k))
    rhythm.qrs_filter.cache_clear()
    signal = np.random.default_rng(0).normal(size=(12, 5000))
    for rate in (100, 100, 500, 100, 500):
        rhythm.detect_beats(signal[:, :int(rate * 10)], rate)
    assert calls == [100, 500]


def test_rr_channels_from_beats_match_a_per_sample_computation():
    beats = np.array([40, 120, 190, 300, 390, 480, 700])
    n, rate = 900, 100.0
    rr = np.diff(beats) / rate
    expected = np.zeros((2, n), np.float32)
    for t in range(n):
        k = min(max(np.searchsorted(beats[1:], t, side="right"), 0), len(rr) - 1)
        expected[0, t] = (rr[k] / np.median(rr) - 1.0) * 5.0
        expected[1, t] = (60.0 / rr[k] - 70.0) / 30.0
    np.testing.assert_array_equal(rhythm.rr_channels_from_beats(beats, n, rate), expected)
    for even in (beats[:4], beats[:5]):  # an even and an odd number of intervals: np.median's value
        r = np.diff(even) / rate
        got = rhythm.rr_channels_from_beats(even, n, rate)[0, -1]
        assert got == np.float32((r[-1] / np.median(r) - 1.0) * 5.0)


@pytest.mark.parametrize("length", [1000, 999, 1])
def test_center_normalisation_subtracts_torchs_median(length):
    signal = torch.randn(12, length, generator=torch.Generator().manual_seed(length))
    expected = signal - signal.median(dim=-1, keepdim=True).values
    torch.testing.assert_close(Normalize("center")(signal), expected, rtol=0, atol=0)


def test_repeated_texts_are_tokenised_once_and_the_cache_is_bounded():
    seen = []

    def tokenizer(text):
        seen.append(text)
        return torch.tensor([[len(text), 7]])

    tokens = CachedTokenizer(tokenizer, size=2)
    assert torch.equal(tokens("normal ecg"), torch.tensor([10, 7]))
    assert torch.equal(tokens("normal ecg"), torch.tensor([10, 7]))
    assert seen == ["normal ecg"]
    tokens("a")
    tokens("normal ecg")  # most recently used: kept when "b" arrives
    tokens("b")
    tokens("normal ecg")
    tokens("a")  # evicted (least recently used): tokenised again
    assert seen == ["normal ecg", "a", "b", "a"]
    assert len(tokens.cache) == 2


def test_eval_records_and_pairs_carry_the_same_tokens_as_the_tokenizer(shard_pair):
    """The token cache does not change what a pair carries."""
    calls = []

    def tokenizer(text):
        return torch.tensor([[sum(map(ord, text)) % 1000, len(text)]])

    def counted(text):
        calls.append(text)
        return tokenizer(text)

    preparer = ECGSamplePreparer(1000, len(read_shard_info(shard_pair[True])["vocabulary"]), train=False)
    pair = ContrastivePair(preparer, counted)
    record = EvalRecord(preparer, True, tokenizer)
    samples = list(iterate_samples(shard_pair[True]))
    for sample in samples + samples:
        packed = pair(sample)[1][None]
        assert torch.equal(unpack_text_and_labels(packed).tokens[0], record(sample)["tokens"])
    assert sorted(calls) == sorted({s["text"] for s in samples})  # each distinct text once, over two epochs


def test_rr_channels_come_from_the_recorded_signal_whatever_the_normalisation():
    """Beats are found before normalisation, so stored beats serve every normalisation."""
    from open_clip_ecg.data.synthetic import generate_record
    from open_clip_ecg.data.transforms import build_ecg_transform

    signal = torch.from_numpy(generate_record(0, seed=1, sampling_rate=RATE).signal)
    signal[3] *= 40  # one loud lead: z-scoring it changes its weight in the QRS energy
    expected = torch.from_numpy(rhythm.rr_channels(signal.numpy(), RATE))
    for mode in ("center", "zscore", "none"):
        out = build_ecg_transform(train=False, n_samples=1000, normalize=mode, rr_sampling_rate=RATE)(signal)
        torch.testing.assert_close(out[12:], expected, rtol=0, atol=0)


def test_the_shards_command_stores_beats_when_asked(tmp_path):
    """`open-clip-ecg shards --beats` as a user runs it: the manifest names the detector, samples carry beats."""
    import os
    import subprocess
    import sys

    csv_path = write_synthetic_dataset(tmp_path / "records", n=6, seed=5, progress=False)
    for flags, beats in ((["--beats"], rhythm.BEAT_DETECTOR), ([], None)):
        out = tmp_path / f"shards{len(flags)}"
        result = subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", "shards", "--format", "csv", "--input",
                                 str(csv_path), "--output", str(out), "--sampling-rate", "100", "--split-by", "random",
                                 "--val-fraction", "0", "--test-fraction", "0", "--no-progress", *flags],
                                capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads((out / "manifest.json").read_text())["options"]["beats"] == beats
        assert all(("beats" in s) == bool(beats) for s in iterate_samples(str(out / "train-000000.tar")))


# Texts whose parts meet the composition's edges: punctuation runs across a space, HTML entities,
# non-ASCII and control characters, mojibake, a report longer than the context.
TRICKY_PARTS = [
    ("an ECG showing left bundle branch block (LBBB), sinus rhythm and AV block.", "Sinusrhythmus. Linkstyp."),
    ("ECG: 1st degree AV block.", "QRS < 120 ms &amp; PR > 200ms; patient's ECG"),
    ("ECG with a&b.", "report"),
    ("the ECG demonstrates ST elevation.", "Ã¼berdrehter Linkstyp, mÃ¶glicher Infarkt"),
    ("sinus  rhythm\u00e9.", "tail"),
    ("ECG with\tnormal ecg.", "\x1b[31m red"),
    ("findings", "'s 're 've 12,5 mV — ok ... " * 20),
    ("ECG.", "Sinus rhythm. Normal ECG.", "third part"),
    # split at their spaces these change: ftfy repairs "Ã ©" (a mojibake "é") only whole, and
    # ftfy's HTML unescaping depends on a "<" anywhere in the text
    ("Ã ©", "report"),
    ("x &amp;amp;lt; y", "a < b"),
]


def test_joined_parts_tokenise_exactly_as_the_joined_text():
    """CachedTokenizer.joined builds tokens from cached word encodings: they must equal open_clip's
    tokens of the whole text, edges and truncation included, on a second (cached) call too."""
    tokenizer = open_clip.get_tokenizer("ECG-RN18-CLIPText")
    tokens = CachedTokenizer(tokenizer)
    for _ in range(2):
        for parts in TRICKY_PARTS:
            assert torch.equal(tokens.joined(parts), tokenizer(" ".join(parts))[0]), parts
    assert tokens.encodings, "the composing path was not taken"


def test_joined_falls_back_to_the_whole_text_for_other_tokenizers():
    seen = []

    def tokenizer(text):
        seen.append(text)
        return torch.tensor([[len(text), 7]])

    tokens = CachedTokenizer(tokenizer)
    assert torch.equal(tokens.joined(("ab", "cde")), torch.tensor([6, 7]))
    assert seen == ["ab cde"] and not tokens.encodings


def test_sampled_texts_of_real_reports_tokenise_exactly(ptbxl2k_dir):
    """Every sampled text kind over the real PTB-XL reports (German, umlauts, abbreviations)."""
    import csv
    import random

    from open_clip_ecg.data.text import TrainingTextSampler

    with open(ptbxl2k_dir / "scp_statements.csv", encoding="utf-8") as f:
        names = [row["description"] for row in csv.DictReader(f)]
    with open(ptbxl2k_dir / "ptbxl_database.csv", encoding="utf-8") as f:
        reports = [row["report"] for row in csv.DictReader(f)]
    tokenizer = open_clip.get_tokenizer("ECG-RN18-CLIPText")
    tokens, sampler, draw = CachedTokenizer(tokenizer), TrainingTextSampler(names, seed=0), random.Random(0)
    for report in reports:
        ids = draw.sample(range(len(names)), draw.randint(1, 6))
        for _ in range(2):
            parts, _ = sampler.parts("stored", report, ids)
            assert torch.equal(tokens.joined(parts), tokenizer(" ".join(parts))[0]), parts
