"""MEND editor training as a LightningModule (the editor network and ``lethe edit``'s editor: :mod:`lethe.mend`).

``lethe fit --config configs/edit/mend_<family>.yaml``: only the editor trains, the base model is
frozen; loss = c_edit · NLL of target_new on the rewrite prompt and its paraphrases under the edited
weights + c_loc · KL(pre ‖ post) at the answers of unrelated (neighbourhood) prompts (+ c_rival · the
neighbour-margin loss, off by default; see ``HypernetModule.edit_losses``).
"""

from __future__ import annotations

import torch

from lethe.checks import check_range
from lethe.hypernetworks import KINDS
from lethe.mend import MENDNet
from lightning_modules.hypernet_common import HypernetModule


class MENDModule(HypernetModule):
    """Train a MEND editor for ``model``.

    Args:
        model: the model to learn edits for (hub name, folder or lethe alias); frozen.
        layers / kinds / stack: the edited matrices — blocks (negative = from the last), which MLP
            projections (mlp_in, mlp_out), which stack (seq2seq: encoder or decoder).
        rank / n_hidden: the editor MLP's low-rank width and hidden layers (paper: rank 1920, 1 hidden).
        alpha_init: initial per-matrix edit rate α (paper 1e-4).
        lr / lr_alpha: Adam learning rates of the editor (paper 1e-6; tiny models need more) and of α.
        c_edit / c_loc: loss weights of the edit NLL and the locality KL (paper 0.1 / 1.0).
        edits_per_step: requests edited jointly in one training edit (batched editing).
        max_length: longest encoded edit (default: the model's context).
        success_floor / success_metric / c_rival: the checkpoint selection's floor and the optional neighbour-margin
            loss, shared by the hypernetwork editors (see ``HypernetModule``).
        lr_decay: both learning rates fall linearly to zero at the last step (steadier late training).
    """

    method = "mend"

    def __init__(self, model: str, layers: list[int] = [-3, -2, -1], kinds: list[str] = list(KINDS),  # noqa: B006
                 stack: str | None = None, rank: int = 1920, n_hidden: int = 1, alpha_init: float = 1e-4,
                 lr: float = 1e-4, lr_alpha: float = 1e-4, c_edit: float = 0.1, c_loc: float = 1.0,
                 edits_per_step: int = 1, max_length: int | None = None, dtype: str = "float32",
                 trust_remote_code: bool = False, tokenizer: str | None = None, success_floor: float = 0.9,
                 lr_decay: bool = False, c_rival: float = 0.0, success_metric: str = "edit_success") -> None:
        check_range(positive={"rank": rank},
                    non_negative={"lr": lr, "lr_alpha": lr_alpha, "c_edit": c_edit, "c_loc": c_loc})
        super().__init__(model, layers, kinds, stack, edits_per_step, max_length, dtype, trust_remote_code, tokenizer,
                         success_floor, c_rival, success_metric)
        self.save_hyperparameters()
        self.net = MENDNet(self.sites, rank=rank, n_hidden=n_hidden, alpha_init=alpha_init)
        self.net.max_length = self.max_length

    def combine_loss(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.hparams.c_edit * parts["edit_nll"] + self.hparams.c_loc * parts["loc_kl"]
                + self.c_rival * parts["rival"])

    def configure_optimizers(self):
        rest = [p for n, p in self.net.named_parameters() if n != "alpha"]
        opt = torch.optim.Adam([{"params": rest, "lr": self.hparams.lr},
                                {"params": [self.net.alpha], "lr": self.hparams.lr_alpha}])
        return self.with_schedule(opt, decay=self.hparams.lr_decay)

