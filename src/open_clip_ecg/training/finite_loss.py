"""Stop a training whose loss stops being a number, before it writes a checkpoint.

A NaN or infinite loss poisons every weight at the next optimizer step, and open_clip_train would
carry on to the end and save the poisoned model. The loss is wrapped (``create_loss`` seam) so the
first non-finite value raises :class:`NonFiniteLossError` inside the training step; the epoch never
completes, so no checkpoint of it is saved. The check costs one device sync per loss call.
"""
from __future__ import annotations

import torch


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite (a user error: learning rate, logit init, data)."""


class FiniteLossCheck(torch.nn.Module):
    """`loss` (open_clip_train's call convention), raising on the first non-finite total with the
    optimizer step of this run it happened in (``accum_freq`` loss calls make one step)."""

    def __init__(self, loss: torch.nn.Module, accum_freq: int = 1):
        super().__init__()
        self.loss, self.accum_freq, self.calls = loss, max(int(accum_freq), 1), 0

    def forward(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        self.calls += 1
        total = sum(out.values()) if isinstance(out, dict) else out
        if not bool(torch.isfinite(total.detach()).all()):
            step = (self.calls - 1) // self.accum_freq + 1
            terms = ", ".join(f"{name} {float(value):g}" for name, value in out.items()) if isinstance(out, dict) else ""
            raise NonFiniteLossError(
                f"the training loss became {float(total):g} at optimizer step {step} of this run"
                + (f" ({terms})" if terms else "") + "; stopped without saving a checkpoint: lower --lr or "
                "check --ecg-init-logit-scale/--ecg-init-logit-bias and the training data")
        return out
