"""``classify`` throughput on a folder of WFDB records, against ``embed`` on shards of the same records,
measured in the same run.

Setup (not timed): synthetic 12-lead WFDB records (10 s) and shards of them at 100 Hz, a randomly
initialised ``ECG-RN18-CLIPText`` carrying a 100 Hz / 10 s preprocessing record, and its classifier
for the 13 synthetic findings (built once, as classify builds it once per run).
Timed, on the same records and batch size:

* ``classify``: :func:`open_clip_ecg.classify.list_sources` on the folder plus
  :func:`open_clip_ecg.classify.classify_records` (read each WFDB file, the model's preprocessing:
  lead matching, resampling, normalisation, centre crop; batched ECG tower; per-finding
  probabilities), no plots, reading in this process (``--workers 0``);
* ``embed``: :func:`open_clip_ecg.embed.embed_shards` on the shards (what ``embed`` and
  ``evaluate`` run: read and decode the tar shards, centre crop, normalise, the same tower).

Ratio ``classify_vs_embed``: classify records/s over embed records/s (1.0: reading WFDB files and
preprocessing raw signals cost what reading prepared shards costs). Also reported: the same with
``--plot`` on a few records (PNG per record). On CPU everything runs on one thread and rates use
process CPU time; on CUDA, wall clock with synchronisation.

    python scripts/benchmarks/bench_classify.py [--quick] [--device cuda]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when loaded by path
from bench_zeroshot import MODEL, _Clock, run_from_command_line  # noqa: E402  (the same clock and model as the zero-shot benchmark)


def run(quick: bool = False, device: str = "cpu") -> dict:
    import open_clip

    import open_clip_ecg
    from open_clip_ecg.classify import RecordPreparer, choose_findings, classify_records, list_sources
    from open_clip_ecg.data.pipeline import expand_shards
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.data.synthetic import FINDINGS, write_synthetic_dataset
    from open_clip_ecg.ecg_plot import plot_12lead
    from open_clip_ecg.embed import embed_shards

    clock = _Clock(device)
    if not clock.cuda:
        torch.set_num_threads(1)
    n_records, batch_size, n_plots = (32, 16, 2) if quick else (256, 64, 8)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, device=device).eval()
    model.ecg_preprocess = {"model": MODEL, "sampling_rate": 100.0, "seconds": 8.0, "eval_seconds": 10.0,
                            "leads": list(open_clip_ecg.STANDARD_LEADS), "normalize": "center", "text": "report",
                            "vocabulary": [{"id": i, "code": c, "name": n} for i, (c, n) in enumerate(FINDINGS.items())]}
    findings = choose_findings(model, open_clip.get_tokenizer(MODEL), model.ecg_preprocess, None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = write_synthetic_dataset(root / "records", n=n_records, seed=0, progress=False)
        write_shards(get_reader("csv", index), root / "shards",
                     ShardOptions(sampling_rate=100, seconds=10, split_by="random", val_fraction=0.0,
                                  test_fraction=0.999, shard_size=64, text="labels", progress=False))
        shards = expand_shards(str(root / "shards"), split="test")
        prepare = RecordPreparer(model.ecg_preprocess)
        folder = root / "records"

        embed_shards(model, shards[:1], batch_size=batch_size)  # warm-up: allocator, oneDNN kernels
        start = clock()
        embedded = embed_shards(model, shards, batch_size=batch_size)
        embed_s = clock() - start

        start = clock()
        sources = list_sources([str(folder)])
        probabilities, kept = classify_records(model, findings, sources, prepare, batch_size=batch_size)
        classify_s = clock() - start

        plotted = []
        start = clock()
        classify_records(model, findings, sources[:n_plots], prepare, batch_size=batch_size,
                         on_record=lambda source, p, signal, rate, names: plotted.append(
                             plot_12lead(signal, rate, names, root / f"{len(plotted)}.png", title=source.record_id)))
        plot_s = clock() - start

    n_embed, n_classify = len(embedded.records.keys), len(kept)
    embed_rate, classify_rate = n_embed / embed_s, n_classify / classify_s
    timing = "wall clock (CUDA synchronised)" if clock.cuda else "process CPU time, 1 thread"
    return {
        "name": "classify",
        "figures": {
            "model": MODEL, "device": device, "timing": timing, "batch_size": batch_size,
            "records_classified": n_classify, "records_embedded": n_embed, "findings": len(findings.codes),
            "classify_records_per_s": classify_rate, "embed_records_per_s": embed_rate,
            "classify_with_plot_records_per_s": len(plotted) / plot_s,
        },
        "ratios": {"classify_vs_embed": classify_rate / embed_rate,
                   "classify_with_plot_vs_embed": len(plotted) / plot_s / embed_rate},
    }


def main() -> None:
    run_from_command_line(run, __doc__)


if __name__ == "__main__":
    main()
