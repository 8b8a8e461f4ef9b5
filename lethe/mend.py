"""MEND (Mitchell et al., 2022): the gradient-decomposition editor network and its ``lethe edit`` editor.

For each edited matrix the edit's gradient ``∇W = Σ_t δ_t x_tᵀ`` is given to the editor as its rank-one
factors: every token's [x_t; δ_t], normalised by running mean/variance (kept per matrix; in DDP the
statistics are all-reduced, so every process normalises alike), goes through an MLP of low-rank
residual layers (identity at initialisation: the up-projection starts at zero) shared by all matrices
of one shape, with a per-matrix scale and shift before each layer. The output splits into ũ_t, δ̃_t
and the update is ``ΔW = −α_l Σ_t δ̃_t ũ_tᵀ`` with a learned per-matrix edit rate α_l (a descent step).

Training (``lethe fit --config configs/edit/mend_<family>.yaml``): only the editor trains, the base
model is frozen; loss = c_edit · NLL of target_new on the rewrite prompt and its paraphrases under the
edited weights + c_loc · KL(pre ‖ post) at the answers of unrelated (neighbourhood) prompts.
Applying: ``lethe edit`` with ``editor: mend`` and ``editor_args: {checkpoint: ...}`` (``MENDEditor``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lethe.hypernetworks import (
    HyperNet,
    HypernetEditor,
    Site,
    site_key,
)
from lethe.records import EditRequest


class LowRankResidual(nn.Module):
    """MEND's low-rank layer: y = x' + act(U V x' + b), x' = x · scale[mode] + shift[mode]; U starts at 0."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool) -> None:
        super().__init__()
        r = min(rank, dim)
        self.v = nn.Parameter(torch.empty(r, dim))
        nn.init.xavier_uniform_(self.v)
        self.u = nn.Parameter(torch.zeros(dim, r))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        x = x * self.scale[mode] + self.shift[mode]
        h = (x @ self.v.T) @ self.u.T + self.bias
        return x + (torch.relu(h) if self.relu else h)


class IdentityMLP(nn.Module):
    def __init__(self, dim: int, rank: int, n_modes: int, n_hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LowRankResidual(dim, rank, n_modes, relu=i < n_hidden)
                                    for i in range(n_hidden + 1))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mode)
        return x


class RunningNorm(nn.Module):
    """Cumulative mean/variance over every token row seen in training (float64 sums, DDP all-reduced)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        stats = torch.cat([rows.new_tensor([rows.shape[0]], dtype=torch.float64), rows.double().sum(0),
                           rows.double().pow(2).sum(0)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        d = self.total.shape[0]
        self.count += stats[0]
        self.total += stats[1:1 + d]
        self.total_sq += stats[1 + d:]

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return rows
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean.pow(2)).clamp(min=0)
        return ((rows.double() - mean) / (var.sqrt() + 1e-7)).to(rows.dtype)


class MENDNet(HyperNet):
    """The editor: per-matrix norms and edit rates, one identity-initialised MLP per matrix shape."""

    method = "mend"

    @classmethod
    def from_hparams(cls, hparams: dict, sites: list[Site], loaded) -> MENDNet:
        """The network a training run with these hyperparameters (its checkpoint's) built."""
        return cls(sites, rank=hparams.get("rank", 1920), n_hidden=hparams.get("n_hidden", 1),
                   alpha_init=hparams.get("alpha_init", 1e-4))

    def __init__(self, sites: Sequence[Site], rank: int = 1920, n_hidden: int = 1, alpha_init: float = 1e-4) -> None:
        super().__init__(sites)
        shapes = sorted({s.shape for s in self.sites})
        self.shape_key = {s.shape: f"{s.out_features}x{s.in_features}" for s in self.sites}
        self.mode = {}
        for shape in shapes:
            members = [s for s in self.sites if s.shape == shape]
            for i, s in enumerate(members):
                self.mode[s.module] = i
        self.mlps = nn.ModuleDict({
            f"{o}x{i}": IdentityMLP(o + i, rank, sum(1 for s in self.sites if s.shape == (o, i)), n_hidden)
            for o, i in shapes})
        self.x_norm = nn.ModuleDict({site_key(s): RunningNorm(s.in_features) for s in self.sites})
        self.d_norm = nn.ModuleDict({site_key(s): RunningNorm(s.out_features) for s in self.sites})
        self.alpha = nn.Parameter(torch.full((len(self.sites),), float(alpha_init)))

    def update_for(self, j: int, site: Site, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in) for one matrix from its token factors (x rows, δ rows)."""
        key = site_key(site)
        xn, dn = self.x_norm[key](x), self.d_norm[key](d)
        z = self.mlps[self.shape_key[site.shape]](torch.cat([xn, dn], -1), self.mode[site.module])
        u_t, d_t = z.split([site.in_features, site.out_features], -1)
        return -self.alpha[j] * (d_t.T @ u_t)

    def deltas(self, model, tok, family: str, requests: Sequence[EditRequest],
               groups: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
        groups = [list(g) for g in (groups or [range(len(requests))])]
        fac = self.factors(model, tok, family, requests)
        if self.training:
            for s in self.sites:
                self.x_norm[site_key(s)].update(fac.x[s.module])
                self.d_norm[site_key(s)].update(fac.delta[s.module])
        out = []
        for g in groups:
            d = {}
            for j, s in enumerate(self.sites):
                x, delta = fac.select(s, g)
                d[s.param] = self.update_for(j, s, x, delta)
            out.append(d)
        return out


class MENDEditor(HypernetEditor):
    """``lethe edit`` with a trained MEND checkpoint (see ``HypernetEditor`` for the arguments)."""

    name = "mend"
    method = "mend"
    net_class = MENDNet
