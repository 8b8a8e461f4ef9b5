"""The base every lethe LightningModule stands on: one model, loaded one way."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lethe import lm
from lethe.io import save_pretrained
from lethe.models import load_model


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
