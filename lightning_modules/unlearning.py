"""Knowledge Unlearning (Jang et al. 2022) and its successors as one LightningModule.

A training batch is ``{"forget": batch, "retain": batch}`` (``retain`` optional), each a
:mod:`lethe.lm` batch. The objective is a forget term plus an optional retain term:

=============  ================  ===================  =================================
``method``     forget term       default retain term  reference model
=============  ================  ===================  =================================
``ga``         gradient ascent   none                 no
``graddiff``   gradient ascent   NLL (descent)        no
``ga_kl``      gradient ascent   KL to reference      yes (retain)
``npo``        NPO (beta=0.1)    none                 yes (forget)
``simnpo``     SimNPO            none                 no
``rmu``        RMU steering      RMU activation match yes (retain activations)
=============  ================  ===================  =================================

``retain_loss`` overrides the retain term (``none``, ``nll``, ``kl``; ``rmu`` only with
RMU), e.g. NPO+retain-NLL or SimNPO+KL.

The model is trained in full or through a LoRA adapter (``lora: {r: 8, ...}``). A frozen
reference, when the objective needs one, never doubles memory needlessly: with LoRA it is
the same model with the adapter switched off; in full fine-tuning it is a copy that
shares the (then frozen) token embeddings and tied LM head with the trained model.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lethe import lm
from lethe.hooks import Trace
from lethe.io import atomic_path, save_pretrained
from lightning_modules import unlearning_losses as L
from lightning_modules.base import ModelModule

METHODS: dict[str, tuple[str, str]] = {
    "ga": ("ga", "none"),
    "graddiff": ("ga", "nll"),
    "ga_kl": ("ga", "kl"),
    "npo": ("npo", "none"),
    "simnpo": ("simnpo", "none"),
    "rmu": ("rmu", "rmu"),
}
RETAIN_LOSSES = ("none", "nll", "kl", "rmu")


class UnlearningConfigError(ValueError):
    pass


def resolve_method(method: str, retain_loss: str | None) -> tuple[str, str]:
    """(forget term, retain term) of a preset's ``method`` / ``retain_loss``; clear errors for bad names."""
    if method not in METHODS:
        raise UnlearningConfigError(f"model.init_args.method={method!r} is not an unlearning method; "
                                    f"choose one of {sorted(METHODS)}")
    forget, retain = METHODS[method]
    if retain_loss is not None:
        if retain_loss not in RETAIN_LOSSES:
            raise UnlearningConfigError(f"model.init_args.retain_loss={retain_loss!r}: use one of {RETAIN_LOSSES}")
        if (retain_loss == "rmu") != (forget == "rmu") and retain_loss != "none":
            raise UnlearningConfigError("retain_loss 'rmu' goes with method 'rmu' only (and RMU needs it)")
        retain = retain_loss
    return forget, retain


def needs_retain(method: str, retain_loss: str | None = None) -> bool:
    return resolve_method(method, retain_loss)[1] != "none"


