"""Readers on the real PTB-XL / CinC samples in ../shared/data (skipped when absent), a MIMIC-IV-ECG
fixture in the release layout, and corrupt WFDB / Challenge files written by the tests."""
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from open_clip_ecg.data.preprocess import preprocess_record
from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.readers.cinc import CinCReader, load_snomed_ct_names
from open_clip_ecg.data.readers.mimic_iv_ecg import MIMICIVECGReader, REPORT_COLUMNS
from open_clip_ecg.data.readers.ptbxl import (LABEL_LEVELS, PTBXLReader, load_scp_statements,
                                              scp_codes_at_level, scp_label_names)
from open_clip_ecg.data.readers.wfdb_io import read_header, read_wfdb
from open_clip_ecg.data.record import ECGRecord, RecordEntry, RecordError
from open_clip_ecg.leads import STANDARD_LEADS

MIMIC_LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]


def write_wfdb(directory, name, signal_mv, fs=500, leads=STANDARD_LEADS, gain=200.0, nan_mask=None):
    """A format-16 WFDB record from [leads, samples] millivolts; `nan_mask` samples become invalid."""
    d_signal = np.round(signal_mv * gain).astype(np.int16).T.copy()
    if nan_mask is not None:
        d_signal[nan_mask.T] = -32768
    os.makedirs(directory, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), d_signal=d_signal,
                fmt=["16"] * len(leads), adc_gain=[gain] * len(leads), baseline=[0] * len(leads),
                write_dir=str(directory))
    return os.path.join(str(directory), name)


