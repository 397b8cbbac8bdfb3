"""``--ecg-finding-texts``: one text per vocabulary finding (and per group of findings), tokenized
for the run's model and embedded with every training batch (:mod:`.label_passing`)."""
from __future__ import annotations

from typing import Optional

import open_clip
import torch

from ..data.manifest import read_shard_info
from ..data.pipeline import expand_shards
from ..data.text import FindingTexts
from ..tasks import finding_groups


class FindingTextTokens:
    """The tokens of this step's finding texts (:class:`~open_clip_ecg.data.text.FindingTexts`)."""

    def __init__(self, finding_texts: FindingTexts, tokenizer):
        self.finding_texts, self.tokenizer = finding_texts, tokenizer

    def __call__(self) -> torch.Tensor:
        return self.tokenizer(self.finding_texts())


def finding_text_tokens(args) -> Optional[FindingTextTokens]:
    """--ecg-finding-texts: the training vocabulary's finding texts, tokenized for `args.model`."""
    if args.ecg.ecg_finding_texts == "off":
        if args.ecg.ecg_finding_groups:
            raise ValueError("--ecg-finding-groups adds finding texts: use it with --ecg-finding-texts contains|jaccard")
        if args.ecg.ecg_finding_weight != 1.0:
            raise ValueError("--ecg-finding-weight weighs the finding texts: use it with --ecg-finding-texts contains|jaccard")
        if args.ecg.ecg_finding_prior:
            raise ValueError("--ecg-finding-prior offsets the finding texts' logits: use it with "
                             "--ecg-finding-texts contains|jaccard")
        return None
    if not args.ecg.ecg_finding_weight > 0:
        raise ValueError(f"--ecg-finding-weight must be > 0, got {args.ecg.ecg_finding_weight}")
    if not args.train_data:
        raise ValueError("--ecg-finding-texts reads the finding names of the --train-data vocabulary")
    vocabulary = read_shard_info(expand_shards(args.train_data))["vocabulary"]
    groups = finding_groups(args.ecg.ecg_finding_groups, [v["code"] for v in vocabulary])
    finding_texts = FindingTexts([v["name"] for v in vocabulary], groups)
    return FindingTextTokens(finding_texts, open_clip.get_tokenizer(args.model, cache_dir=args.cache_dir))
