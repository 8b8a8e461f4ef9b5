"""Knowledge Unlearning (Jang et al. 2022) and its successors as one LightningModule.

The objectives (GA, GradDiff, KL, NPO, SimNPO, RMU, and any registered later) are in
:mod:`lethe.unlearning`, each registered by name with its typed arguments; this module runs them on
``{"forget": batch, "retain": batch}`` training batches and logs their terms.

The model is trained in full or through a LoRA adapter (``lora: {r: 8, ...}``). A frozen
reference, when the objective needs one, never doubles memory needlessly: with LoRA it is
the same model with the adapter switched off; in full fine-tuning it is a copy that
shares the (then frozen) token embeddings and tied LM head with the trained model.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
from torch import nn

from lethe import lm
from lethe.checks import check_range
from lethe.hooks import Trace
from lethe.unlearning import (
    FORGET,
    RETAIN,
    UnlearningConfigError,
    build_objective,
    resolve_method,
)
from lightning_modules.base import ModelModule

# deprecated argument -> (objective it belongs to, its name in method_args)
DEPRECATED_ARGS = {"beta": ("npo", "beta"), "simnpo_beta": ("simnpo", "beta"), "simnpo_gamma": ("simnpo", "gamma"),
                   "rmu_layer": ("rmu", "layer"), "rmu_stack": ("rmu", "stack"), "rmu_coef": ("rmu", "coef"),
                   "rmu_seed": ("rmu", "seed")}


class UnlearningModule(ModelModule):
    """Unlearn a forget set, optionally anchored by a retain set.

    Args:
        model: hub name, local folder or ``lethe:`` alias of the trained model.
        method: a registered forget objective (``ga``, ``npo``, ``simnpo``, ``rmu``), a pairing (``graddiff``,
            ``ga_kl``) or an import path ``module:Class`` (see :mod:`lethe.unlearning`).
        method_args: the forget objective's arguments (NPO: ``{beta: 0.1}``; RMU: ``{layer, stack, coef, seed}``).
        retain_loss / retain_args: override the method's retain term (``none``, ``nll``, ``kl``, ``rmu``).
        lr, weight_decay: AdamW (Jang et al. use Adam, lr 5e-5, no decay).
        forget_weight / retain_weight: weights of the two terms (RMU's alpha is ``retain_weight``).
        lora: None for full fine-tuning, else LoraConfig arguments (``r``, ``lora_alpha``,
            ``target_modules``, ``lora_dropout``).
        share_embeddings: full fine-tuning with a reference: freeze the token embeddings (and a
            tied LM head) and share them with the reference instead of copying them.
        disable_dropout: the paper trains with dropout 0; it also makes resumed runs exact.
        save_dir / save_mode: where to write the result at the end of fit: ``adapter`` (LoRA
            weights alone), ``merged`` (adapter folded into a plain HF model) or ``full``.
        beta, simnpo_beta, simnpo_gamma, rmu_layer, rmu_stack, rmu_coef, rmu_seed: deprecated names of
            ``method_args`` entries (accepted for one release, with a warning).
    """

    def __init__(
        self,
        model: str,
        method: str = "ga",
        method_args: dict[str, Any] | None = None,
        retain_loss: str | None = None,
        retain_args: dict[str, Any] | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        lora: dict[str, Any] | None = None,
        share_embeddings: bool = True,
        disable_dropout: bool = True,
        save_dir: str | None = None,
        save_mode: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        tokenizer: str | None = None,
        beta: float | None = None,
        simnpo_beta: float | None = None,
        simnpo_gamma: float | None = None,
        rmu_layer: int | None = None,
        rmu_stack: str | None = None,
        rmu_coef: float | None = None,
        rmu_seed: int | None = None,
    ) -> None:
        check_range(non_negative={"lr": lr, "weight_decay": weight_decay, "forget_weight": forget_weight,
                                                        "retain_weight": retain_weight})
        super().__init__(model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        self.save_hyperparameters()
        forget_name, retain_name = resolve_method(method, retain_loss)
        method_args = dict(method_args or {})
        deprecated = {"beta": beta, "simnpo_beta": simnpo_beta, "simnpo_gamma": simnpo_gamma, "rmu_layer": rmu_layer,
                      "rmu_stack": rmu_stack, "rmu_coef": rmu_coef, "rmu_seed": rmu_seed}
        for old, value in deprecated.items():
            target, key = DEPRECATED_ARGS[old]
            if value is None:
                continue
            warnings.warn(f"model.init_args.{old} is deprecated: use model.init_args.method_args: {{{key}: ...}}",
                          DeprecationWarning, stacklevel=2)
            if target == forget_name:
                method_args.setdefault(key, value)
        self.forget_objective = build_objective(FORGET, forget_name, method_args, "method")
        self.retain_objective = build_objective(RETAIN, retain_name, retain_args, "retain_loss")
        self.forget_loss, self.retain_loss = forget_name, retain_name
        self.check_save_mode(save_mode, lora)
        if disable_dropout:
            for m in self.model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        self.model.train()  # dropout is off (above); train mode only matters to modules that check it
        self.rmu_layer_name: str | None = None
        self.forget_objective.setup(self)
        self.retain_objective.setup(self)
        self.needs_reference = self.forget_objective.needs_reference or self.retain_objective.needs_reference
        if lora:
            self.wrap_lora(lora)
        self._ref: list[nn.Module] = []  # a list so Lightning never registers, saves or optimises it
        if self.needs_reference and not self.is_lora:
            self._ref.append(self._frozen_copy(share_embeddings))

    # ------------------------------------------------------------------ model set-up

    def _frozen_copy(self, share_embeddings: bool) -> nn.Module:
        """A frozen reference copy; with ``share_embeddings`` it reuses the embedding/tied-head tensors."""
        memo: dict[int, Any] = {}
        if share_embeddings:
            shared = list(self.adapter.embeddings(self.model).parameters())
            head = self.adapter.lm_head_module(self.model)
            if head is not None and any(p is s for p in head.parameters() for s in shared):
                shared += list(head.parameters())  # tied: same tensor, already listed, kept frozen
            for p in shared:
                p.requires_grad_(False)
                memo[id(p)] = p
        ref = copy.deepcopy(self.model, memo)
        for p in ref.parameters():
            p.requires_grad_(False)
        ref.eval()
        return ref

    @contextlib.contextmanager
    def reference(self):
        """The frozen model: the LoRA base (adapter off) or the shared-embedding copy."""
        if self.is_lora:
            with self.model.disable_adapter():
                yield self.model
        else:
            if not self._ref:
                raise RuntimeError("this objective has no reference model")
            ref = self._ref[0]
            if next(ref.parameters()).device != self.device:
                ref.to(self.device)
            yield ref

    # ------------------------------------------------------------------ the objective

    def logits(self, model, batch):
        return lm.forward_logits(model, batch, self.family)

    def hidden(self, model, batch) -> torch.Tensor:
        """The output of the block an activation objective (RMU) steers."""
        with Trace(model, self.rmu_layer_name, retain_output=True, stop=True) as tr:
            model(**lm.model_inputs(batch, self.family))
        return tr.output

    def compute_loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one {forget, retain} batch and the terms to log (shared with the benchmark's plain loop)."""
        forget, retain = batch["forget"], batch.get("retain")
        h = self.hparams
        loss_f, logs = self.forget_objective(self, forget)
        loss = h.forget_weight * loss_f
        logs["forget_loss"] = loss_f.detach()
        if self.retain_loss != "none":
            if retain is None:
                raise UnlearningConfigError(f"method {h.method!r} with retain loss {self.retain_loss!r} needs a "
                                            "retain set: give data.init_args.retain (or retain_texts)")
            loss_r, retain_logs = self.retain_objective(self, retain)
            logs.update(retain_logs)
            loss = loss + h.retain_weight * loss_r
            logs["retain_loss"] = loss_r.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def training_step(self, batch, batch_idx):
        loss, logs = self.compute_loss(batch)
        n_tok = batch["forget"]["attention_mask"].sum()
        if "retain" in batch:
            n_tok = n_tok + batch["retain"]["attention_mask"].sum()
        # one call, batch size given (Lightning would otherwise walk the batch to infer it), rank-0 values: a
        # per-step all-reduce of each term would cost a collective per value per step under DDP; the forgetting
        # metrics (callbacks.forgetting) are the synchronised ones.
        logs["tokens"] = n_tok.float()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False,
                      batch_size=int(batch["forget"]["input_ids"].shape[0]))
        return loss

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.retain_loss != "none" and dm is not None and hasattr(dm, "has_retain"):
            dm.setup("fit")
            if not dm.has_retain:
                raise UnlearningConfigError(
                    f"method {self.hparams.method!r} uses a retain loss ({self.retain_loss}) but the datamodule has "
                    "no retain set: give data.init_args.retain / retain_texts / retain_pairs, or retain_loss: none")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return self.adamw(params, self.hparams.lr, self.hparams.weight_decay)
