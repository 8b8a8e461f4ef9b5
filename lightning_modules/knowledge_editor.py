"""KnowledgeEditor training as a LightningModule (the hypernetwork and ``lethe edit``'s editor:
:mod:`lethe.knowledge_editor`).

``lethe fit --config configs/edit/ke_<family>.yaml`` minimises the (label-smoothed) NLL of the new answer
on the rewrite prompt and its paraphrases under the constraint KL(original ‖ edited) ≤ margin on other
inputs, as a Lagrangian: loss = CE + λ (KL − margin), λ ≥ 0 raised by gradient ascent; the margin
shrinks linearly from margin_max to margin_min over margin_steps (+ c_rival · the neighbour-margin loss, off by
default; see ``HypernetModule.edit_losses``).
"""

from __future__ import annotations

import torch
from torch import nn

from lethe.checks import check_range
from lethe.covariance import layer_covariance
from lethe.hypernetworks import KINDS, site_key
from lethe.knowledge_editor import KENet, mlp_out_layers, preconditioned_sites
from lightning_modules.hypernet_common import HypernetModule


class KnowledgeEditorModule(HypernetModule):
    """Train a KnowledgeEditor for ``model``.

    Args:
        model / layers / kinds / stack / edits_per_step / max_length: as for MEND (the edited matrices).
        lstm_hidden / cond_dim / hidden: encoder and conditioner widths.
        max_scale: the update's scale bound (KE: 1).
        smoothing: label smoothing of the NLL whose gradient conditions the update and of the edit loss.
        lr: Adam learning rate of the hypernetwork; lr_lagrange: of the multiplier λ (gradient ascent).
        margin_max / margin_min / margin_steps: the KL margin, shrinking linearly over training steps.
        success_floor / success_metric / c_rival: the checkpoint selection's floor and the optional neighbour-margin
            loss, shared by the hypernetwork editors (see ``HypernetModule``).
        lr_decay: both learning rates fall linearly to zero at the last step (steadier late training).
        precondition / precondition_corpus / precondition_samples / precondition_ridge: the gradient's input
            factor at the MLP output projections times (C + ρ·c̄·I)⁻¹·c̄, C the inputs' second moment over
            ``precondition_samples`` texts of ``precondition_corpus`` (lethe's covariance cache; not in the
            paper, see :mod:`lethe.knowledge_editor`).
    """

    method = "ke"

    def __init__(self, model: str, layers: list[int] = [-3, -2, -1], kinds: list[str] = list(KINDS),  # noqa: B006
                 stack: str | None = None, lstm_hidden: int = 128, cond_dim: int = 256, hidden: int = 128,
                 max_scale: float = 1.0, smoothing: float = 0.1, lr: float = 3e-4, lr_lagrange: float = 1e-2,
                 margin_max: float = 0.1, margin_min: float = 0.01, margin_steps: int = 1000,
                 edits_per_step: int = 1, max_length: int | None = None, dtype: str = "float32",
                 trust_remote_code: bool = False, tokenizer: str | None = None, success_floor: float = 0.9,
                 lr_decay: bool = False, c_rival: float = 0.0, success_metric: str = "edit_success",
                 precondition: bool = False, precondition_corpus: str | list[str] = "pydoc", precondition_samples: int = 1000,
                 precondition_ridge: float = 1e-2) -> None:
        check_range(non_negative={"lr": lr, "lr_lagrange": lr_lagrange, "margin_min": margin_min,
                                  "precondition_ridge": precondition_ridge})
        super().__init__(model, layers, kinds, stack, edits_per_step, max_length, dtype, trust_remote_code, tokenizer,
                         success_floor, c_rival, success_metric)
        self.save_hyperparameters()
        embed_dim = self.adapter.embeddings(self.model).weight.shape[1]
        pre = preconditioned_sites(self.sites, self.adapter, self.model, stack) if precondition else []
        if precondition and not pre:
            raise ValueError("model.init_args.precondition: none of the edited matrices is an MLP output projection "
                             "(kinds needs mlp_out)")
        self.net = KENet(self.sites, embed_dim, lstm_hidden, cond_dim, hidden, max_scale, smoothing, pre)
        layer_of = mlp_out_layers(self.adapter, self.model, stack)
        for s in self.sites:
            if site_key(s) in pre:
                cov = layer_covariance(self.model, self.tokenizer, self.adapter, self.family, layer_of[s.module], stack,
                                       corpus=precondition_corpus, n_samples=precondition_samples,
                                       source=self.model_source)
                self.net.set_preconditioner(s, cov, precondition_ridge)
        self.net.max_length = self.max_length
        self.lagrange = nn.Parameter(torch.ones(()))

    def margin(self) -> float:
        h = self.hparams
        frac = min(1.0, self.global_step / max(1, h.margin_steps))
        return h.margin_max + (h.margin_min - h.margin_max) * frac

    def combine_loss(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        self.log("train/lagrange", self.lagrange.detach(), sync_dist=True, batch_size=1)
        return parts["edit_nll"] + self.lagrange * (parts["loc_kl"] - self.margin()) + self.c_rival * parts["rival"]

    def on_after_backward(self) -> None:
        if self.lagrange.grad is not None:  # gradient ascent on λ (a hook would not survive ddp_spawn)
            self.lagrange.grad.neg_()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.lagrange.clamp_(min=0.0)

    def configure_optimizers(self):
        opt = torch.optim.Adam([{"params": list(self.net.parameters()), "lr": self.hparams.lr},
                                {"params": [self.lagrange], "lr": self.hparams.lr_lagrange}])
        return self.with_schedule(opt, decay=self.hparams.lr_decay)

