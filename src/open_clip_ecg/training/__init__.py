"""Training ECG-text models with open_clip_train's own loop, by responsibility.

- :mod:`.options`: the ``--ecg-*`` flags, open_clip_train flags that cannot work with ECGs, and the
  checks that turn both into one run's settings.
- :mod:`.seams`: the open_clip glue, the only module that replaces anything in open_clip_train
  (each seam listed with what it patches and why).
- :mod:`.label_passing`: the model forward that carries each batch's labels to the loss.
- :mod:`.finding_texts`: ``--ecg-finding-texts``: the vocabulary's finding texts, tokenized.
- :mod:`.data`: the ECG shard loaders open_clip_train reads, and what training measures on the
  shards before it starts (text truncation, ``--ecg-init-logit-bias auto``).
- :mod:`.logit_step`: ``--ecg-logit-lr-mult``.
- :mod:`.zero_shot`: multi-label zero-shot validation.
- :mod:`.finite_loss`: a run stops at its first non-finite loss, before any checkpoint.
- :mod:`.checkpoint`: atomic checkpoint saves that record the ECG preprocessing, and the checks
  that a checkpoint to resume fits the run (model, recipe).

The entry point (``python -m open_clip_ecg.train``, ``open-clip-ecg train``) is
:mod:`open_clip_ecg.train`.
"""
