"""The base every lethe LightningModule stands on: one model, loaded one way."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lethe import lm
from lethe.io import save_pretrained
from lethe.models import load_model


class ModuleConfigError(ValueError):
    """A LightningModule argument out of its range; the message names the preset field."""


def check_range(positive: dict | None = None, non_negative: dict | None = None) -> None:
    """Refuse out-of-range numeric arguments before anything is loaded, naming ``model.init_args.<field>``:
    ``positive`` values must be finite and > 0 (sizes), ``non_negative`` finite and >= 0 (learning rates, weights)."""
    import math

    for names, ok, what in ((positive or {}, lambda v: v > 0, "> 0"), (non_negative or {}, lambda v: v >= 0, ">= 0")):
        for name, value in names.items():
            if value is None:
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
                raise ModuleConfigError(f"model.init_args.{name}={value!r}: must be a finite number {what}")


class ModelModule(L.LightningModule):
    """Loads ``model`` (hub name, local folder or ``lethe:`` alias) with lethe's loader.

    Subclasses get ``self.model``, ``self.tokenizer``, ``self.adapter`` and
    ``self.family``; datamodules ask the running module for its tokenizer and
    family, so a preset names the model once.
    """

    def __init__(self, model: str, dtype: str = "float32", trust_remote_code: bool = False,
                 tokenizer: str | None = None) -> None:
        super().__init__()
        loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.adapter = loaded.adapter
        self.family = loaded.family
        self.model_source = loaded.source

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm.forward_logits(self.model, batch, self.family)

    def save_model(self, dest: str | Path) -> Path:
        """Save the (edited / unlearned) model as a Hugging Face folder, atomically."""
        return save_pretrained(self.model, self.tokenizer, dest)
