"""KnowledgeEditor (KE; De Cao et al., 2021): the hypernetwork conditioned on the edit's text, and its editor.

The edit is read as ``"{old answer} >> {new answer} || {input}"``: the base model's own token embeddings
(frozen, not copied) → a one-layer BiLSTM → a tanh layer → a condition vector c. Per edited matrix
(m×n) a small MLP on c gives a_row (m), a_col (n), b_row (m), b_col (n) and a gate η, which with the
gradient ∇W of the label-smoothed NLL of the new answer give the update

    A = softmax(a_row) a_colᵀ,  B = softmax(b_row) b_colᵀ,  ΔW = −max_scale · σ(η) · (∇W ⊙ A + B).

Training (``lethe fit --config configs/edit/ke_<family>.yaml``) minimises the (label-smoothed) NLL of the
new answer on the rewrite prompt and its paraphrases under the constraint KL(original ‖ edited) ≤ margin
on other inputs (the neighbourhood prompts), as a Lagrangian: loss = CE + λ (KL − margin), λ ≥ 0 raised
by gradient ascent; the margin shrinks linearly from margin_max to margin_min over margin_steps.
Batched editing sums the per-request updates (each request has its own text and gradient).

``precondition`` (not in the paper): the gradient's input factor x of each MLP output projection is replaced by
x M, M = (C + ρ·c̄·I)⁻¹ · c̄ with C = E[k kᵀ] of that matrix's inputs over a corpus (lethe's covariance cache)
and c̄ = tr C / d, ROME's key direction C⁻¹k, scaled to leave an isotropic C alone. The elementwise masks A and B
can only reweight coordinates; M takes out what every input shares (a relation's template), so an update from
one prompt moves less on the prompts that share only its template. M is a buffer of the network, saved with it,
so an editor applied elsewhere uses the M it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lethe.hypernetworks import (
    HyperNet,
    HypernetEditor,
    Site,
    site_key,
)
from lethe.records import EditRequest


def condition_text(req: EditRequest) -> str:
    return f"{req.target_true or ''} >> {req.target_new} || {req.rewrite_prompt}"


class KENet(HyperNet):
    """Text encoder + per-matrix conditioners; the base model's embeddings are read, never trained."""

    method = "ke"

    @classmethod
    def from_hparams(cls, hparams: dict, sites: list[Site], loaded) -> KENet:
        """The network a training run with these hyperparameters (its checkpoint's) built."""
        embed_dim = loaded.adapter.embeddings(loaded.model).weight.shape[1]
        return cls(sites, embed_dim, hparams.get("lstm_hidden", 128), hparams.get("cond_dim", 256),
                   hparams.get("hidden", 128), hparams.get("max_scale", 1.0), hparams.get("smoothing", 0.1),
                   preconditioned_sites(sites, loaded.adapter, loaded.model, hparams.get("stack"))
                   if hparams.get("precondition") else ())

    def __init__(self, sites: Sequence[Site], embed_dim: int, lstm_hidden: int = 128, cond_dim: int = 256,
                 hidden: int = 128, max_scale: float = 1.0, smoothing: float = 0.1,
                 preconditioned: Sequence[str] = ()) -> None:
        super().__init__(sites)
        # precondition: per site key, M (in × in), identity until set (module docstring)
        self.preconditioned = list(preconditioned)
        for s in self.sites:
            if site_key(s) in self.preconditioned:
                self.register_buffer(f"whiten__{site_key(s)}", torch.eye(s.in_features))
        self.lstm = nn.LSTM(embed_dim, lstm_hidden, batch_first=True, bidirectional=True)
        self.to_cond = nn.Sequential(nn.Linear(2 * lstm_hidden, cond_dim), nn.Tanh())
        self.conditioners = nn.ModuleDict({
            site_key(s): nn.Sequential(nn.Linear(cond_dim, hidden), nn.Tanh(),
                                       nn.Linear(hidden, 2 * (s.out_features + s.in_features) + 1))
            for s in self.sites})
        self.max_scale = max_scale
        self.smoothing = smoothing

    def condition(self, model, tok, requests: Sequence[EditRequest]) -> torch.Tensor:
        from lethe.adapters import get_adapter

        device = next(model.parameters()).device
        rows = [tok(condition_text(r), add_special_tokens=False)["input_ids"] or [tok.pad_token_id or 0]
                for r in requests]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), tok.pad_token_id or 0, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        with torch.no_grad():
            emb = get_adapter(model).embeddings(model)(ids.to(device)).float()
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.to_cond(torch.cat([h[-2], h[-1]], -1))  # final states of both directions

    def whitened(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        """The gradient's input factor, preconditioned where the site is (x M), else as it is."""
        if site_key(site) not in self.preconditioned:
            return x
        return x @ getattr(self, f"whiten__{site_key(site)}").to(x.dtype)

    def set_preconditioner(self, site: Site, cov: torch.Tensor, ridge: float) -> None:
        """M = (C + ρ·c̄·I)⁻¹ · c̄ (c̄ = tr C / d) from the inputs' second moment C, computed in float64."""
        c = cov.to(torch.float64)
        mean = float(torch.diagonal(c).mean())
        m = torch.linalg.inv(c + ridge * mean * torch.eye(c.shape[0], dtype=torch.float64)) * mean
        buf = getattr(self, f"whiten__{site_key(site)}")
        buf.copy_(((m + m.T) / 2).to(buf.dtype))

    def update_for(self, site: Site, c: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        m, n = site.shape
        col_a, row_a, col_b, row_b, eta = self.conditioners[site_key(site)](c).split([n, m, n, m, 1], -1)
        a = row_a.softmax(-1).unsqueeze(1) * col_a.unsqueeze(0)
        b = row_b.softmax(-1).unsqueeze(1) * col_b.unsqueeze(0)
        return -self.max_scale * torch.sigmoid(eta) * (grad * a + b)

    def deltas(self, model, tok, family: str, requests: Sequence[EditRequest],
               groups: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
        groups = [list(g) for g in (groups or [range(len(requests))])]
        fac = self.factors(model, tok, family, requests)
        cond = self.condition(model, tok, requests)
        out = []
        for g in groups:
            d = {}
            for s in self.sites:
                total = None
                for i in g:
                    x, delta = fac.select(s, [i])
                    upd = self.update_for(s, cond[i], delta.T @ self.whitened(s, x))
                    total = upd if total is None else total + upd
                d[s.param] = total
            out.append(d)
        return out


def mlp_out_layers(adapter, model, stack: str | None = None) -> dict[str, int]:
    """Each MLP output projection's module name -> its block index."""
    return {adapter.mlp_out_name(i, stack): i for i in range(adapter.num_layers(model, stack))}


def preconditioned_sites(sites: Sequence[Site], adapter, model, stack: str | None = None) -> list[str]:
    """The site keys ``precondition`` applies to: the MLP output projections (whose inputs lethe's covariance
    cache measures)."""
    outs = mlp_out_layers(adapter, model, stack)
    return [site_key(s) for s in sites if s.module in outs]


class KEEditor(HypernetEditor):
    """``lethe edit`` with a trained KE checkpoint (see ``HypernetEditor`` for the arguments)."""

    name = "ke"
    method = "ke"
    net_class = KENet
