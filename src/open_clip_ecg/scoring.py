"""Zero-shot scores of a task's labels: which prompts, which statements, which rule.

:mod:`open_clip_ecg.zeroshot` turns prompts into a classifier and ECG embeddings into pair
probabilities; this module decides what is scored for an evaluation task
(:mod:`open_clip_ecg.tasks`) and how:

- **prompt names** (``names``): ``shipped`` (each finding's English name and synonyms from the
  shipped prompt tables), ``name`` (the English name only: synonyms like "slow sinus rhythm"
  for sinus bradycardia share words with commoner findings and blur them), or ``vocabulary`` (the
  name the shards' ``vocabulary.json`` gives the code: the very phrase the model read in its
  training sentences; codes it lacks fall back to ``name``). A user prompt file overrides all.
- **aggregation** (``aggregate``): ``prompt`` scores each label from its own prompts (e.g.
  "myocardial infarction" for the superclass MI); ``noisy-or``, ``max`` or ``mean`` score every
  member statement of the label (IMI, AMI, ... for MI) from the statement's prompts and combine
  their probabilities, so a model trained on fine statements answers coarse questions in the terms
  it learned. A label whose only member is itself scores the same either way.
- **scoring** (``scoring``): ``sigmoid`` is SigLIP's pair probability
  ``sigmoid(s * cos(ecg, finding) + b)``; ``contrast`` compares the finding's prompt with its
  negation ("no atrial fibrillation") as CheXzero does for chest X-rays:
  ``sigmoid(s * (cos(ecg, finding) - cos(ecg, no finding)))``, a score that compares like with
  like across ECGs whatever a prompt's overall similarity level.

The rules are recorded in ``metrics.json`` (:meth:`TaskScorer.describe`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .prompts import PROMPT_NAMES, task_prompts
from .tasks import SCP, SNOMED, Task, TaskLabel
from .zeroshot import DEFAULT_TEMPLATES, build_zeroshot_classifier

AGGREGATIONS = ("prompt", "noisy-or", "max", "mean")
SCORINGS = ("sigmoid", "contrast")
NEGATION = "no {}"


@dataclass
class ScoringRules:
    """How zero-shot scores are made (the options of ``open-clip-ecg evaluate``).

    The defaults won on fold 7 of PTB-XL (``scripts/ptbxl_zeroshot_study.py``): English names
    only, labels as the noisy-OR of their member statements, SigLIP's sigmoid."""

    names: str = "name"
    aggregate: str = "noisy-or"
    scoring: str = "sigmoid"

    def __post_init__(self):
        for value, choices, what in ((self.names, PROMPT_NAMES, "prompt names"),
                                     (self.aggregate, AGGREGATIONS, "aggregation"),
                                     (self.scoring, SCORINGS, "scoring")):
            if value not in choices:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


def aggregate_probabilities(statement_probs: torch.Tensor, members: Sequence[Sequence[int]], rule: str) -> torch.Tensor:
    """``[N, S]`` statement probabilities -> ``[N, L]``: label l combines columns ``members[l]``.

    ``noisy-or``: 1 - prod(1 - p) (the label is present if any statement is, statements treated as
    independent); ``max``: the most probable statement; ``mean``: their average.
    """
    if rule not in AGGREGATIONS[1:]:
        raise ValueError(f"unknown aggregation {rule!r}; expected one of {', '.join(AGGREGATIONS[1:])}")
    columns = []
    for label, indices in enumerate(members):
        if not indices:
            raise ValueError(f"label #{label} has no member statement to aggregate")
        p = statement_probs[:, list(indices)]
        if rule == "noisy-or":
            columns.append(1 - torch.prod(1 - p, dim=1))
        elif rule == "max":
            columns.append(p.max(dim=1).values)
        else:
            columns.append(p.mean(dim=1))
    return torch.stack(columns, dim=1)


class TaskScorer:
    """Scores ``[N, n_labels]`` of `task` for ECG embeddings, by `rules` (see the module docstring)."""

    def __init__(self, model, tokenizer, task: Task, rules: ScoringRules = ScoringRules(),
                 prompt_file: Optional[str] = None, vocabulary: Optional[Sequence[Mapping]] = None,
                 batch_size: int = 256):
        self.task, self.rules, self.prompt_file = task, rules, prompt_file
        vocabulary_names = {str(v["code"]): str(v["name"]) for v in (vocabulary or ())}
        # What gets prompted: the labels themselves, or every member statement of theirs.
        if rules.aggregate == "prompt":
            self.prompted = list(task.labels)
            self.members = [[i] for i in range(len(task.labels))]
        else:
            system = task.systems[0]
            statements = sorted({code for label in task.labels for code in label.members.get(system, ())})
            keyed = system in (SCP, SNOMED)  # statements of a shipped prompt table
            self.prompted = [TaskLabel(code, vocabulary_names.get(code, code), {}, (code,) if keyed else ())
                             for code in statements]
            index = {code: i for i, code in enumerate(statements)}
            self.members = [sorted(index[c] for c in label.members.get(system, ())) for label in task.labels]
        self.names, templates, self.sources = task_prompts(self.prompted, prompt_file, rules.names, vocabulary_names)
        self.templates = list(templates or DEFAULT_TEMPLATES)

        device = next(model.parameters()).device
        self.positive = build_zeroshot_classifier(model, tokenizer, self.names, self.templates, device, batch_size)
        self.negative = None
        if rules.scoring == "contrast":
            negations = {code: [NEGATION.format(n) for n in names] for code, names in self.names.items()}
            self.negative = build_zeroshot_classifier(model, tokenizer, negations, self.templates, device, batch_size)
        self.logit_scale = model.logit_scale.exp().detach().float()
        self.logit_bias = model.logit_bias.detach().float()

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, embed_dim]`` ECG embeddings -> ``[N, n_labels]`` scores in [0, 1]."""
        e = F.normalize(embeddings.float(), dim=-1)
        scale = self.logit_scale.to(e.device)
        positive = e @ self.positive.to(e.device).T
        if self.rules.scoring == "contrast":
            probs = torch.sigmoid(scale * (positive - e @ self.negative.to(e.device).T))
        else:
            probs = torch.sigmoid(scale * positive + self.logit_bias.to(e.device))
        if self.rules.aggregate == "prompt":
            return probs
        return aggregate_probabilities(probs, self.members, self.rules.aggregate)

    def describe(self) -> Dict:
        """The rules, templates and prompt names, for ``metrics.json``."""
        formula = {"sigmoid": "sigmoid(exp(logit_scale) * cos(ecg, finding) + logit_bias)",
                   "contrast": "sigmoid(exp(logit_scale) * (cos(ecg, finding) - cos(ecg, 'no ' + finding)))"}
        about = {"names": self.rules.names, "aggregate": self.rules.aggregate, "scoring": self.rules.scoring,
                 "formula": formula[self.rules.scoring], "file": self.prompt_file, "templates": self.templates,
                 "prompted": self.names, "sources": self.sources}
        if self.rules.aggregate != "prompt":
            codes = [item.code for item in self.prompted]
            about["members"] = {label.code: [codes[i] for i in m] for label, m in zip(self.task.labels, self.members)}
            about["aggregation"] = {"noisy-or": "1 - prod(1 - p_statement)", "max": "max(p_statement)",
                                    "mean": "mean(p_statement)"}[self.rules.aggregate]
        return about