def ecg_like(n_leads=12, seconds=10, fs=500, seed=0):
    """Beats every 0.8 s with lead-specific amplitude plus noise (mV)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * fs)) / fs
    beat = np.exp(-(((t % 0.8) - 0.2) ** 2) / (2 * 0.01 ** 2))
    return (beat[None] * rng.uniform(0.5, 1.5, (n_leads, 1)) + 0.02 * rng.standard_normal((n_leads, t.size))
            ).astype(np.float32)


def write_challenge_record(directory, name, val, record_line_name=None, gain=1000, dx="426783006"):
    """A Challenge-format record: MATLAB v4 `val` int16 + a header with format 16+24."""
    n_leads, n = val.shape
    scipy.io.savemat(os.path.join(directory, f"{name}.mat"), {"val": val.astype(np.int16)}, format="4")
    lines = [f"{record_line_name or name} {len(STANDARD_LEADS)} 500 {n}"]
    lines += [f"{name}.mat 16+24 {gain}/mV 16 0 {int(val[i % n_leads, 0])} 0 0 {lead}"
              for i, lead in enumerate(STANDARD_LEADS)]
    lines += ["#Age: 61", "#Sex: Female", f"#Dx: {dx}", "#Rx: Unknown"]
    Path(directory, f"{name}.hea").write_text("\n".join(lines) + "\n")
    return os.path.join(directory, name)


# ---------------------------------------------------------------------------------------- PTB-XL

@pytest.mark.parametrize("rate, samples", [(100, 1000), (500, 5000)])
def test_ptbxl_all_records_load_at_both_rates(ptbxl_dir, rate, samples):
    reader = get_reader("ptbxl", ptbxl_dir, sampling_rate=rate)
    entries = list(reader.entries())
    assert len(entries) == 353
    assert len({e.record_id for e in entries}) == 353
    assert entries[0].record_id == "ptbxl_00001" and entries[0].patient_id == "15709"
    assert {e.fold for e in entries} == set(range(1, 9))
    assert sum(bool(e.report) for e in entries) >= 350
    suffix = "_hr" if rate == 500 else "_lr"
    reader = pickle.loads(pickle.dumps(reader))  # shard workers receive a pickled reader
    for entry in entries:
        record = reader.load(entry)
        assert entry.path.endswith(suffix)
        assert record.signal.shape == (12, samples) and record.signal.dtype == np.float32
        assert record.sampling_rate == rate
        assert record.lead_names == ["I", "II", "III", "AVR", "AVL", "AVF"] + [f"V{i}" for i in range(1, 7)]
        assert np.isfinite(record.signal).all() and np.abs(record.signal).max() < 30


def test_ptbxl_first_record_fields_and_labels_at_each_level(ptbxl_dir):
    expected = {"all": ["LVOLT", "NORM", "SR"], "diagnostic": ["NORM"], "subclass": ["NORM"],
                "superclass": ["NORM"], "form": ["LVOLT"], "rhythm": ["SR"]}
    for level in LABEL_LEVELS:
        reader = PTBXLReader(ptbxl_dir, label_level=level)
        entries = list(reader.entries())
        first = entries[0]
        assert first.labels == expected[level], level
        names = reader.label_names()
        assert all(code in names for e in entries for code in e.labels), level
    assert first.fold == 3
    assert first.report == "sinusrhythmus periphere niederspannung"
    assert first.metadata["scp_codes"] == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    assert first.metadata["sex"] == "female" and first.metadata["age"] == 56.0


def test_ptbxl_label_vocabularies_and_names(ptbxl_dir):
    statements = load_scp_statements(ptbxl_dir)
    assert len(statements) == 71
    assert scp_label_names(statements, "superclass") == {
        "CD": "conduction disturbance", "HYP": "hypertrophy", "MI": "myocardial infarction",
        "NORM": "normal ECG", "STTC": "ST/T change"}
    assert len(scp_label_names(statements, "subclass")) == 23
    assert len(scp_label_names(statements, "diagnostic")) == 44
    assert len(scp_label_names(statements, "form")) == 19
    assert len(scp_label_names(statements, "rhythm")) == 12
    assert scp_label_names(statements, "subclass")["_AVB"] == "atrioventricular block"
    assert scp_label_names(statements, "all")["IMI"] == "inferior myocardial infarction"
    # Every record's superclass labels come from its diagnostic statements.
    counts = Counter(code for e in PTBXLReader(ptbxl_dir, label_level="superclass").entries() for code in e.labels)
    assert set(counts) == {"NORM", "MI", "STTC", "CD", "HYP"} and counts["NORM"] > 150


def test_scp_codes_at_level_groups_and_likelihood_threshold(ptbxl_dir):
    statements = load_scp_statements(ptbxl_dir / "scp_statements.csv")
    codes = {"ASMI": 100.0, "ILMI": 50.0, "LAFB": 15.0, "SR": 0.0, "PVC": 0.0}
    assert scp_codes_at_level(codes, statements, "subclass") == ["AMI", "IMI", "LAFB/LPFB"]
    assert scp_codes_at_level(codes, statements, "superclass") == ["CD", "MI"]
    assert scp_codes_at_level(codes, statements, "rhythm") == ["SR"]
    assert scp_codes_at_level(codes, statements, "form") == ["PVC"]
    # Likelihood 0 means unknown: kept at any threshold; known low likelihoods are dropped.
    assert scp_codes_at_level(codes, statements, "all", threshold=20) == ["ASMI", "ILMI", "PVC", "SR"]
    assert scp_codes_at_level(codes, statements, "superclass", threshold=60) == ["MI"]
    reader = PTBXLReader(ptbxl_dir, label_level="diagnostic", likelihood_threshold=100)
    assert all(e.metadata["scp_codes"][c] in (0.0, 100.0) for e in reader.entries() for c in e.labels)
    with pytest.raises(ValueError, match="label level"):
        PTBXLReader(ptbxl_dir, label_level="nonsense")
    with pytest.raises(ValueError, match="100 or 500"):
        PTBXLReader(ptbxl_dir, sampling_rate=250)


def test_ptbxl_reader_rejects_a_folder_without_database(tmp_path):
    with pytest.raises(ValueError, match="ptbxl_database.csv"):
        PTBXLReader(tmp_path)


# ------------------------------------------------------------------------------------------ CinC

def test_cinc_all_28_records_load_including_georgia_quirk(cinc_dir):
    with pytest.raises(wfdb.io.header.HeaderSyntaxError):
        wfdb.rdheader(str(cinc_dir / "E00009"))  # the quirk is still in the data: the repair is needed
    reader = CinCReader(cinc_dir)
    entries = list(reader.entries())
    assert len(entries) == 28
    assert sum(e.record_id.startswith("cinc_E") for e in entries) == 4
    reader = pickle.loads(pickle.dumps(reader))
    lengths = {}
    for entry in entries:
        record = reader.load(entry)
        assert record.signal.shape[0] == 12 and record.sampling_rate == 500
        assert record.lead_names == STANDARD_LEADS
        assert np.isfinite(record.signal).all()
        lengths[entry.record_id] = record.signal.shape[1]
        out = preprocess_record(record, 500, 10)
        assert out.shape == (12, 5000) and out.dtype == np.float16
    assert lengths["cinc_Q0017"] == 28934 and max(lengths.values()) == 28934  # CPSC: up to ~58 s
    assert min(lengths.values()) == 5000


def test_cinc_dx_codes_named_and_metadata(cinc_dir):
    reader = CinCReader(cinc_dir)
    entries = {e.record_id: e for e in reader.entries()}
    georgia = entries["cinc_E00009"]
    assert georgia.labels == ["428750005", "39732003", "427084000"]
    names = reader.label_names()
    assert [names[c] for c in georgia.labels] == ["nonspecific st t abnormality", "left axis deviation",
                                                  "sinus tachycardia"]
    assert georgia.metadata["age"] == 76 and georgia.metadata["sex"] == "male"
    assert georgia.patient_id == "E00009" and georgia.report == ""
    assert not reader.unknown_dx_codes
    assert all(e.labels for e in entries.values())


def test_cinc_mat_conversion_matches_wfdb_and_georgia_header_is_repaired(cinc_dir):
    signal, fs, names = read_wfdb(cinc_dir / "HR00599")
    reference, _ = wfdb.rdsamp(str(cinc_dir / "HR00599"))
    np.testing.assert_allclose(signal, reference.T, atol=1e-5)
    header = read_header(cinc_dir / "E00009")
    assert header.record_name == "E00009" and header.adc_gain[0] == 4880 and header.sig_len == 5000


def test_cinc_synthetic_quirk_record_and_unknown_dx_code(tmp_path):
    val = np.round(ecg_like(seed=1) * 1000).astype(np.int16)
    write_challenge_record(tmp_path, "E12345", val, record_line_name="E12345.mat", dx="164889003,999999")
    write_challenge_record(tmp_path, "A0001", val[:, :3000], dx="426783006")
    reader = CinCReader(tmp_path)
    entries = {e.record_id: e for e in reader.entries()}
    assert set(entries) == {"cinc_A0001", "cinc_E12345"}
    assert entries["cinc_E12345"].labels == ["164889003", "999999"]  # unknown code kept
    assert reader.unknown_dx_codes == Counter({"999999": 1})
    names = reader.label_names()
    assert names["999999"] == "999999" and names["164889003"] == "atrial fibrillation"
    record = reader.load(entries["cinc_E12345"])
    np.testing.assert_allclose(record.signal, val / 1000, atol=1e-6)
    with pytest.raises(RecordError) as err:
        preprocess_record(reader.load(entries["cinc_A0001"]), 500, 10)  # 6 s
    assert err.value.reason == "too_short" and "A0001" in str(err.value)


def test_cinc_corrupt_mat_files(tmp_path):
    val = np.round(ecg_like(seed=2) * 1000).astype(np.int16)
    base = write_challenge_record(tmp_path, "Q9001", val)
    # 'val' with 11 leads while the header lists 12.
    scipy.io.savemat(base + ".mat", {"val": val[:11]}, format="4")
    with pytest.raises(RecordError) as err:
        read_wfdb(base, "cinc_Q9001")
    assert err.value.reason == "lead_count" and "Q9001.mat" in str(err.value)
    # Truncated file.
    scipy.io.savemat(base + ".mat", {"val": val}, format="4")
    data = Path(base + ".mat").read_bytes()
    Path(base + ".mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError) as err:
        read_wfdb(base, "cinc_Q9001")
    assert err.value.reason == "truncated" and "Q9001.mat" in str(err.value)
    # Missing signal file, and a header that cannot be parsed: listed, then counted as unreadable.
    os.remove(base + ".mat")
    Path(tmp_path, "BAD1.hea").write_text("this is not a header\n")
    reader = CinCReader(tmp_path)
    for entry in reader.entries():
        with pytest.raises(RecordError) as err:
            reader.load(entry)
        assert err.value.reason == "unreadable" and entry.path in str(err.value)


def test_cinc_shipped_snomed_table():
    names = load_snomed_ct_names()
    assert len(names) == 133
    assert names["164889003"] == "atrial fibrillation" and names["426783006"] == "sinus rhythm"


# ---------------------------------------------------------------------------------- MIMIC-IV-ECG

def write_mimic_fixture(root):
    """Three studies of two subjects in the MIMIC-IV-ECG release layout; one without measurements."""
    studies = [("10000032", "40689238", "2180-07-23 08:44:00"),
               ("10000032", "44458630", "2180-07-23 09:54:00"),
               ("10000117", "45090959", "2181-03-04 17:14:00")]
    record_list = ["subject_id,study_id,file_name,ecg_time,path"]
    measurements = [",".join(["subject_id", "study_id", "cart_id", "ecg_time", *REPORT_COLUMNS, "bandwidth",
                              "filtering", "rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end",
                              "p_axis", "qrs_axis", "t_axis"])]
    reports = {"40689238": ["Sinus rhythm", "Possible Left atrial enlargement.", "Borderline ECG"],
               "44458630": ["Sinus  rhythm", "Normal ECG"]}
    for i, (subject, study, time) in enumerate(studies):
        rel = f"files/p{subject[:4]}/p{subject}/s{study}/{study}"
        record_list.append(f"{subject},{study},{study},{time},{rel}")
        write_wfdb(root / os.path.dirname(rel), study, ecg_like(seed=i), leads=MIMIC_LEADS)
        if study in reports:
            statements = reports[study] + [""] * (18 - len(reports[study]))
            measurements.append(",".join([subject, study, "6848296", time, *statements,
                                          "0.005-150 Hz", "60 Hz notch Baseline filter", "659", "40", "128",
                                          "170", "258", "518", "81", "77", "79"]))
    (root / "record_list.csv").write_text("\n".join(record_list) + "\n")
    (root / "machine_measurements.csv").write_text("\n".join(measurements) + "\n")
    return studies


def test_mimic_iv_ecg_fixture(tmp_path):
    write_mimic_fixture(tmp_path)
    reader = get_reader("mimic-iv-ecg", tmp_path)
    entries = list(reader.entries())
    assert [e.record_id for e in entries] == ["mimic_40689238", "mimic_44458630", "mimic_45090959"]
    assert [e.patient_id for e in entries] == ["10000032", "10000032", "10000117"]
    first, second, third = entries
    assert first.report == "Sinus rhythm. Possible Left atrial enlargement. Borderline ECG"
    assert first.labels == ["sinus rhythm", "possible left atrial enlargement", "borderline ecg"]
    assert second.labels == ["sinus rhythm", "normal ecg"]  # whitespace normalised: same code
    assert third.report == "" and third.labels == []
    assert first.metadata["rr_interval"] == 659 and first.metadata["ecg_time"] == "2180-07-23 08:44:00"
    assert reader.label_names() == {c: c for c in ["borderline ecg", "normal ecg",
                                                   "possible left atrial enlargement", "sinus rhythm"]}
    reader = pickle.loads(pickle.dumps(reader))
    record = reader.load(first)
    assert record.signal.shape == (12, 5000) and record.sampling_rate == 500
    assert record.lead_names == MIMIC_LEADS
    expected = ecg_like(seed=0)
    np.testing.assert_allclose(record.signal, np.round(expected * 200) / 200, atol=1e-6)
    out = preprocess_record(record, 500, 10).astype(np.float32)
    # aVL is row 5 in MIMIC files and row 4 in the standard order.
    np.testing.assert_allclose(out[4], record.signal[5], atol=2e-3)
    np.testing.assert_allclose(out[5], record.signal[4], atol=2e-3)
    assert [e.labels for e in MIMICIVECGReader(tmp_path, labels="none").entries()] == [[], [], []]


def test_mimic_reader_rejects_other_layouts(tmp_path):
    with pytest.raises(ValueError, match="record_list.csv"):
        MIMICIVECGReader(tmp_path)
    write_mimic_fixture(tmp_path)
    with pytest.raises(ValueError, match="labels mode"):
        MIMICIVECGReader(tmp_path, labels="icd")


# ------------------------------------------------------------------------------ corrupt WFDB files

def test_truncated_dat_is_truncated(tmp_path):
    base = write_wfdb(tmp_path, "rec", ecg_like())
    data = Path(base + ".dat").read_bytes()
    for cut in (len(data) // 2 + 1, 12 * 2 * 4000):  # mid-frame, and frame-aligned
        Path(base + ".dat").write_bytes(data[:cut])
        with pytest.raises(RecordError) as err:
            read_wfdb(base, "r1")
        assert err.value.reason == "truncated", cut
        assert "rec.dat" in str(err.value) and "r1" in str(err.value)


def test_header_with_12_leads_but_data_with_11_is_lead_count(tmp_path):
    base = write_wfdb(tmp_path, "rec", ecg_like())
    eleven = np.round(ecg_like(n_leads=11) * 200).astype("<i2").T
    eleven.tofile(base + ".dat")
    with pytest.raises(RecordError) as err:
        read_wfdb(base, "r2")
    assert err.value.reason == "lead_count" and "rec.dat" in str(err.value)
    assert "12 signals" in err.value.detail and "11 x 5000" in err.value.detail


def test_missing_and_unparseable_files_are_unreadable(tmp_path):
    with pytest.raises(RecordError) as err:
        read_wfdb(tmp_path / "nothing", "r3")
    assert err.value.reason == "unreadable" and "nothing.hea" in str(err.value)
    base = write_wfdb(tmp_path, "rec", ecg_like())
    os.remove(base + ".dat")
    with pytest.raises(RecordError) as err:
        read_wfdb(base + ".hea", "r3")  # a path with extension works too
    assert err.value.reason == "unreadable" and "rec" in str(err.value)
    Path(tmp_path, "junk.hea").write_text("junk header with words\n")
    with pytest.raises(RecordError) as err:
        read_wfdb(tmp_path / "junk")
    assert err.value.reason == "unreadable" and "junk.hea" in str(err.value)


def test_units_are_converted_to_millivolts(tmp_path):
    signal = ecg_like()
    base = write_wfdb(tmp_path, "uv", signal)
    header = Path(base + ".hea").read_text().replace("/mV", "/uV")
    Path(base + ".hea").write_text(header)
    loaded, _, _ = read_wfdb(base)
    np.testing.assert_allclose(loaded, np.round(signal * 200) / 200 / 1000, atol=1e-8)
    Path(base + ".hea").write_text(header.replace("/uV", "/mmHg"))
    with pytest.raises(RecordError) as err:
        read_wfdb(base)
    assert err.value.reason == "unreadable" and "mmHg" in err.value.detail


def test_invalid_samples_load_as_nan_then_the_policy_decides(tmp_path):
    signal = ecg_like()
    few = np.zeros(signal.shape, dtype=bool)
    few[3, 1000:1020] = True  # 0.4 % of lead III
    many = few.copy()
    many[7, 100:600] = True  # 10 % of V2
    for name, mask, ok in (("few", few, True), ("many", many, False)):
        base = write_wfdb(tmp_path, name, signal, nan_mask=mask)
        loaded, fs, leads = read_wfdb(base)
        assert np.array_equal(np.isnan(loaded), mask)
        record = ECGRecord(RecordEntry(record_id=name, path=base, patient_id="p"), loaded, fs, leads)
        if ok:
            out = preprocess_record(record, 500, 10)
            assert np.isfinite(out.astype(np.float32)).all()
        else:
            with pytest.raises(RecordError) as err:
                preprocess_record(record, 500, 10)
            assert err.value.reason == "non_finite" and base in str(err.value) and "V2" in err.value.detail


def test_flat_record_loads_and_is_rejected_as_flat(tmp_path):
    base = write_wfdb(tmp_path, "flat", np.zeros((12, 5000), dtype=np.float32) + 0.1)
    signal, fs, leads = read_wfdb(base)
    with pytest.raises(RecordError) as err:
        preprocess_record(ECGRecord(RecordEntry("flat1", base, "p"), signal, fs, leads), 500, 10)
    assert err.value.reason == "flat" and base in str(err.value)

