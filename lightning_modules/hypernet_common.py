"""The LightningModule base of MEND and KnowledgeEditor training: the base model frozen, the editor trained
on batches of edit requests, checkpoints holding the editor only. The shared pieces (edited matrices,
gradient factors, losses, checkpoint checks) are in :mod:`lethe.hypernetworks`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lethe import lm
from lethe.evaluation import locality_pairs
from lethe.hypernetworks import (
    EDITOR_META_KEY,
    EditorCheckpointError,
    changed_tokens,
    check_meta,
    context_length,
    edited_logits,
    editor_meta,
    encode,
    exact_match,
    export_editor,
    kl_at_labels,
    resolve_sites,
    token_loss,
)
from lethe.records import EditRequest
from lightning_modules.base import ModelModule


# ----- the LightningModule base ------------------------------------------------------------------------
class HypernetModule(ModelModule):
    """Trains a ``HyperNet`` on batches of edit requests; the base model stays frozen (and in eval mode).

    Each training batch is a list of requests, cut into groups of ``edits_per_step`` requests that are
    edited jointly; every group is one independent edit of the original model, and the loss is the mean
    over groups (so N processes with batch B/N give the gradient of one process with batch B).
    """

    method = "hypernet"
    META_KEY = EDITOR_META_KEY

    def __init__(self, model: str, layers: list[int], kinds: list[str], stack: str | None, edits_per_step: int,
                 max_length: int | None, dtype: str, trust_remote_code: bool, tokenizer: str | None) -> None:
        super().__init__(model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        self.model.requires_grad_(False)
        self.model.eval()
        self.sites = resolve_sites(self.model, self.adapter, layers, kinds, stack)
        self.max_length = max_length or context_length(self.model)
        self.edits_per_step = max(1, int(edits_per_step))

    # base model: frozen, eval mode (no dropout) whatever Lightning toggles
    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # requests are text

    def editor_meta(self) -> dict:
        return editor_meta(self.model, self.adapter, self.model_source, self.sites, self.method)

    # ----- losses -----------------------------------------------------------------------------------
    def _groups(self, n: int) -> list[list[int]]:
        k = self.edits_per_step
        return [list(range(i, min(n, i + k))) for i in range(0, n, k)]

    def _eval_batches(self, requests: Sequence[EditRequest]):
        """Per request: the generalisation pairs (rewrite + paraphrases → target_new) and locality pairs."""
        gen, loc, gen_owner, loc_owner = [], [], [], []
        for i, r in enumerate(requests):
            for p in [r.rewrite_prompt, *r.paraphrase_prompts]:
                gen.append((p, r.target_new))
                gen_owner.append(i)
            for pair in locality_pairs(r):
                loc.append(pair)
                loc_owner.append(i)
        return gen, loc, gen_owner, loc_owner

    def edit_losses(self, requests: Sequence[EditRequest], deltas_per_group: list[dict[str, torch.Tensor]],
                    groups: list[list[int]]) -> dict[str, torch.Tensor]:
        """Edit NLL (rewrite + paraphrases), locality KL and metrics, averaged over independent groups."""
        tok, family, device = self.tokenizer, self.family, self.device
        nll, kl, succ, para, draw = [], [], [], [], []
        for g, deltas in zip(groups, deltas_per_group):
            reqs = [requests[i] for i in g]
            gen, loc, gen_owner, loc_owner = self._eval_batches(reqs)
            pairs = gen + loc
            batch = lm.to_device(encode(tok, family, pairs, self.max_length, "prompt/target pair",
                                        [reqs[i] for i in gen_owner + loc_owner]), device)
            post = edited_logits(self.model, family, batch, deltas, self.sites)
            ng = len(gen)
            gen_nll = token_loss(post[:ng], batch["labels"][:ng], family)
            nll.append(gen_nll.mean())
            em = exact_match(post[:ng].detach(), batch["labels"][:ng], family)
            first = torch.tensor([j == 0 or gen_owner[j] != gen_owner[j - 1] for j in range(ng)], device=device)
            succ.append(em[first].mean())
            if (~first).any():
                para.append(em[~first].mean())
            if loc:
                loc_batch = {k: v[ng:] for k, v in batch.items()}
                with torch.no_grad():
                    pre = lm.forward_logits(self.model, loc_batch, family)
                kl.append(kl_at_labels(pre, post[ng:], loc_batch["labels"], family).mean())
                draw.append(changed_tokens(pre, post[ng:].detach(), loc_batch["labels"], family))
        zero = torch.zeros((), device=device)
        return {
            "edit_nll": torch.stack(nll).mean(),
            "loc_kl": torch.stack(kl).mean() if kl else zero,
            "edit_success": torch.stack(succ).mean(),
            "paraphrase_success": torch.stack(para).mean() if para else zero,
            "drawdown": torch.stack(draw).mean() if draw else zero,
        }

    def combine_loss(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, requests: Sequence[EditRequest], stage: str) -> torch.Tensor:
        groups = self._groups(len(requests))
        deltas = self.net.deltas(self.model, self.tokenizer, self.family, requests, groups)
        parts = self.edit_losses(requests, deltas, groups)
        loss = self.combine_loss(parts)
        n = len(requests)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        for k in ("edit_nll", "loc_kl", "edit_success", "paraphrase_success", "drawdown"):
            self.log(f"{stage}/{k}", parts[k], prog_bar=k in ("edit_success", "drawdown"), sync_dist=True,
                     batch_size=n)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        with torch.inference_mode(False):
            self._step(batch, "val")

    # ----- checkpoints: the editor only ---------------------------------------------------------------
    def on_fit_end(self) -> None:
        """Export the trained editor as safetensors + JSON (``<run>/editor``), the form to share and to load
        with ``lethe edit`` (editor_args.checkpoint): loading it runs no code."""
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            state = {f"net.{k}": v for k, v in self.net.state_dict().items()}
            export_editor(state, dict(self.hparams), self.editor_meta(),
                          Path(self.trainer.default_root_dir) / "editor")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")}
        checkpoint[self.META_KEY] = self.editor_meta()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(self.META_KEY)
        if saved is None:
            raise EditorCheckpointError(f"this checkpoint holds no {self.method} editor (no {self.META_KEY!r} entry)")
        check_meta(saved, self.editor_meta(), "the checkpoint")
        # the base weights are not saved: put this (verified) model's own back so strict loading works
        checkpoint["state_dict"].update({f"model.{k}": v for k, v in self.model.state_dict().items()})
