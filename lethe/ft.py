"""FT-L (Zhu et al., 2020; the baseline of the ROME / MEMIT / AlphaEdit papers): constrained fine-tuning.

Only the MLP output projections of ``layers`` are trained, on the target NLL of the requests'
rewrite prompts (Adam, ``epochs`` passes over minibatches), and after every step each weight is
clamped back to within ``linf_eps`` of its value when the call began (‖ΔW‖∞ ≤ ε). It has no
per-edit structure, so its artifacts carry no factors: a batch can be reverted, single edits
cannot be rolled back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lethe import lm
from lethe.edits import EditArtifact, resolve_hparams
from lethe.records import EditRequest


@dataclass
class FTHyperParams:
    layers: list[int] = field(default_factory=lambda: [0])
    stack: str | None = None
    epochs: int = 10
    lr: float = 1e-2
    linf_eps: float = 5e-2
    batch_size: int = 64
    seed: int = 0


def ft_constrained(loaded, reqs: Sequence[EditRequest], params: Sequence[nn.Parameter], epochs: int, lr: float,
                   eps: float, batch_size: int = 64, seed: int = 0) -> None:
    """Fine-tune only ``params`` on the rewrite prompts' target NLL, keeping ‖ΔW‖∞ ≤ eps (FT-L / FT-W)."""
    model, tok, family = loaded.model, loaded.tokenizer, loaded.family
    device = params[0].device
    w0 = [p.detach().clone() for p in params]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(reqs), generator=gen).tolist()
            for s in range(0, len(order), batch_size):
                chunk = [reqs[i] for i in order[s:s + batch_size]]
                batch = lm.to_device(lm.encode_pairs(tok, family, [r.rewrite_prompt for r in chunk],
                                                     [r.target_new for r in chunk]), device)
                with torch.enable_grad():
                    loss = lm.sequence_nll(model, batch, family).mean()
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for p, w in zip(params, w0):
                        p.copy_(w + (p - w).clamp(-eps, eps))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


class FTEditor:
    """``Editor`` for ``lethe edit`` (``editor: ft``): FT-L on the MLP output projections of ``layers``."""

    name = "ft"
    hparams_class = FTHyperParams

    def __init__(self, hparams: FTHyperParams | dict | str | None = None, overrides: dict | None = None,
                 **_ignored) -> None:
        self.hp = resolve_hparams(FTHyperParams, "ft", hparams, **(overrides or {}))

    def edit(self, loaded, requests: Sequence[EditRequest]) -> EditArtifact:
        model, adapter, hp = loaded.model, loaded.adapter, self.hp
        names = [f"{adapter.mlp_out_name(adapter.check_layer(model, i, hp.stack), hp.stack)}.weight"
                 for i in hp.layers]
        before = EditArtifact.snapshot(model, names)
        params = dict(model.named_parameters())
        ft_constrained(loaded, list(requests), [params[n] for n in names], hp.epochs, hp.lr, hp.linf_eps,
                       hp.batch_size, hp.seed)
        return EditArtifact.from_weights("ft", loaded.source, before, model, requests,
                                         {"hparams": dataclasses.asdict(hp)})
