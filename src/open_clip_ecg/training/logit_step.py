"""``--ecg-logit-lr-mult``: optimizer steps that move the logit scale and bias further."""
from __future__ import annotations

import torch


class LogitStepAmplifier:
    """Makes every optimizer step move the logit scale and bias `mult` times as far.

    open_clip_train builds its optimizer inside ``main()`` and its LR schedules overwrite every
    param group's learning rate, so a group with its own LR cannot be added from outside. torch's
    global optimizer step hooks can: before a step they note the two parameters, after it they
    stretch the step. Works with any optimizer, schedule and --accum-freq.
    """

    def __init__(self, mult: float):
        self.mult, self.params, self.before, self.handles = mult, [], [], []

    def watch(self, model: torch.nn.Module) -> None:
        self.params = [p for name, p in model.named_parameters() if name in ("logit_scale", "logit_bias")]

    def _pre(self, optimizer, *_):
        self.before = [p.detach().clone() for p in self.params]

    def _post(self, optimizer, *_):
        with torch.no_grad():
            for p, old in zip(self.params, self.before):
                p.add_((p - old) * (self.mult - 1))

    def __enter__(self):
        if self.mult != 1:
            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
            self.handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
