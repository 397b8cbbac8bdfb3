"""Zero-shot on real PTB-XL: choose everything on fold 7, report fold 8 once, targets with seeds.

    python scripts/ptbxl_zeroshot_study.py --ptbxl ../shared/data/ptbxl-2k --out study

Protocol (every figure in the README's PTB-XL section comes from this script):

1. Shards: PTB-XL at 100 Hz, all 71 statements as labels (``--label-level all``), text = finding
   sentence + report (``--text both``); train on folds 1-6, validation fold 7, test fold 8.
2. **Selection** (one seed, fold 7 only): training settings (``SELECTION``: text mode, finding texts, logit
   bias/scale learning, text tower) x training length (the checkpoints at ``--select-epochs`` of
   one ``--epochs`` run) x zero-shot scoring rules (prompt names, aggregation, scoring;
   :mod:`open_clip_ecg.scoring`). The winning setting maximises the mean fold-7 macro AUROC over
   the super, sub, rhythm and form tasks; each task then takes its own best epoch and scoring rule
   on fold 7 (``--choose per-task``; the supervised baseline, too, is one model per task).
3. **Targets with seeds**: ``jaccard``, ``identity`` and ``exact`` with the winning settings
   (and the winning epoch's checkpoint), ``--seeds`` seeds each; every run is scored on fold 8 with per-label max-F1 thresholds from
   fold 7. Reported: mean +/- sd of macro AUROC per task, micro-F1 and sample-averaged Jaccard
   (the paper's metrics), and the paired differences jaccard - identity and jaccard - exact
   (seed-averaged macro AUROC) with a bootstrap interval over fold-8 records.
4. **Supervised baseline**: BCE on the same tower and folds (epoch chosen on fold 7), superclass
   and rhythm tasks, ``--seeds`` seeds, scored on fold 8 the same way; the paired difference
   zero-shot (winning targets) - supervised with a bootstrap interval.
5. **One supervised model for every statement** (``--stages generalist``): BCE on all 71
   statements (``ptbxl-all``, epoch chosen on fold 7), each task answered from its member
   statements by the aggregation rule best on fold 7 -- one model serving every task, as the
   zero-shot model does, where step 4 trains a specialist per task.
6. **Learning curve** (fold 7 only): the winner (jaccard, first seed) and the supervised baseline
   (last epoch) trained on the first ``--curve-shards`` training shards and on all of them: does
   the gap between zero-shot and supervision close with more records?

7. **Ablations** (``--stages ablations``, not in the default stages): the paper's design claims
   against the current recipe (:data:`REFERENCE`), one change at a time, each variant with its own
   fold-7 choices and every seed on fold 8: embedding dimension (128/256/512, with parameter count
   and step time), random crops (none/5 s/2.5 s, also scored on other institutions' Challenge
   records with ``--cinc``), and the loss targets at two batch sizes under two recipes (with the
   expected same-finding-set pairs per batch; the large batch's learning rate chosen on fold 7;
   each target is also scored with its own fold-7 choices, so jaccard's choices cannot favour it).
   Writes ``OUT/ablations.md``/``.json``.

Every step is resumable: finished trainings, embeddings and scores are reused on a re-run.
``--quick`` runs the whole flow on a tiny budget (for tests). Writes ``OUT/study.md``/``.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import open_clip

from open_clip_ecg import metrics as M
from open_clip_ecg.atomic import write_atomic, write_json_atomic, write_text_atomic
from open_clip_ecg.baselines import (answer_from_statements, evaluate_supervised, load_supervised, predict_supervised,
                                    score_supervised, train_supervised)
from open_clip_ecg.data.manifest import count_samples, read_shard_info
from open_clip_ecg.data.pipeline import iterate_samples
from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
from open_clip_ecg.embed import embed_shards, resolve_shards
from open_clip_ecg.factory import load_model
from open_clip_ecg.evaluate import choose_on_validation
from open_clip_ecg.scoring import (AGGREGATIONS, ALL_SCORING_RULES, ScoringRules, TaskScorer, choose_thresholds,
                                   summarize)
from open_clip_ecg.tasks import get_task
from open_clip_ecg.train import main as train_main

TASKS = ("ptbxl-super", "ptbxl-sub", "ptbxl-rhythm", "ptbxl-form")
TARGETS = ("jaccard", "identity", "exact")
# the loss ablation's fold-8 scores of a run under its own target's fold-7 choices: OUT/scores/RUN-own-choices.*
OWN_CHOICES = "-own-choices"
# the loss ablation's learning rate at --large-batch: --lr times the rule's factor of the batch ratio
LR_SCALING = {"sqrt": math.sqrt, "none": lambda ratio: 1.0, "linear": lambda ratio: ratio}
# ... and its finding-text weight: the pair term sums each ECG's B report pairs, the finding-text
# term its finding texts, so "scaled" (x the batch ratio) keeps the small batch's balance
WEIGHT_SCALING = {"kept": lambda ratio: 1, "scaled": lambda ratio: ratio}
SUPERVISED_TASKS = ("ptbxl-super", "ptbxl-rhythm")
DEFAULT_TOWER = "ecg_resnet1d18"
GENERALIST_TASK = "ptbxl-all"  # the one supervised model for every statement (stage "generalist")
AF = "AFIB"

# Training settings compared on fold 7: what issue #9 found (stored text, bias -4) and each fix.
# The ablations' keys (embed_dim, crop_seconds, batch_size, lr, warmup) default to None: the model
# config's embedding dimension and the study's --crop-seconds, --batch-size, --lr and --warmup.
BASE = {"model": "ECG-RN18-CLIPText", "text": "stored", "bias": "-4", "scale": 10, "logit_lr_mult": 1,
        "lock_text": False, "finding_texts": "off", "finding_groups": [], "finding_weight": 1,
        "finding_prior": False, "embed_dim": None, "crop_seconds": None, "batch_size": None, "lr": None,
        "warmup": None}
SELECTION = {
    "stored-text": {},
    "sampled-text": {"text": "sampled"},
    "sampled-text+logit-lr": {"text": "sampled", "bias": "auto", "logit_lr_mult": 10},
    # The text-tower comparison (issue #9, item 4): the fold-7 winner's recipe with the pretrained
    # MiniLM instead of the built-in transformer from scratch, trained and locked.
    "minilm+sampled-text": {"model": "ECG-RN18-MiniLM", "text": "sampled"},
    "minilm-locked+sampled-text": {"model": "ECG-RN18-MiniLM", "text": "sampled", "lock_text": True},
    # Every ECG also meets one text per finding in every step (--ecg-finding-texts), Jaccard or
    # membership targets: the lever tried against the superclass gap to supervision.
    "sampled-text+finding-texts": {"text": "sampled", "finding_texts": "jaccard"},
    "sampled-text+finding-texts-contains": {"text": "sampled", "finding_texts": "contains"},
    # ... plus one text per superclass and per multi-statement subclass ("conduction disturbance",
    # present when any member statement is): coarse questions trained in their own words.
    "sampled-text+finding-texts-contains+groups": {"text": "sampled", "finding_texts": "contains",
                                                   "finding_groups": ["ptbxl-super", "ptbxl-sub"]},
    # ... with SigLIP's scale started at 30 instead of 10: at 10 an ECG cannot sit close to every
    # finding text it shows at once (the scale barely moves on 18 steps an epoch).
    "sampled-text+finding-texts-contains+groups+scale30": {"text": "sampled", "finding_texts": "contains",
                                                           "finding_groups": ["ptbxl-super", "ptbxl-sub"],
                                                           "scale": 30},
    # ... with the finding-text term weighted 4x against the report pairs: rate findings (sinus
    # tachycardia, bradycardia) barely change a pair's Jaccard target, only their own finding text names them.
    "sampled-text+finding-texts-contains+groups+weight4": {"text": "sampled", "finding_texts": "contains",
                                                           "finding_groups": ["ptbxl-super", "ptbxl-sub"],
                                                           "finding_weight": 4},
    # ... weighted 16x: does the report-pair term cost rhythm (supervision from the same records
    # ranks rhythm 0.05 higher)? At 16 the finding texts dominate the loss.
    "sampled-text+finding-texts-contains+groups+weight16": {"text": "sampled", "finding_texts": "contains",
                                                            "finding_groups": ["ptbxl-super", "ptbxl-sub"],
                                                            "finding_weight": 16},
    # ... weighted 4x, plus each finding text's log-odds added to its training logits (logit
    # adjustment): a rare finding's text (sinus arrhythmia, 3 %) no longer has to point away from
    # normal ECGs to be rare, which made its prompt score every abnormal ECG high.
    "sampled-text+finding-texts-contains+groups+weight4+prior": {
        "text": "sampled", "finding_texts": "contains", "finding_groups": ["ptbxl-super", "ptbxl-sub"],
        "finding_weight": 4, "finding_prior": True},
    # ... with the RR channels (ECG-RN18-RR-CLIPText: beat-to-beat timing as two extra input
    # channels): sinus arrhythmia ranked 0.49-0.64 by every raw-signal tower, 0.84 by its RR spread alone.
    "sampled-text+finding-texts-contains+groups+weight4+prior+rr": {
        "model": "ECG-RN18-RR-CLIPText", "text": "sampled", "finding_texts": "contains",
        "finding_groups": ["ptbxl-super", "ptbxl-sub"], "finding_weight": 4, "finding_prior": True},
}

# The current PTB-XL recipe (fold 7's winner above): the reference each ablation changes one thing of.
REFERENCE = "sampled-text+finding-texts-contains+groups+weight4+prior+rr"
# The paper's design claims (issue 25), as changes to the reference: {ablation: {label: (suffix, change)}};
# a variant's setting is named "<reference>+<suffix>". The reference row itself is the unchanged recipe.
ABLATIONS = {
    "embed-dim": {"128": ("dim128", {"embed_dim": 128}), "512": ("dim512", {"embed_dim": 512})},
    "crop": {"none (the whole 10 s record)": ("crop10", {"crop_seconds": 10.0}),
             "2.5 s random crops": ("crop2.5", {"crop_seconds": 2.5})},
}
CINC_TASK = "ptbxl-cinc-shared"  # the crop ablation's other institution: findings both label systems name


def run_name(setting: str, targets: str, seed: int) -> str:
    """A zero-shot training run's name: its logs folder and its cached fold-8 scores."""
    return f"{setting}-{targets}-seed{seed}"