class UnlearningModule(ModelModule):
    """Unlearn a forget set, optionally anchored by a retain set.

    Args:
        model: hub name, local folder or ``lethe:`` alias of the trained model.
        method: see the module docstring.
        retain_loss: override the method's retain term.
        lr, weight_decay: AdamW (Jang et al. use Adam, lr 5e-5, no decay).
        forget_weight / retain_weight: weights of the two terms (RMU's alpha is ``retain_weight``).
        beta: NPO's beta (0.1) -- SimNPO uses ``simnpo_beta`` and ``simnpo_gamma``.
        rmu_layer / rmu_stack / rmu_coef / rmu_seed: the steered block, its stack (seq2seq), the
            steering coefficient c and the seed of the random direction u.
        lora: None for full fine-tuning, else LoraConfig arguments (``r``, ``lora_alpha``,
            ``target_modules``, ``lora_dropout``).
        share_embeddings: full fine-tuning with a reference: freeze the token embeddings (and a
            tied LM head) and share them with the reference instead of copying them.
        disable_dropout: the paper trains with dropout 0; it also makes resumed runs exact.
        save_dir / save_mode: where to write the result at the end of fit: ``adapter`` (LoRA
            weights alone), ``merged`` (adapter folded into a plain HF model) or ``full``.
    """

    def __init__(
        self,
        model: str,
        method: str = "ga",
        retain_loss: str | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        beta: float = 0.1,
        simnpo_beta: float = 2.5,
        simnpo_gamma: float = 0.0,
        rmu_layer: int | None = None,
        rmu_stack: str | None = None,
        rmu_coef: float = 6.5,
        rmu_seed: int = 0,
        lora: dict[str, Any] | None = None,
        share_embeddings: bool = True,
        disable_dropout: bool = True,
        save_dir: str | None = None,
        save_mode: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__(model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        self.save_hyperparameters()
        self.forget_loss, self.retain_loss = resolve_method(method, retain_loss)
        if save_mode not in ("auto", "adapter", "merged", "full"):
            raise UnlearningConfigError(f"save_mode={save_mode!r}: use auto, adapter, merged or full")
        if save_mode in ("adapter", "merged") and not lora:
            raise UnlearningConfigError(f"save_mode={save_mode!r} needs a LoRA adapter (set model.init_args.lora)")
        if disable_dropout:
            for m in self.model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        self.model.train()  # dropout is off (above); train mode only matters to modules that check it
        self.rmu_layer_name: str | None = None
        if self.forget_loss == "rmu":
            stack = rmu_stack or self.adapter.default_stack
            n_layers = self.adapter.num_layers(self.model, stack)
            layer = n_layers // 2 if rmu_layer is None else rmu_layer
            self.adapter.check_layer(self.model, layer, stack)
            self.rmu_stack = stack
            self.rmu_layer_name = self.adapter.block_name(layer, stack, self.model)
            width = self.model.config.get_text_config().hidden_size if hasattr(
                self.model.config, "get_text_config") else self.model.config.hidden_size
            self.register_buffer("rmu_control", rmu_coef * L.random_unit_vector(width, rmu_seed), persistent=True)
        self.needs_reference = self.forget_loss == "npo" or self.retain_loss in ("kl", "rmu")
        self.is_lora = bool(lora)
        if self.is_lora:
            self._wrap_lora(dict(lora))
        self._ref: list[nn.Module] = []  # a list so Lightning never registers, saves or optimises it
        if self.needs_reference and not self.is_lora:
            self._ref.append(self._frozen_copy(share_embeddings))

    # ------------------------------------------------------------------ model set-up

    def _wrap_lora(self, cfg: dict[str, Any]) -> None:
        from peft import LoraConfig, get_peft_model

        cfg.setdefault("r", 8)
        cfg.setdefault("lora_alpha", 2 * cfg["r"])
        cfg.setdefault("lora_dropout", 0.0)
        try:
            self.model = get_peft_model(self.model, LoraConfig(**cfg))
        except ValueError as err:
            raise UnlearningConfigError(f"model.init_args.lora {cfg}: {err}") from err

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

    def _logits(self, model, batch):
        return lm.forward_logits(model, batch, self.family)

    def _hidden(self, model, batch) -> torch.Tensor:
        with Trace(model, self.rmu_layer_name, retain_output=True, stop=True) as tr:
            model(**lm.model_inputs(batch, self.family))
        return tr.output

    def _rmu_mask(self, batch) -> torch.Tensor:
        if self.family == "seq2seq" and self.rmu_stack == "decoder":
            return batch["labels"] != lm.IGNORE
        return batch["attention_mask"].bool()

    def compute_loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one {forget, retain} batch and the terms to log (shared with the benchmark's plain loop)."""
        forget, retain = batch["forget"], batch.get("retain")
        h = self.hparams
        logs: dict[str, torch.Tensor] = {}
        if self.forget_loss == "rmu":
            hid = self._hidden(self.model, forget)
            loss_f = L.rmu_forget(hid, self._rmu_mask(forget), self.rmu_control)
        else:
            logits = self._logits(self.model, forget)
            if self.forget_loss == "ga":
                loss_f = L.gradient_ascent(logits, forget["labels"], self.family)
            elif self.forget_loss == "npo":
                logp, _ = L.sequence_logprob(logits, forget["labels"], self.family)
                with torch.no_grad(), self.reference() as ref:
                    ref_logp, _ = L.sequence_logprob(self._logits(ref, forget), forget["labels"], self.family)
                loss_f = L.npo(logp, ref_logp, h.beta)
            else:
                logp, n = L.sequence_logprob(logits, forget["labels"], self.family)
                loss_f = L.simnpo(logp, n, h.simnpo_beta, h.simnpo_gamma)
            logs["forget_nll"] = lm.lm_loss(logits.detach(), forget["labels"], self.family)
        loss = h.forget_weight * loss_f
        logs["forget_loss"] = loss_f.detach()
        if self.retain_loss != "none":
            if retain is None:
                raise UnlearningConfigError(f"method {h.method!r} with retain loss {self.retain_loss!r} needs a "
                                            "retain set: give data.init_args.retain (or retain_texts)")
            if self.retain_loss == "rmu":
                hid = self._hidden(self.model, retain)
                with torch.no_grad(), self.reference() as ref:
                    ref_hid = self._hidden(ref, retain)
                loss_r = L.rmu_retain(hid, ref_hid, self._rmu_mask(retain))
            else:
                logits_r = self._logits(self.model, retain)
                if self.retain_loss == "nll":
                    loss_r = L.retain_nll(logits_r, retain["labels"], self.family)
                else:
                    with torch.no_grad(), self.reference() as ref:
                        ref_logits = self._logits(ref, retain)
                    loss_r = L.kl_to_reference(logits_r, ref_logits, retain["labels"], self.family)
                logs["retain_nll"] = lm.lm_loss(logits_r.detach(), retain["labels"], self.family)
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
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ results

    def merged_model(self) -> nn.Module:
        """The adapter folded into a copy of the base weights (the training model is left as it is)."""
        if not self.is_lora:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def save_result(self, dest: str | Path, mode: str = "auto") -> Path:
        """Write the unlearned model: LoRA adapter alone, merged model, or the full model; atomically."""
        mode = ("adapter" if self.is_lora else "full") if mode == "auto" else mode
        if mode == "adapter":
            if not self.is_lora:
                raise UnlearningConfigError("save_mode 'adapter' needs a LoRA run")
            with atomic_path(dest, is_dir=True) as tmp:
                self.model.save_pretrained(str(tmp))
                self.tokenizer.save_pretrained(str(tmp))
            return Path(dest)
        return save_pretrained(self.merged_model(), self.tokenizer, dest)

    def on_fit_end(self) -> None:
        if self.hparams.save_dir and self.trainer.is_global_zero:
            self.save_result(self.hparams.save_dir, self.hparams.save_mode)
