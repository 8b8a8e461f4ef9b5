"""Plain language-model training in all three families.

Used to pretrain lethe's world models, to fine-tune on TOFU before unlearning,
and as the constrained fine-tuning baseline of the editing benchmarks.
"""

from __future__ import annotations

from typing import Any

from lethe import lm
from lethe.checks import check_range
from lightning_modules.base import ModelModule


class LanguageModelModule(ModelModule):
    """Minimise the target-token cross-entropy of ``{input_ids, attention_mask, labels}`` batches.

    Args:
        model: hub name, local folder or ``lethe:`` alias.
        lr, weight_decay: AdamW; ``warmup_steps`` of linear warm-up, then constant or (``decay``) linear to 0.
        lora: None for full fine-tuning, else LoraConfig arguments (``r``, ``lora_alpha``, ``target_modules``).
        save_dir / save_mode: where the trained model goes at the end of fit: ``full`` (or ``merged`` for a LoRA
            run: the adapter folded in, a plain HF folder) or ``adapter`` (the LoRA weights alone); atomically.
    """

    def __init__(
        self,
        model: str,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        decay: bool = False,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        tokenizer: str | None = None,
        lora: dict[str, Any] | None = None,
        save_dir: str | None = None,
        save_mode: str = "auto",
    ) -> None:
        check_range(non_negative={"lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps})
        self.check_save_mode(save_mode, lora)
        super().__init__(model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        self.save_hyperparameters()
        if lora:
            self.wrap_lora(lora)
        self.model.train()

    def _step(self, batch):
        return lm.lm_loss(self(batch), batch["labels"], self.family, with_accuracy=True)

    def training_step(self, batch, batch_idx):
        loss, acc = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/token_acc", acc, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._step(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/token_acc", acc, prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        loss, acc = self._step(batch)
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/token_acc", acc, sync_dist=True)

    def configure_optimizers(self):
        opt = self.adamw([p for p in self.parameters() if p.requires_grad], self.hparams.lr, self.hparams.weight_decay)
        return self.with_schedule(opt, self.hparams.warmup_steps, self.hparams.decay)