def setting_of(row: Dict) -> Dict:
    """The training setting of a selection row (rows cached before a BASE key existed take its default)."""
    return {key: row.get(key, default) for key, default in BASE.items()}


def _write_npz(path: str, arrays: Dict) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_atomic(path, write)


class Study:
    def __init__(self, args):
        self.args = args
        self.shards = os.path.join(args.out, "shards")
        self.cache = os.path.join(args.out, "scores")
        os.makedirs(self.cache, exist_ok=True)

    # ---------------------------------------------------------------- data and training
    def write_shards(self) -> None:
        reader = get_reader("ptbxl", self.args.ptbxl, sampling_rate=100, label_level="all")
        write_shards(reader, self.shards, ShardOptions(
            sampling_rate=100, seconds=10, split_by="fold", val_folds=(7,), test_folds=(8,), text="both",
            shard_size=self.args.shard_size, workers=2))

    def train_shards(self, n_shards: Optional[int] = None) -> List[str]:
        """The training shards, or the first `n_shards` of them (the learning curve's subsets;
        default ``--train-shards``)."""
        shards = resolve_shards(self.shards, "train")
        n_shards = self.args.train_shards if n_shards is None else n_shards
        return shards if n_shards is None else shards[:n_shards]

    def checkpoint(self, name: str, epoch: int) -> str:
        return os.path.join(self.args.out, "logs", name, "checkpoints", f"epoch_{epoch}.pt")

    def train(self, name: str, setting: Dict, targets: str, seed: int, n_shards: Optional[int] = None,
              epoch: Optional[int] = None) -> str:
        """Train `name` for ``--epochs`` (once) and return its checkpoint after `epoch` (default: the last).

        Checkpoints are kept at every ``--select-epochs`` epoch, so the selection compares training
        lengths under one learning-rate schedule, and the seeds use the winner's epoch of that schedule.
        """
        a = self.args
        checkpoint = self.checkpoint(name, epoch or a.epochs)
        if os.path.exists(checkpoint) and os.path.exists(self.checkpoint(name, a.epochs)):
            return checkpoint
        flags = ["--model", self.model_name(setting), "--train-data", "::".join(self.train_shards(n_shards)),
                 "--batch-size", str(self.value(setting, "batch_size")), "--epochs", str(a.epochs),
                 "--lr", str(self.value(setting, "lr")), "--warmup", str(self.value(setting, "warmup")),
                 "--wd", "0.05", "--workers", str(a.workers), "--seed", str(seed),
                 "--logs", os.path.join(a.out, "logs"), "--name", name, "--resume", "latest",
                 "--precision", "fp32", "--log-every-n-steps", "10",
                 "--save-frequency", str(math.gcd(a.epochs, *a.select_epochs)),
                 "--ecg-targets", targets, "--ecg-seconds", str(self.value(setting, "crop_seconds")),
                 "--ecg-text", setting["text"], "--ecg-init-logit-bias", str(setting["bias"]),
                 "--ecg-init-logit-scale", str(setting["scale"]),
                 "--ecg-logit-lr-mult", str(setting["logit_lr_mult"]),
                 "--ecg-finding-texts", setting["finding_texts"]]
        if setting["lock_text"]:
            flags.append("--lock-text")
        if setting["finding_groups"]:
            flags += ["--ecg-finding-groups", *setting["finding_groups"]]
        if setting["finding_weight"] != 1:
            flags += ["--ecg-finding-weight", str(setting["finding_weight"])]
        if setting["finding_prior"]:
            flags.append("--ecg-finding-prior")
        if train_main(flags) != 0:
            raise RuntimeError(f"training {name} failed; see {os.path.join(a.out, 'logs', name, 'out.log')}")
        return checkpoint

    def value(self, setting: Dict, key: str):
        """A training value of `setting`: its own, else the study's option of that name (the
        embedding dimension: the model config's)."""
        if setting.get(key) is not None:
            return setting[key]
        return open_clip.get_model_config(setting["model"])[key] if key == "embed_dim" else getattr(self.args, key)

    def model_name(self, setting: Dict) -> str:
        """The setting's open_clip model: its config, or a copy with another ``embed_dim`` (both
        projections), written to OUT/model_configs and registered with open_clip in this process."""
        if setting.get("embed_dim") is None:
            return setting["model"]
        name = f"{setting['model']}-D{setting['embed_dim']}"
        if open_clip.get_model_config(name) is None:
            config = {**open_clip.get_model_config(setting["model"]), "embed_dim": int(setting["embed_dim"])}
            path = os.path.join(self.args.out, "model_configs", f"{name}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json_atomic(path, config, indent=4)
            open_clip.add_model_config(path)
        return name

    # ---------------------------------------------------------------- scoring
    def embeddings(self, model_name: str, checkpoint: str):
        """ECG embeddings of folds 7 and 8 (computed once per checkpoint) and the loaded model."""
        model, tokenizer = load_model(model_name, checkpoint)
        embedded = {split: embed_shards(model, resolve_shards(self.shards, split), batch_size=64)
                    for split in ("val", "test")}
        return model, tokenizer, embedded

    def evaluate(self, model, tokenizer, embedded, task_name: str, rules: ScoringRules, splits=("val", "test")):
        """{split: LabelledScores} of one task under `rules`."""
        task = get_task(task_name)
        vocabulary = read_shard_info(resolve_shards(self.shards, "train"))["vocabulary"]
        scorer = TaskScorer(model, tokenizer, task, rules, vocabulary=vocabulary)
        out = {split: scorer.labelled_scores(embedded[split], f"{self.shards} ({split})") for split in splits}
        return task, out, scorer

    def report(self, task, scores, method: str, about: Optional[Dict] = None) -> Dict:
        """metrics.json content on fold 8 with fold-7 max-F1 thresholds."""
        thresholds, info = choose_thresholds(task.codes, scores["val"])
        return summarize(task, method, scores["test"], thresholds, info, n_bootstrap=self.args.bootstrap,
                         about=about).metrics

    # ---------------------------------------------------------------- the stages
    def select(self) -> Dict:
        """Every setting x training length x scoring rule on fold 7.

        The setting is the one with the best mean macro AUROC over TASKS. Then, with ``--choose
        per-task`` (the default), each task takes the epoch and scoring rule best for it on fold 7,
        as the supervised baseline has its own model and epoch per task; with ``overall`` every task
        takes the setting's best row."""
        rows = [row for name, change in self.args.selection.items()
                for row in self.setting_rows(name, {**BASE, **change})]
        best = max(rows, key=lambda r: r["fold7_mean"])
        return {"rows": rows, "best": best, "choices": self.choose([r for r in rows if r["setting"] == best["setting"]])}

    def setting_rows(self, name: str, setting: Dict, targets: str = "jaccard") -> List[Dict]:
        """Fold-7 rows of one setting (its first seed, `targets`): one per training length x
        scoring rule, with each task's macro AUROC and their mean; computed once, then cached."""
        path = os.path.join(self.cache, f"selection-{name}{'' if targets == 'jaccard' else '-' + targets}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        run = run_name(name, targets, self.args.seeds[0])
        self.train(run, setting, targets, self.args.seeds[0])
        epochs = {self.checkpoint(run, epoch): epoch for epoch in self.args.select_epochs}
        _, candidates = choose_on_validation(self.model_name(setting), list(epochs), self.shards, "val", TASKS,
                                             self.args.rules_grid)
        rows = []
        # candidates come checkpoint by checkpoint, rules by rules, one row per task
        for (checkpoint, *rules), group in itertools.groupby(
                candidates, key=lambda c: (c["checkpoint"], c["names"], c["aggregate"], c["scoring"])):
            aurocs = {c["task"]: c["val_macro_auroc"] for c in group}
            rows.append({"setting": name, **setting, "epoch": epochs[checkpoint],
                         **dict(zip(("names", "aggregate", "scoring"), rules)),
                         "fold7_macro_auroc": aurocs,
                         "fold7_mean": float(np.mean([v for v in aurocs.values() if v is not None]))})
            print(f"fold 7 {name:30s} epoch {epochs[checkpoint]:3d} {' '.join(rules):30s} "
                  f"mean {rows[-1]['fold7_mean']:.3f}", flush=True)
        write_json_atomic(path, rows, indent=2)
        return rows

    def choose(self, rows: List[Dict]) -> Dict:
        """{task: epoch and scoring rule} from one setting's fold-7 rows (``--choose``)."""
        best = max(rows, key=lambda r: r["fold7_mean"])
        chosen = {task_name: best if self.args.choose == "overall" else
                  max(rows, key=lambda r: r["fold7_macro_auroc"][task_name] or 0.0) for task_name in TASKS}
        return {task_name: {"epoch": r.get("epoch", self.args.epochs), "names": r["names"],
                            "aggregate": r["aggregate"], "scoring": r["scoring"],
                            "fold7_macro_auroc": r["fold7_macro_auroc"][task_name]}
                for task_name, r in chosen.items()}

    def task_scores(self, name: str, setting: Dict, targets: str, seed: int, choices: Dict, splits,
                    n_shards: Optional[int] = None):
        """(task, {split: LabelledScores}, scorer) per task of one run, each task scored with its own
        chosen epoch and rules (each checkpoint is embedded once)."""
        loaded = {}
        for task_name in TASKS:
            choice = choices[task_name]
            if choice["epoch"] not in loaded:
                checkpoint = self.train(name, setting, targets, seed, n_shards, choice["epoch"])
                loaded[choice["epoch"]] = self.embeddings(self.model_name(setting), checkpoint)
            model, tokenizer, embedded = loaded[choice["epoch"]]
            rules = ScoringRules(choice["names"], choice["aggregate"], choice["scoring"])
            yield self.evaluate(model, tokenizer, embedded, task_name, rules, splits)

    def seeds(self, best: Dict, choices: Dict, targets_list: Optional[Sequence[str]] = None,
              scores_suffix: str = "") -> Dict:
        """Every target (``--targets`` unless given) x seed with the winner's setting and per-task
        choices, scored on fold 8 once (scores are cached with the choices they were made under, as
        the run's name + `scores_suffix`: one run can be scored under two sets of choices)."""
        setting = setting_of(best)
        runs = {}
        for targets, seed in itertools.product(targets_list or self.args.targets, self.args.seeds):
            name = run_name(best["setting"], targets, seed)
            key = name + scores_suffix
            scored, path = (os.path.join(self.cache, f"{key}{ext}") for ext in (".json", ".npz"))
            if os.path.exists(scored) and os.path.exists(path):
                with open(scored, encoding="utf-8") as f:
                    run = json.load(f)
                if run.get("choices") == choices:
                    runs[key] = run
                    continue
            runs[key] = run = {"targets": targets, "seed": seed, "choices": choices, "tasks": {}}
            arrays = {}
            for task, scores, scorer in self.task_scores(name, setting, targets, seed, choices, ("val", "test")):
                metrics = self.report(task, scores, "zero-shot", {"zeroshot": scorer.describe()})
                run["tasks"][task.name] = _summary(metrics)
                arrays[f"{task.name}/y_true"] = scores["test"].y_true
                arrays[f"{task.name}/y_score"] = scores["test"].y_score
            _write_npz(path, arrays)
            write_json_atomic(scored, run, indent=2)
        return runs

    # ---------------------------------------------------------------- ablations (issue 25)
    def variants(self, ablation: str) -> List[Dict]:
        """The reference and its variants for one ablation: label, setting name and setting, and the
        targets trained (the loss ablation: ``--targets`` at ``--batch-size`` and ``--large-batch``
        under each of ``--loss-recipes``; at the large batch one candidate setting per
        ``--large-batch-lr-scaling`` x ``--large-batch-finding-weight`` rule, warmup kept in
        samples). A variant equal to its reference is left out."""
        a = self.args
        reference = {**BASE, **SELECTION[a.reference]}
        if ablation == "loss":
            rows = []
            for recipe in a.loss_recipes:
                for batch in dict.fromkeys((a.batch_size, a.large_batch)):
                    row = {"label": f"{recipe}, batch {batch}", "name": recipe, "setting": {**BASE, **SELECTION[recipe]},
                           "targets": list(a.targets), "recipe": recipe, "batch": batch}
                    if batch != a.batch_size:
                        ratio, texts = batch / a.batch_size, row["setting"]["finding_texts"] != "off"
                        weights = a.large_batch_finding_weight if texts else ["kept"]  # no finding texts: no weight
                        row["lr_candidates"] = [
                            {"scaling": lr_rule + ("" if weight == "kept" else f", weight {weight}"),
                             "name": f"{recipe}+batch{batch}" + ("" if lr_rule == "sqrt" else f"+lr-{lr_rule}")
                                     + ("" if weight == "kept" else f"+weight-{weight}"),
                             "setting": {**row["setting"], "batch_size": batch,
                                         "lr": a.lr * LR_SCALING[lr_rule](ratio),
                                         "finding_weight": row["setting"]["finding_weight"] * WEIGHT_SCALING[weight](ratio),
                                         "warmup": max(1, round(a.warmup * a.batch_size / batch))}}
                            for weight in weights for lr_rule in a.large_batch_lr_scaling]
                        row.update(name=row["lr_candidates"][0]["name"], setting=row["lr_candidates"][0]["setting"])
                    rows.append(row)
            return rows
        described = {"embed-dim": f"{self.value(reference, 'embed_dim')}",
                     "crop": f"{self.value(reference, 'crop_seconds'):g} s random crops"}[ablation]
        rows = [{"label": f"{described} (reference)", "name": a.reference, "setting": reference, "targets": ["jaccard"]}]
        for label, (suffix, change) in ABLATIONS[ablation].items():
            setting = {**reference, **change}
            if any(self.value(setting, key) != self.value(reference, key) for key in change):
                rows.append({"label": label, "name": f"{a.reference}+{suffix}", "setting": setting,
                             "targets": ["jaccard"]})
        return rows

    def ablations(self) -> Dict:
        """Each ``--ablations`` variant under the study's protocol: its own fold-7 choice of epoch
        and scoring rule (first seed), then every seed scored on fold 8 once."""
        out, only = {}, self.args.ablation_variants
        for ablation in self.args.ablations:
            out[ablation] = []
            for variant in self.variants(ablation):
                if only and not {variant["name"], variant["name"].replace(f"{self.args.reference}+", "", 1)} & set(only):
                    continue
                variant = self.choose_large_batch_candidate(variant)
                best = {"setting": variant["name"], **variant["setting"]}
                choices = self.choose(self.setting_rows(variant["name"], variant["setting"]))
                out[ablation].append({**variant, "choices": choices, "runs": self.seeds(best, choices, variant["targets"])})
                if ablation == "loss":  # jaccard's first seed chose the epochs and rules; now each target its own
                    out[ablation][-1]["own_choices"] = {
                        t: self.seeds(best, self.choose(self.setting_rows(variant["name"], variant["setting"], t)),
                                      [t], scores_suffix=OWN_CHOICES) for t in variant["targets"] if t != "jaccard"}
                if ablation == "crop" and self.args.cinc:
                    out[ablation][-1]["cinc"] = self.cinc_scores(variant["name"], variant["setting"])
        return out

    def choose_large_batch_candidate(self, variant: Dict) -> Dict:
        """A loss variant at the large batch becomes its learning-rate (and finding-weight) candidate
        with the best fold-7 mean macro AUROC (jaccard, first seed, best epoch and rule); each
        candidate trains once."""
        candidates = variant.get("lr_candidates")
        if not candidates:
            return variant
        fold7 = {c["scaling"]: max(r["fold7_mean"] for r in self.setting_rows(c["name"], c["setting"]))
                 for c in candidates}
        chosen = max(candidates, key=lambda c: fold7[c["scaling"]])
        print(f"fold 7 {variant['label']}: learning rate by {fold7} -> {chosen['scaling']} "
              f"({chosen['setting']['lr']:g})", flush=True)
        return {**variant, "name": chosen["name"], "setting": chosen["setting"], "lr_fold7_mean": fold7,
                "lr_scaling": chosen["scaling"]}

    def cinc_shards(self) -> str:
        """The Challenge records of ``--cinc`` from other institutions as 100 Hz, 10 s shards (the
        PTB-XL-derived ``HR*`` records are left out: same institution, one of them in fold 7)."""
        folder = os.path.join(self.args.out, "cinc-shards")
        if not os.path.exists(os.path.join(folder, "manifest.json")):
            records = os.path.join(self.args.out, "cinc-records")
            os.makedirs(records, exist_ok=True)
            for entry in sorted(os.listdir(self.args.cinc)):
                if entry.endswith((".hea", ".mat")) and not entry.startswith("HR"):
                    link = os.path.join(records, entry)
                    if not os.path.lexists(link):
                        os.symlink(os.path.abspath(os.path.join(self.args.cinc, entry)), link)
            write_shards(get_reader("cinc", records), folder, ShardOptions(
                sampling_rate=100, seconds=10, split_by="random", val_fraction=0.0, test_fraction=0.0,
                text="labels", shard_size=self.args.shard_size))
        return folder

    def cinc_scores(self, name: str, setting: Dict) -> Dict:
        """Macro AUROC on the other institutions' records (:data:`CINC_TASK`) per seed, the epoch and
        scoring rule chosen for that task on fold 7 (first seed); scores kept for paired differences."""
        path = os.path.join(self.cache, f"cinc-{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        a, model_name = self.args, self.model_name(setting)
        first = run_name(name, "jaccard", a.seeds[0])
        epochs = {self.checkpoint(first, epoch): epoch for epoch in a.select_epochs}
        chosen, _ = choose_on_validation(model_name, list(epochs), self.shards, "val", [CINC_TASK], a.rules_grid)
        choice = chosen[CINC_TASK]
        epoch, shards = epochs[choice.checkpoint], resolve_shards(self.cinc_shards(), "train")
        result = {"epoch": epoch, "rules": dataclasses.asdict(choice.rules), "fold7_macro_auroc": choice.val_macro_auroc,
                  "macro_auroc": {}}
        for seed in a.seeds:
            model, tokenizer = load_model(model_name, self.train(run_name(name, "jaccard", seed), setting,
                                                                 "jaccard", seed, epoch=epoch))
            scorer = TaskScorer(model, tokenizer, get_task(CINC_TASK), choice.rules,
                                vocabulary=read_shard_info(shards)["vocabulary"])
            scores = scorer.labelled_scores(embed_shards(model, shards, batch_size=64), f"{shards[0]} (cinc)")
            result["macro_auroc"][str(seed)] = M.macro_auroc(scores.y_true, scores.y_score)
            _write_npz(os.path.join(self.cache, f"cinc-{run_name(name, 'jaccard', seed)}.npz"),
                       {f"{CINC_TASK}/y_true": scores.y_true, f"{CINC_TASK}/y_score": scores.y_score})
            result["n_records"], result["n_positive"] = len(scores.y_true), dict(
                zip(get_task(CINC_TASK).codes, map(int, scores.y_true.sum(0))))
        write_json_atomic(path, result, indent=2)
        return result

    def supervised_model(self, task_name: str, seed: int, arch: str):
        """(model, about, fold-7 scores or None) of the supervised baseline for `task_name` on tower
        `arch`, trained once (best epoch on fold 7) and reused from its checkpoint afterwards."""
        checkpoint = os.path.join(self.args.out, "supervised", f"{baseline_name(task_name, arch, seed)}.pt")
        if os.path.exists(checkpoint):
            return (*load_supervised(checkpoint), None)
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        return train_supervised(task_name, self.shards, train_split="train", val_data=self.shards, val_split="val",
                                epochs=self.args.supervised_epochs, lr=self.args.lr, batch_size=self.args.batch_size,
                                seconds=self.args.crop_seconds, workers=self.args.workers, seed=seed,
                                arch=arch, checkpoint_path=checkpoint)

    def supervised(self, arch: str) -> Dict:
        """The supervised BCE baseline per task and seed (best epoch on fold 7), scored on fold 8:
        {seed: {task: summary}}; its fold-8 scores are kept for the paired differences."""
        out = {}
        for seed in self.args.seeds:
            out[seed], arrays = {}, {}
            for task_name in SUPERVISED_TASKS:
                model, about, validation = self.supervised_model(task_name, seed, arch)
                if validation is None:  # thresholds always come from fold 7
                    validation = score_supervised(model, get_task(task_name), resolve_shards(self.shards, "val"),
                                                  f"{self.shards} (val)", about, self.args.batch_size, 0)
                result = evaluate_supervised(model, about, self.shards, split="test", validation=validation,
                                             n_bootstrap=self.args.bootstrap)
                out[seed][task_name] = _summary(result.metrics)
                arrays[f"{task_name}/y_true"] = result.scores.y_true
                arrays[f"{task_name}/y_score"] = result.scores.y_score
            _write_npz(os.path.join(self.cache, f"{baseline_name('supervised', arch, seed)}.npz"), arrays)
        return out

    def generalist(self, arch: str) -> Dict:
        """One supervised model for every statement per seed, each task answered from its member
        statements with the aggregation rule best on fold 7, scored on fold 8: {seed: {task: summary}},
        every task of TASKS (the subclass and form statements too: no specialist is trained for them)."""
        out = {}
        for seed in self.args.seeds:
            model, about, _ = self.supervised_model(GENERALIST_TASK, seed, arch)
            predicted = {split: predict_supervised(model, resolve_shards(self.shards, split), about,
                                                   self.args.batch_size, 0) for split in ("val", "test")}
            out[seed], arrays = {}, {}
            for task_name in TASKS:
                task = get_task(task_name)

                def answer(split, rule):
                    return answer_from_statements(task, about["codes"], *predicted[split],
                                                  f"{self.shards} ({split})", rule)
                validation = {rule: answer("val", rule) for rule in AGGREGATIONS[1:]}
                rule = max(validation, key=lambda r: M.macro_auroc(validation[r].y_true, validation[r].y_score) or 0.0)
                test = answer("test", rule)
                thresholds, info = choose_thresholds(task.codes, validation[rule])
                metrics = summarize(task, f"supervised, one model for {GENERALIST_TASK}", test, thresholds, info,
                                    n_bootstrap=self.args.bootstrap, about={"aggregate": rule}).metrics
                out[seed][task_name] = {**_summary(metrics), "aggregate": rule}
                arrays[f"{task_name}/y_true"], arrays[f"{task_name}/y_score"] = test.y_true, test.y_score
            _write_npz(os.path.join(self.cache, f"{baseline_name('generalist', arch, seed)}.npz"), arrays)
        return out

    def learning_curve(self, best: Dict, choices: Dict, train: bool = True) -> List[Dict]:
        """Fold-7 macro AUROC against training-set size: zero-shot (the winner, jaccard, first seed)
        and supervised BCE (last epoch, nothing chosen on fold 7), on the first k training shards.

        Evidence for whether the zero-shot-vs-supervised gap closes with data; fold 8 is not used.
        With ``train=False`` (a report without the curve stage) only the points already measured.
        """
        a = self.args
        setting = setting_of(best)
        n_all = len(self.train_shards())
        rows = []
        for n_shards in sorted(set(a.curve_shards) | {n_all}):
            n_shards = min(n_shards, n_all)
            path = os.path.join(self.cache, f"curve-{best['setting']}-{n_shards}.json")  # one per recipe
            if os.path.exists(path):  # measured before, with these choices?
                with open(path, encoding="utf-8") as f:
                    row = json.load(f)
                if row.get("choices") == choices and ("per_label" in row or not train):
                    rows.append(row)
                    continue
            if not train:
                continue
            shards = self.train_shards(n_shards)
            n_records = count_samples(shards)
            suffix = "" if n_shards == n_all else f"-{n_shards}shards"
            name = run_name(best["setting"], "jaccard", a.seeds[0]) + suffix
            row = {"n_shards": n_shards, "n_records": n_records, "choices": choices, "zero-shot": {},
                   "supervised": {}, "per_label": {"zero-shot": {}, "supervised": {}}}
            for task, scores, _ in self.task_scores(name, setting, "jaccard", a.seeds[0], choices, ("val",),
                                                    None if n_shards == n_all else n_shards):
                row["zero-shot"][task.name] = M.macro_auroc(scores["val"].y_true, scores["val"].y_score)
                row["per_label"]["zero-shot"][task.name] = label_aurocs(task, scores["val"])
            for task_name in SUPERVISED_TASKS:
                checkpoint = os.path.join(a.out, "supervised", f"curve-{task_name}-{n_shards}shards.pt")
                if os.path.exists(checkpoint):
                    supervised, about = load_supervised(checkpoint)
                else:
                    os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
                    supervised, about, _ = train_supervised(
                        task_name, shards, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                        seconds=a.crop_seconds, workers=a.workers, seed=a.seeds[0], checkpoint_path=checkpoint)
                task = get_task(task_name)
                val = score_supervised(supervised, task, resolve_shards(self.shards, "val"),
                                       f"{self.shards} (val)", about, a.batch_size, 0)
                row["supervised"][task_name] = M.macro_auroc(val.y_true, val.y_score)
                row["per_label"]["supervised"][task_name] = label_aurocs(task, val)
            print(f"curve {n_shards} shards ({n_records} records): {row}", flush=True)
            write_json_atomic(path, row, indent=2)
            rows.append(row)
        return rows


def _summary(metrics: Dict) -> Dict:
    intervals = (metrics.get("confidence_intervals") or {}).get("intervals", {})
    return {"headline": metrics["headline"], "intervals": intervals,
            "per_label": {r["code"]: {"auroc": r["auroc"], "n_positive": r["n_positive"]}
                          for r in metrics["per_label"]}}


def label_aurocs(task, scores) -> Dict:
    """{code: {"auroc", "n_positive"}} of one task's scores (the learning curve's per-label rows)."""
    rows = M.per_label_metrics(scores.y_true, scores.y_score, np.full(len(task.codes), 0.5), task.codes)
    return {r["code"]: {"auroc": r["auroc"], "n_positive": r["n_positive"]} for r in rows}


def run_scores(out: str, runs: Dict, targets: str) -> List[str]:
    """The fold-8 score files of the zero-shot runs with `targets` (one per seed)."""
    return [os.path.join(out, "scores", f"{name}.npz") for name, run in runs.items() if run["targets"] == targets]


def supervised_scores(out: str, seeds, arch: str, kind: str = "supervised") -> List[str]:
    """The fold-8 score files of the supervised specialists (`kind` "supervised") or of the one
    model for every statement ("generalist") on tower `arch`, one per seed."""
    return [os.path.join(out, "scores", f"{baseline_name(kind, arch, seed)}.npz") for seed in seeds]


def tower_of(model_name: str) -> str:
    """The timm ECG tower of an open_clip model config: the supervised baseline trains the same one."""
    return open_clip.get_model_config(model_name)["vision_cfg"]["timm_model_name"]


def baseline_name(kind: str, arch: str, seed: int) -> str:
    """File stem of a supervised baseline's checkpoint or scores; the tower is named unless it is
    the 1D-ResNet-18 on the 12 leads (the names cached before other towers were compared)."""
    return f"{kind}-seed{seed}" if arch == DEFAULT_TOWER else f"{kind}-{arch}-seed{seed}"


def paired_difference(files_a: List[str], files_b: List[str], task_name: str, n_bootstrap: int) -> Dict:
    """Seed-averaged macro AUROC of the runs in `files_a` minus those in `files_b` on fold 8, with a
    paired bootstrap over the fold-8 records (the same resamples for both sides)."""
    def scores(files):
        loaded = [np.load(f) for f in files]
        for d in loaded[1:]:
            if not np.array_equal(d[f"{task_name}/y_true"], loaded[0][f"{task_name}/y_true"]):
                raise ValueError(f"{files}: the runs did not score the same fold-8 records in the same order")
        return loaded[0][f"{task_name}/y_true"], [d[f"{task_name}/y_score"] for d in loaded]

    y_true, scores_a = scores(files_a)
    y_true_b, scores_b = scores(files_b)
    if not np.array_equal(y_true, y_true_b):
        raise ValueError(f"{files_a[0]} and {files_b[0]} did not score the same fold-8 records in the same order")
    weights = M.bootstrap_weights(len(y_true), n_bootstrap, seed=0)
    thresholds = np.full(y_true.shape[1], 0.5)

    def macro(score_list, w=None):
        if w is None:
            return float(np.mean([M.macro_auroc(y_true, s) for s in score_list]))
        return np.mean([M.bootstrap_replicates(y_true, s, thresholds, w)["macro_auroc"] for s in score_list], axis=0)

    observed = macro(scores_a) - macro(scores_b)
    replicates = macro(scores_a, weights) - macro(scores_b, weights)
    low, high = np.nanpercentile(replicates, [2.5, 97.5])
    return {"difference": observed, "interval": [float(low), float(high)], "n_bootstrap": n_bootstrap,
            "seeds": [len(scores_a), len(scores_b)]}


def model_costs(names: Dict[str, str], batch_size: int, seconds: float, rounds: int = 3, steps: int = 2) -> Dict:
    """{label: parameters, training-step seconds} of each model name, one process: forward +
    backward + AdamW step of a batch at 100 Hz, `rounds` interleaved rounds of `steps` steps, the
    best round of each (a shared machine slows some rounds, never speeds one up)."""
    import time

    import torch

    from open_clip_ecg.training.synthetic_step import synthetic_training_step

    torch.manual_seed(0)
    step_fns, out = {}, {}
    for label, name in names.items():
        model, step = synthetic_training_step(name, batch_size, int(100 * seconds))
        step()  # warm-up
        step_fns[label] = step
        out[label] = {"parameters": sum(p.numel() for p in model.parameters()), "step_seconds": float("inf")}
    for _ in range(rounds):
        for label, step in step_fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            out[label]["step_seconds"] = min(out[label]["step_seconds"], (time.perf_counter() - start) / steps)
    return out


def same_set_pairs(label_sets: List[frozenset], batch_sizes: Sequence[int]) -> Dict[int, Dict]:
    """Per batch size: the expected number of pairs in a random batch whose two ECGs have the same
    finding set (plain SigLIP's false negatives that ``exact`` and ``jaccard`` call positive) and
    pairs sharing at least one finding, from the training records' label sets (drawn without
    replacement: C(B, 2) times the share of such pairs among all record pairs)."""
    from collections import Counter

    n = len(label_sets)
    all_pairs = n * (n - 1) / 2
    same = sum(k * (k - 1) / 2 for k in Counter(label_sets).values()) / all_pairs
    sets = list(label_sets)
    sharing = sum(bool(sets[i] & sets[j]) for i in range(n) for j in range(i + 1, n)) / all_pairs
    return {b: {"same_set_pairs": b * (b - 1) / 2 * same, "sharing_pairs": b * (b - 1) / 2 * sharing,
                "pairs": b * (b - 1) / 2} for b in batch_sizes}


def _difference_cell(d: Dict) -> str:
    return f"{d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"


def ablation_tables(out: str, results: Dict, args, extras: Dict) -> List[str]:
    """Markdown of each ablation: fold-8 figures per variant (mean ± sd over seeds) and the paired
    difference from the reference (or, for the loss, between targets) with bootstrap intervals."""
    lines = []
    for ablation, variants in results.items():
        reference = variants[0]
        lines += [f"## Ablation: {ablation} (fold 8, {len(args.seeds)} seeds, each variant's epoch and scoring "
                  "rule chosen on fold 7)", "",
                  "| variant | targets | " + " | ".join(f"{t} AUROC" for t in TASKS)
                  + " | super micro-F1 | super Jaccard |", "|---|---|" + "---|" * (len(TASKS) + 2)]
        for v in variants:
            for targets in v["targets"]:
                rs = [r for r in v["runs"].values() if r["targets"] == targets]
                cells = [_mean_sd([r["tasks"][t]["headline"]["macro_auroc"] for r in rs]) for t in TASKS]
                cells += [_mean_sd([r["tasks"]["ptbxl-super"]["headline"][m] for r in rs])
                          for m in ("micro_f1", "jaccard_samples")]
                lines.append(f"| {v['label']} (`{v['name']}`) | {targets} | " + " | ".join(cells) + " |")
        lines.append("")
        if ablation == "loss":
            pairs = extras.get("same_set_pairs", {})
            lines += ["Paired differences between targets (seed-averaged macro AUROC, 95% bootstrap over fold-8 "
                      "records); same-finding-set pairs per batch of training records:", "",
                      "| recipe, batch | same-set pairs per batch (of all pairs) | pairs sharing a finding | comparison | "
                      + " | ".join(TASKS) + " |", "|---|---|---|---|" + "---|" * len(TASKS)]
            for v in variants:
                p = pairs.get(v["batch"], pairs.get(str(v["batch"]), {}))
                for other in [t for t in v["targets"] if t != "jaccard"] if "jaccard" in v["targets"] else []:
                    cells = [_difference_cell(paired_difference(run_scores(out, v["runs"], "jaccard"),
                                                                run_scores(out, v["runs"], other), t, args.bootstrap))
                             for t in TASKS]
                    lines.append(f"| {v['label']} | {p.get('same_set_pairs', 0):.1f} (of {p.get('pairs', 0):.0f}) | "
                                 f"{p.get('sharing_pairs', 0):.0f} | jaccard − {other} | " + " | ".join(cells) + " |")
            lines.append("")
            chosen = [f"Learning rate at {v['label']}, chosen on fold 7 (best mean macro AUROC, jaccard, first seed): "
                      + ", ".join(f"{rule} {mean:.3f}" for rule, mean in v["lr_fold7_mean"].items())
                      + f" → {v['lr_scaling']} (lr {v['setting']['lr']:g})." for v in variants if "lr_fold7_mean" in v]
            lines += chosen + ([""] if chosen else [])
            lines += own_choices_table(out, variants, args)
            continue
        lines += ["Paired difference from the reference (seed-averaged macro AUROC, 95% bootstrap over fold-8 records):",
                  "", "| variant | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for v in variants[1:]:
            cells = [_difference_cell(paired_difference(run_scores(out, v["runs"], "jaccard"),
                                                        run_scores(out, reference["runs"], "jaccard"), t, args.bootstrap))
                     for t in TASKS]
            lines.append(f"| {v['label']} − reference | " + " | ".join(cells) + " |")
        lines.append("")
        costs = extras.get("model_costs") if ablation == "embed-dim" else None
        if costs:
            base = costs[reference["label"]]
            lines += ["Cost (one process, batch 64, forward + backward + AdamW step, best of interleaved rounds):", "",
                      "| variant | parameters | × reference | step time × reference |", "|---|---|---|---|"]
            for v in variants:
                c = costs[v["label"]]
                lines.append(f"| {v['label']} | {c['parameters']:,} | {c['parameters'] / base['parameters']:.4f} | "
                             f"{c['step_seconds'] / base['step_seconds']:.3f} |")
            lines.append("")
        if ablation == "crop" and all("cinc" in v for v in variants):
            first = reference["cinc"]
            lines += [f"Other institutions ({first['n_records']} Challenge records, `{CINC_TASK}`; positives per "
                      f"finding: {', '.join(f'{k} {n}' for k, n in first['n_positive'].items())}); epoch and rule "
                      "for this task chosen on fold 7:", "",
                      "| variant | epoch, rule | macro AUROC (mean ± sd) | − reference [95% bootstrap over records] |",
                      "|---|---|---|---|"]
            for v in variants:
                cinc = v["cinc"]
                files = [os.path.join(out, "scores", f"cinc-{run_name(v['name'], 'jaccard', seed)}.npz")
                         for seed in args.seeds]
                ref_files = [os.path.join(out, "scores", f"cinc-{run_name(reference['name'], 'jaccard', seed)}.npz")
                             for seed in args.seeds]
                d = "–" if v is reference else _difference_cell(paired_difference(files, ref_files, CINC_TASK, args.bootstrap))
                rules = cinc["rules"]
                lines.append(f"| {v['label']} | {cinc['epoch']}, {rules['names']}/{rules['aggregate']}/{rules['scoring']} "
                             f"| {_mean_sd(list(cinc['macro_auroc'].values()))} | {d} |")
            lines.append("")
    return lines


def own_choices_table(out: str, variants: List[Dict], args) -> List[str]:
    """The loss differences again, each other target scored with the epochs and rules its own first
    seed chose on fold 7 (the table above gives every target jaccard's), with their fold-8 means."""
    variants = [v for v in variants if v.get("own_choices")]
    if not variants:
        return []
    lines = ["Each target with its own fold-7 choices (its first seed chose each task's epoch and scoring rule; "
             "jaccard keeps its own): fold 8, mean ± sd over seeds, and the paired difference:", "",
             "| recipe, batch | comparison | " + " | ".join(f"{t} (other's AUROC)" for t in TASKS) + " | epochs chosen |",
             "|---|---|" + "---|" * (len(TASKS) + 1)]
    for v in variants:
        for other, runs in v["own_choices"].items():
            cells = [f"{_difference_cell(paired_difference(run_scores(out, v['runs'], 'jaccard'), run_scores(out, runs, other), t, args.bootstrap))} "
                     f"({_mean_sd([r['tasks'][t]['headline']['macro_auroc'] for r in runs.values()])})" for t in TASKS]
            epochs = "/".join(str(next(iter(runs.values()))["choices"][t]["epoch"]) for t in TASKS)
            lines.append(f"| {v['label']} | jaccard − {other} | " + " | ".join(cells) + f" | {epochs} |")
    return lines + [""]


def _mean_sd(values: List[float]) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}" if values else "n/a"


def curve_table(curve: List[Dict]) -> List[str]:
    """The learning curve as markdown lines (empty when the stage did not run)."""
    if not curve:
        return []
    lines = ["## Learning curve (fold 7 macro AUROC; zero-shot winner, jaccard, one seed; supervised BCE, last epoch)", "",
             "| training records | " + " | ".join(f"zero-shot {t}" for t in TASKS)
             + " | supervised ptbxl-super | supervised ptbxl-rhythm |", "|---|" + "---|" * (len(TASKS) + 2)]
    for row in curve:
        cells = [row["zero-shot"][t] for t in TASKS] + [row["supervised"][t] for t in ("ptbxl-super", "ptbxl-rhythm")]
        lines.append(f"| {row['n_records']} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in cells) + " |")
    lines.append("")
    measured = [row for row in curve if "per_label" in row]
    for task_name in SUPERVISED_TASKS if measured else ():
        sizes = [row["n_records"] for row in measured]
        lines += [f"### {task_name} per label against training records (fold 7 AUROC)", "",
                  "| label | fold-7 n+ | " + " | ".join(f"zero-shot {n}" for n in sizes) + " | "
                  + " | ".join(f"supervised {n}" for n in sizes) + " |", "|---|---|" + "---|" * (2 * len(sizes))]
        for code, first in measured[0]["per_label"]["zero-shot"][task_name].items():
            cells = [row["per_label"][method][task_name][code]["auroc"]
                     for method in ("zero-shot", "supervised") for row in measured]
            lines.append(f"| {code} | {first['n_positive']} | "
                         + " | ".join("n/a" if v is None else f"{v:.3f}" for v in cells) + " |")
        lines.append("")
    return lines


def write_tables(out: str, selection: Dict, runs: Dict, supervised: Dict, differences: Dict, args,
                 curve: List[Dict] = (), generalist: Optional[Dict] = None, arch: str = DEFAULT_TOWER) -> str:
    best = selection["best"]
    lines = ["# PTB-XL zero-shot study (ptbxl_zeroshot_study.py)", "",
             f"Train folds 1-6, everything chosen on fold 7, reported on fold 8 once; {args.epochs} epochs, "
             f"batch {args.batch_size}, lr {args.lr}, {args.crop_seconds:g} s crops, 100 Hz.", "",
             "## Selection on fold 7 (seed %d, jaccard targets): best scoring rule per setting and epoch" % args.seeds[0], "",
             "| setting | names | aggregate | scoring | " + " | ".join(TASKS) + " | mean |",
             "|---|---|---|---|" + "---|" * (len(TASKS) + 1)]
    def length(row):
        return row["setting"], row.get("epoch", args.epochs)

    for key in dict.fromkeys(map(length, selection["rows"])):
        r = max((r for r in selection["rows"] if length(r) == key), key=lambda r: r["fold7_mean"])
        cells = " | ".join(f"{r['fold7_macro_auroc'][t]:.3f}" if r["fold7_macro_auroc"][t] is not None else "n/a"
                           for t in TASKS)
        lines.append(f"| {key[0]} (epoch {key[1]}) | {r['names']} | {r['aggregate']} | {r['scoring']} | {cells} "
                     f"| {r['fold7_mean']:.3f} |")
    lines += ["", f"Winner: **{best['setting']}**; per task (`--choose {args.choose}`), chosen on fold 7:", "",
              "| task | epoch | names | aggregate | scoring | fold-7 macro AUROC |", "|---|---|---|---|---|---|"]
    for task_name, c in selection["choices"].items():
        auroc = "n/a" if c["fold7_macro_auroc"] is None else f"{c['fold7_macro_auroc']:.3f}"
        lines.append(f"| {task_name} | {c['epoch']} | {c['names']} | {c['aggregate']} | {c['scoring']} | {auroc} |")
    lines += ["",
              f"## Fold 8: targets x {len(args.seeds)} seeds (mean ± sd), thresholds from fold 7", "",
              "| targets | " + " | ".join(f"{t} AUROC" for t in TASKS) + " | AF AUROC | super micro-F1 | "
              "super Jaccard | sub micro-F1 | sub Jaccard |", "|---|" + "---|" * (len(TASKS) + 5)]
    for targets in args.targets:
        rs = [r for r in runs.values() if r["targets"] == targets]
        cells = [_mean_sd([r["tasks"][t]["headline"]["macro_auroc"] for r in rs]) for t in TASKS]
        cells.append(_mean_sd([r["tasks"]["ptbxl-rhythm"]["per_label"].get(AF, {}).get("auroc") for r in rs]))
        for t in ("ptbxl-super", "ptbxl-sub"):
            cells += [_mean_sd([r["tasks"][t]["headline"]["micro_f1"] for r in rs]),
                      _mean_sd([r["tasks"][t]["headline"]["jaccard_samples"] for r in rs])]
        lines.append(f"| {targets} | " + " | ".join(cells) + " |")
    baselines = {f"supervised BCE ({arch}), one model per task": supervised,
                 f"supervised BCE ({arch}), one model for {GENERALIST_TASK}": generalist or {}}
    for what, by_seed in baselines.items():
        if not by_seed:
            continue
        seeds = list(by_seed.values())

        def sup(task_name, value):
            return _mean_sd([value(seed[task_name]) for seed in seeds])
        cells = [sup(t, lambda r: r["headline"]["macro_auroc"]) if t in seeds[0] else "–" for t in TASKS]
        cells.append(sup("ptbxl-rhythm", lambda r: r["per_label"].get(AF, {}).get("auroc")))
        cells += [sup(t, lambda r: r["headline"][metric]) if t in seeds[0] else "–"
                  for t in ("ptbxl-super", "ptbxl-sub") for metric in ("micro_f1", "jaccard_samples")]
        lines.append(f"| {what}, {len(seeds)} seed(s) | " + " | ".join(cells) + " |")
    lines += ["", "Paper (Takahashi et al. 2026, their data): micro-F1 0.503, sample Jaccard 0.350.", ""]
    for what, by_task in differences.items():
        lines += [f"## Paired difference {what} (seed-averaged macro AUROC, fold 8, 95% bootstrap)", "",
                  "| task | difference | 95% interval |", "|---|---|---|"]
        for task_name, d in by_task.items():
            lines.append(f"| {task_name} | {d['difference']:+.3f} | "
                         f"[{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}] |")
        lines.append("")
    lines += [""] + curve_table(list(curve))
    lines += ["## Per label (fold 8, AUROC, mean over seeds of the winning targets)", ""]
    winner_runs = [r for r in runs.values() if r["targets"] == args.targets[0]]
    for task_name in TASKS:  # the specialists answer SUPERVISED_TASKS only
        lines += [f"### {task_name}", "", "| label | n+ | zero-shot | supervised, per task | supervised, all statements |",
                  "|---|---|---|---|---|"]
        for code, row in winner_runs[0]["tasks"][task_name]["per_label"].items():
            values = [r["tasks"][task_name]["per_label"][code]["auroc"] for r in winner_runs]
            sup = [_mean_sd([seed.get(task_name, {}).get("per_label", {}).get(code, {}).get("auroc")
                             for seed in by_seed.values()])
                   for by_seed in baselines.values()]
            lines.append(f"| {code} | {row['n_positive']} | {_mean_sd(values)} | {sup[0]} | {sup[1]} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_ablations(study: Study, args) -> Dict:
    """The ``ablations`` stage: train and score every variant, measure the costs, write
    OUT/ablations.json and OUT/ablations.md."""
    results = study.ablations()
    if args.ablation_variants:  # a share of the runs (several processes): the tables come from a run without it
        return results
    extras = {}
    if "embed-dim" in results:
        variants = results["embed-dim"]
        extras["model_costs"] = model_costs({v["label"]: study.model_name(v["setting"]) for v in variants},
                                            args.batch_size, study.value(variants[0]["setting"], "crop_seconds"))
    if "loss" in results:
        label_sets = [frozenset(sample["label_ids"]) for sample in iterate_samples(study.train_shards())]
        extras["same_set_pairs"] = same_set_pairs(label_sets, sorted({v["batch"] for v in results["loss"]}))
    lines = ["# PTB-XL ablations (ptbxl_zeroshot_study.py --stages ablations)", "",
             f"Reference: `{args.reference}`; {args.epochs} epochs (checkpoints {args.select_epochs} compared on "
             f"fold 7), batch {args.batch_size}, lr {args.lr}, {args.crop_seconds:g} s crops unless the variant "
             "changes it; train folds 1-6, choose on fold 7, fold 8 read once per setting.", ""]
    lines += ablation_tables(args.out, results, args, extras)
    write_json_atomic(os.path.join(args.out, "ablations.json"), {"results": results, **extras}, indent=2)
    write_text_atomic(os.path.join(args.out, "ablations.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptbxl", required=True, help="PTB-XL folder (ptbxl_database.csv, records100/)")
    parser.add_argument("--out", default="ptbxl_study")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--select-epochs", type=int, nargs="+",
                        help="training lengths compared on fold 7: the checkpoints after these epochs of each "
                             "--epochs run (default: --epochs only)")
    parser.add_argument("--choose", choices=("per-task", "overall"), default="per-task",
                        help="per-task: each task takes its best epoch and scoring rule on fold 7 (the supervised "
                             "baseline also has a model per task); overall: the best row by the mean over tasks")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--crop-seconds", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--settings", nargs="+", choices=list(SELECTION), default=list(SELECTION),
                        help="training settings compared on fold 7")
    parser.add_argument("--supervised-epochs", type=int, default=15,
                        help="epochs of the supervised baseline (its best epoch on fold 7 is kept)")
    parser.add_argument("--curve-shards", type=int, nargs="+", default=[3, 6],
                        help="learning-curve stage: train on the first K training shards (plus all of them)")
    parser.add_argument("--stages", nargs="+",
                        choices=("select", "seeds", "supervised", "generalist", "curve", "report", "ablations"),
                        default=["select", "seeds", "supervised", "generalist", "curve", "report"],
                        help="run some stages only (e.g. two processes training different --targets "
                             "in parallel, then 'report' to collect)")
    parser.add_argument("--ablations", nargs="+", choices=(*ABLATIONS, "loss"), default=[*ABLATIONS, "loss"],
                        help="stage 'ablations': embed-dim (128/256/512), crop (none/5 s/2.5 s), loss (--targets at "
                             "--batch-size and --large-batch under each --loss-recipes), each against --reference")
    parser.add_argument("--ablation-variants", nargs="+", default=None,
                        help="train and score only these variants (setting names, or the part after "
                             "'<reference>+': dim128, crop10, ...) and write no tables: to share the runs "
                             "between processes; a run without it writes the tables")
    parser.add_argument("--reference", choices=list(SELECTION), default=REFERENCE,
                        help="the recipe the embed-dim and crop ablations change one thing of")
    parser.add_argument("--large-batch", type=int, default=256,
                        help="loss ablation: the larger batch (warmup kept in samples)")
    parser.add_argument("--large-batch-lr-scaling", nargs="+", choices=list(LR_SCALING), default=["sqrt", "none"],
                        help="loss ablation: --lr at --large-batch times sqrt(ratio), 1 or the ratio; each rule "
                             "given trains once (jaccard, first seed) and fold 7 chooses (default: sqrt none)")
    parser.add_argument("--large-batch-finding-weight", nargs="+", choices=list(WEIGHT_SCALING),
                        default=["kept", "scaled"],
                        help="loss ablation, recipes with finding texts: the finding-text weight at --large-batch "
                             "kept or scaled by the batch ratio (the pair term grows with the batch); crossed with "
                             "--large-batch-lr-scaling, fold 7 chooses (default: kept scaled)")
    parser.add_argument("--loss-recipes", nargs="+", choices=list(SELECTION), default=[REFERENCE, "sampled-text"],
                        help="loss ablation: the recipes compared (default: the current one and the one without "
                             "finding texts)")
    parser.add_argument("--cinc", default=None,
                        help="crop ablation: a folder of Challenge records (../shared/data/cinc) scored with "
                             f"{CINC_TASK} (records from other institutions than PTB-XL)")
    parser.add_argument("--train-shards", type=int, default=None,
                        help="train on the first K training shards only (default: all; the learning curve "
                             "chooses its own)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 epochs (both compared), 1 seed, jaccard and identity, two settings, "
                             "2 training shards, 20 resamples")
    args = parser.parse_args(argv)
    if args.quick:  # a tiny budget for every option left at its default
        quick = {"epochs": 2, "select_epochs": [1, 2], "seeds": [0], "targets": ["jaccard", "identity"],
                 "bootstrap": 20, "supervised_epochs": 1, "curve_shards": [1], "settings": ["stored-text", "sampled-text"],
                 "batch_size": 32, "crop_seconds": 2.5, "shard_size": 64, "reference": "sampled-text",
                 "large_batch": 64, "loss_recipes": ["sampled-text"], "train_shards": 2}
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.select_epochs = sorted(set(args.select_epochs or [args.epochs]))
    if not 1 <= args.select_epochs[0] <= args.select_epochs[-1] <= args.epochs:
        parser.error(f"--select-epochs must lie between 1 and --epochs ({args.epochs}): {args.select_epochs}")
    args.selection = {name: SELECTION[name] for name in args.settings}
    args.rules_grid = (ALL_SCORING_RULES if not args.quick
                       else [ScoringRules("name", "prompt", "sigmoid"), ScoringRules("name", "noisy-or", "contrast")])

    study = Study(args)
    study.write_shards()
    if "ablations" in args.stages:
        run_ablations(study, args)
        if set(args.stages) == {"ablations"}:
            return 0
    selection = study.select()
    if args.stages == ["select"]:
        return 0
    best, choices = selection["best"], selection["choices"]
    curve = (study.learning_curve(best, choices, train="curve" in args.stages)
             if {"curve", "report"} & set(args.stages) else [])
    runs = study.seeds(best, choices) if {"seeds", "report"} & set(args.stages) else {}
    arch = tower_of(best["model"])  # the supervised baselines train the winner's ECG tower
    supervised = study.supervised(arch) if {"supervised", "report"} & set(args.stages) else {}
    generalist = study.generalist(arch) if {"generalist", "report"} & set(args.stages) else {}
    if "report" not in args.stages:
        return 0
    differences = {}
    others = [t for t in args.targets if t != "jaccard"] if "jaccard" in args.targets else []
    for other in others:
        differences[f"jaccard − {other}"] = {
            t: paired_difference(run_scores(args.out, runs, "jaccard"), run_scores(args.out, runs, other), t,
                                 args.bootstrap) for t in TASKS}
    # the winner against the fold-7 runner-up, when the runner-up's fold-8 seeds were scored (a
    # report from when it was the winner): what the last lever changed, with an interval
    runner_up = max((r for r in selection["rows"] if r["setting"] != best["setting"]),
                    key=lambda r: r["fold7_mean"], default=None)
    if runner_up is not None:
        earlier = [os.path.join(args.out, "scores", f"{run_name(runner_up['setting'], args.targets[0], seed)}.npz")
                   for seed in args.seeds]
        if all(os.path.exists(path) for path in earlier):
            differences[f"{args.targets[0]} zero-shot, winner − fold-7 runner-up ({runner_up['setting']})"] = {
                t: paired_difference(run_scores(args.out, runs, args.targets[0]), earlier, t, args.bootstrap)
                for t in TASKS}
    if supervised:
        differences[f"{args.targets[0]} zero-shot − supervised"] = {
            t: paired_difference(run_scores(args.out, runs, args.targets[0]), supervised_scores(args.out, args.seeds, arch),
                                 t, args.bootstrap) for t in SUPERVISED_TASKS}
    if generalist:
        differences[f"{args.targets[0]} zero-shot − supervised, one model for {GENERALIST_TASK}"] = {
            t: paired_difference(run_scores(args.out, runs, args.targets[0]),
                                 supervised_scores(args.out, args.seeds, arch, "generalist"), t, args.bootstrap)
            for t in TASKS}
    result = {"selection_best": best, "choices": choices, "runs": runs, "supervised_tower": arch, "supervised": supervised,
              "generalist": generalist, "learning_curve": curve,
              "paired_differences": differences, "options": {**vars(args), "rules_grid": [dataclasses.asdict(rules) for rules in args.rules_grid]}}
    write_json_atomic(os.path.join(args.out, "study.json"), result, indent=2)
    table = write_tables(args.out, selection, runs, supervised, differences, args, curve, generalist, arch)
    write_text_atomic(os.path.join(args.out, "study.md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
