"""Generic CSV/JSONL reader on a synthetic WFDB fixture written by the test."""
import csv
import json

import numpy as np
import pytest

from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.readers.csv import CSVReader
from open_clip_ecg.data.synthetic import FINDINGS, generate_record, write_synthetic_dataset
from open_clip_ecg.leads import STANDARD_LEADS


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    csv_path = write_synthetic_dataset(root, 6, seed=5, progress=False)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return csv_path, rows


def test_entries_follow_the_csv(synth):
    csv_path, rows = synth
    reader = get_reader("csv", csv_path)
    entries = list(reader.entries())
    assert [e.record_id for e in entries] == [r["id"] for r in rows]
    for entry, row in zip(entries, rows):
        assert entry.path == str(csv_path.parent / row["path"])
        assert entry.patient_id == row["patient"]
        assert entry.report == row["report"] and entry.report
        assert entry.labels == row["labels"].split(";")
        assert entry.split is None and entry.fold is None
        assert entry.metadata == {"age": row["age"], "sex": row["sex"]}
    assert reader.label_names() == FINDINGS  # from the sibling label_names.csv


def test_load_returns_the_written_signal_in_millivolts(synth):
    csv_path, _ = synth
    reader = CSVReader(csv_path)
    entry = next(iter(reader.entries()))
    record = reader.load(entry)
    expected = generate_record(0, seed=5)
    assert record.sampling_rate == 500 and record.lead_names == STANDARD_LEADS
    assert record.signal.dtype == np.float32 and record.signal.shape == (12, 5000)
    np.testing.assert_allclose(record.signal, expected.signal, atol=6e-4)  # 1 uV quantisation


def test_jsonl_with_lists_absolute_paths_and_options(synth, tmp_path):
    csv_path, rows = synth
    index = tmp_path / "index.jsonl"
    lines = [{"path": str(csv_path.parent / rows[0]["path"]) + ".hea", "report": "", "labels": ["B", "A", "B"],
              "patient": "p1", "split": "Val", "fold": 3, "id": "rec one", "site": 7},
             {"path": str(csv_path.parent / rows[1]["path"]), "report": "x", "labels": "C; ;D"}]
    index.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"A": "alpha"}))
    reader = CSVReader(index, label_names=names)
    first, second = reader.entries()
    assert (first.record_id, first.patient_id, first.split, first.fold) == ("rec one", "p1", "val", 3)
    assert first.labels == ["B", "A"] and first.metadata == {"site": 7}
    assert second.labels == ["C", "D"] and second.record_id == lines[1]["path"]  # no id column: the path
    assert second.patient_id == second.record_id  # no patient column: each record is its own patient
    assert reader.label_names() == {"A": "alpha"}
    assert reader.load(first).signal.shape == (12, 5000)
    assert CSVReader(index, label_names={"C": "gamma"}).label_names() == {"C": "gamma"}


def test_missing_columns_name_the_file_and_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,notes\nrec1,hello\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*missing required column\(s\) \['report', 'labels'\]"):
        list(CSVReader(bad).entries())
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"path": "a", "report": ""}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*\['labels'\]"):
        list(CSVReader(bad_jsonl).entries())


@pytest.mark.parametrize("body, message", [
    ("path,report,labels,split\na,,X,training\n", "split 'training' is not one of"),
    ("path,report,labels\na,,X\na,,Y\n", "duplicate record id 'a'"),
    ("path,report,labels,fold\na,,X,one\n", "fold 'one' is not an integer"),
    ("path,report,labels\n,,X\n", "empty 'path'"),
])
def test_bad_rows_are_value_errors_with_line_numbers(tmp_path, body, message):
    index = tmp_path / "index.csv"
    index.write_text(body)
    with pytest.raises(ValueError, match=rf"index\.csv:\d+: {message}"):
        list(CSVReader(index).entries())


def test_bad_files_and_label_names(tmp_path):
    with pytest.raises(ValueError, match="index file not found"):
        CSVReader(tmp_path / "none.csv")
    (tmp_path / "index.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a .csv or .jsonl"):
        CSVReader(tmp_path / "index.txt")
    (tmp_path / "index.csv").write_text("path,report,labels\n")
    (tmp_path / "names.csv").write_text("code,label\nA,alpha\n")
    with pytest.raises(ValueError, match=r"names\.csv: label names file lacks column\(s\) \['name'\]"):
        CSVReader(tmp_path / "index.csv", label_names=tmp_path / "names.csv")
