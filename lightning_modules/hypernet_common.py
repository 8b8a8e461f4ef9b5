"""The LightningModule base of MEND and KnowledgeEditor training: the base model frozen, the editor trained
on batches of edit requests, checkpoints holding the editor only. The shared pieces (edited matrices,
gradient factors, losses, checkpoint checks) are in :mod:`lethe.hypernetworks`.

Validation edits the validation requests with the current editor and logs, besides the losses, the
CounterFact scores of the benchmarks (``val/efficacy`` and ``val/paraphrase``: the new object beats the true one
on the rewrite prompt / its paraphrases; ``val/neighborhood``: share of neighbour prompts whose true object still
beats the edit's new object, of those where the unedited model prefers it) and ``val/selection``: that
neighbourhood score when validation success (``success_metric``: exact-match ``edit_success`` or ``efficacy``)
reaches ``success_floor``, else success - 1 (below every run that reaches it). The best checkpoint is
the one with the highest ``val/selection`` (``lethe fit`` keeps it as ``checkpoints/best.ckpt``), and the editor
exported when the fit ends is that checkpoint's, not the last step's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics import MeanMetric

from lethe import lm
from lethe.evaluation import locality_pairs, neighbor_pairs
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

SELECTION = "val/selection"
# what success_floor applies to: exact match of the new object (greedy decoding yields it), or CounterFact efficacy
# (the edited model prefers the new object to the true one: the benchmarks' efficacy)
SUCCESS_METRICS = ("edit_success", "efficacy")


# ----- the LightningModule base ------------------------------------------------------------------------
class HypernetModule(ModelModule):
    """Trains a ``HyperNet`` on batches of edit requests; the base model stays frozen (and in eval mode).

    ``success_floor`` / ``success_metric``: the validation success a checkpoint needs before its neighbourhood
    score selects it, measured as ``edit_success`` (greedy decoding yields the new object) or ``efficacy``
    (CounterFact: the edited model prefers the new object to the true one, the benchmarks' efficacy).
    ``c_rival``: weight of a neighbour-margin loss beside the papers' (0, the default, is the papers' loss): on each
    training request's neighbour prompts, how far the edit lowers NLL(new object) - NLL(true object) below the
    unedited model's. The KL barely sees a rival object whose probability rises from 1% to 5%, and that is what
    flips a CounterFact neighbour whose true object had 4%.

    Each training batch is a list of requests, cut into groups of ``edits_per_step`` requests that are
    edited jointly; every group is one independent edit of the original model, and the loss is the mean
    over groups (so N processes with batch B/N give the gradient of one process with batch B).
    """

    method = "hypernet"
    META_KEY = EDITOR_META_KEY

    selection_metric = SELECTION

    def __init__(self, model: str, layers: list[int], kinds: list[str], stack: str | None, edits_per_step: int,
                 max_length: int | None, dtype: str, trust_remote_code: bool, tokenizer: str | None,
                 success_floor: float = 0.9, c_rival: float = 0.0, success_metric: str = "edit_success") -> None:
        super().__init__(model, dtype=dtype, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        if success_metric not in SUCCESS_METRICS:
            raise ValueError(f"model.init_args.success_metric: {success_metric!r} is not one of "
                             f"{', '.join(SUCCESS_METRICS)}")
        self.success_floor = float(success_floor)
        self.success_metric = success_metric
        self.c_rival = float(c_rival)  # weight of the neighbour-margin loss (edit_losses' ``rival``); 0: the papers' loss
        # validation means over every batch and process, for the selection metric
        self.val_success = MeanMetric()
        self.val_neighborhood = MeanMetric()
        self.val_efficacy = MeanMetric()
        self.val_paraphrase = MeanMetric()
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
                    groups: list[list[int]], contrast: bool = False) -> dict[str, torch.Tensor]:
        """Edit NLL (rewrite + paraphrases), locality KL and metrics, averaged over independent groups.
        ``contrast``: also score each neighbour prompt's new object, for the CounterFact neighbourhood score
        (``neighborhood``: over the neighbour prompts the unedited model gets right, ``n_neighbours`` of them).
        With ``c_rival`` > 0 training scores them too, with gradients, for ``rival``: the mean fall of each
        neighbour's margin NLL(new) - NLL(true) below the unedited model's (0 where it does not fall)."""
        tok, family, device = self.tokenizer, self.family, self.device
        nll, kl, succ, para, draw, nb, riv, eff, cf_para = [], [], [], [], [], [], [], [], []
        with_rivals = contrast or self.c_rival > 0
        for g, deltas in zip(groups, deltas_per_group):
            reqs = [requests[i] for i in g]
            gen, loc, gen_owner, loc_owner = self._eval_batches(reqs)
            # the neighbour prompts with the edit's new object (requests whose locality pairs are neighbours)
            rival, rival_owner = [], []
            if with_rivals:
                for i, r in enumerate(reqs):
                    if not r.loc_prompts:
                        rival += [(p, r.target_new) for p, _ in neighbor_pairs(r)]
                        rival_owner += [i] * len(r.neighborhood_prompts)
            # validation: the edit prompts with the true object, for CounterFact efficacy / paraphrase
            olds = [j for j, o in enumerate(gen_owner) if reqs[o].target_true] if contrast else []
            old = [(gen[j][0], reqs[gen_owner[j]].target_true) for j in olds]
            pairs = gen + loc + rival + old
            batch = lm.to_device(encode(tok, family, pairs, self.max_length, "prompt/target pair",
                                        [reqs[i] for i in gen_owner + loc_owner + rival_owner]
                                        + [reqs[gen_owner[j]] for j in olds]), device)
            post = edited_logits(self.model, family, batch, deltas, self.sites)
            if old:
                no = len(old)
                with torch.no_grad():
                    wins = token_loss(post[olds], batch["labels"][olds], family) < token_loss(
                        post[-no:], batch["labels"][-no:], family)
                is_first = [j == 0 or gen_owner[j] != gen_owner[j - 1] for j in olds]
                eff.append(wins[torch.tensor(is_first, device=device)].float())
                cf_para.append(wins[~torch.tensor(is_first, device=device)].float())
                batch = {k: v[:-no] for k, v in batch.items()}
                post = post[:-no]
            ng = len(gen)
            gen_nll = token_loss(post[:ng], batch["labels"][:ng], family)
            nll.append(gen_nll.mean())
            em = exact_match(post[:ng].detach(), batch["labels"][:ng], family)
            first = torch.tensor([j == 0 or gen_owner[j] != gen_owner[j - 1] for j in range(ng)], device=device)
            succ.append(em[first].mean())
            if (~first).any():
                para.append(em[~first].mean())
            nl = len(loc)
            if loc:
                loc_batch = {k: v[ng:ng + nl] for k, v in batch.items()}
                with torch.no_grad():
                    pre = lm.forward_logits(self.model, loc_batch, family)
                kl.append(kl_at_labels(pre, post[ng:ng + nl], loc_batch["labels"], family).mean())
                draw.append(changed_tokens(pre, post[ng:ng + nl].detach(), loc_batch["labels"], family))
            if rival:
                # rival rows follow their requests' neighbour rows in the same order (no loc_prompts: loc = neighbours)
                true_rows = [ng + j for j, o in enumerate(loc_owner) if not reqs[o].loc_prompts]
                rival_batch = {k: v[ng + nl:] for k, v in batch.items()}
                with torch.no_grad():
                    pre_new = token_loss(lm.forward_logits(self.model, rival_batch, family), rival_batch["labels"],
                                         family)
                    pre_true = token_loss(pre[[j - ng for j in true_rows]], batch["labels"][true_rows], family)
                true_nll = token_loss(post[true_rows], batch["labels"][true_rows], family)
                new_nll = token_loss(post[ng + nl:], rival_batch["labels"], family)
                if self.c_rival > 0:
                    riv.append(torch.relu((pre_new - pre_true) - (new_nll - true_nll)).mean())
                # scored only where the unedited model prefers the true object (as the benchmarks do)
                known = pre_true < pre_new
                nb.append((true_nll.detach() < new_nll.detach())[known].float())
        zero = torch.zeros((), device=device)
        return {
            "edit_nll": torch.stack(nll).mean(),
            "loc_kl": torch.stack(kl).mean() if kl else zero,
            "rival": torch.stack(riv).mean() if riv else zero,
            "edit_success": torch.stack(succ).mean(),
            "paraphrase_success": torch.stack(para).mean() if para else zero,
            "drawdown": torch.stack(draw).mean() if draw else zero,
            **({"neighborhood": torch.cat(nb).mean(), "n_neighbours": sum(len(x) for x in nb)}
               if sum(len(x) for x in nb) else {}),
            **({"efficacy": torch.cat(eff).mean(), "n_efficacy": sum(len(x) for x in eff)}
               if sum(len(x) for x in eff) else {}),
            **({"paraphrase": torch.cat(cf_para).mean(), "n_paraphrase": sum(len(x) for x in cf_para)}
               if sum(len(x) for x in cf_para) else {}),
        }

    def combine_loss(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, requests: Sequence[EditRequest], stage: str) -> torch.Tensor:
        groups = self._groups(len(requests))
        deltas = self.net.deltas(self.model, self.tokenizer, self.family, requests, groups)
        parts = self.edit_losses(requests, deltas, groups, contrast=stage == "val")
        loss = self.combine_loss(parts)
        n = len(requests)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        for k in ("edit_nll", "loc_kl", "edit_success", "paraphrase_success", "drawdown") + (("rival",) if self.c_rival
                                                                                              else ()):
            self.log(f"{stage}/{k}", parts[k], prog_bar=k in ("edit_success", "drawdown"), sync_dist=True,
                     batch_size=n)
        if stage == "val":
            if self.success_metric == "efficacy" and "efficacy" in parts:
                self.val_success.update(parts["efficacy"], parts["n_efficacy"])
            else:
                self.val_success.update(parts["edit_success"].detach(), n)
            for k in ("efficacy", "paraphrase"):
                if k in parts:
                    getattr(self, f"val_{k}").update(parts[k], parts[f"n_{k}"])
            if "neighborhood" in parts:
                self.val_neighborhood.update(parts["neighborhood"], parts["n_neighbours"])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        with torch.inference_mode(False):
            self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """``val/neighborhood`` and ``val/selection`` from the whole validation set (all processes)."""
        if self.val_success.update_count == 0:
            return
        success = self.val_success.compute()
        has_nb = self.val_neighborhood.update_count > 0
        # requests with unrelated loc prompts only (zsRE form): locality is then 1 - drawdown
        nb = self.val_neighborhood.compute() if has_nb else 1 - self.trainer.callback_metrics.get(
            "val/drawdown", torch.zeros(()))
        if has_nb:
            self.log("val/neighborhood", nb, sync_dist=False)
        for k in ("efficacy", "paraphrase"):
            metric = getattr(self, f"val_{k}")
            if metric.update_count > 0:
                self.log(f"val/{k}", metric.compute(), sync_dist=False)
            metric.reset()
        selection = torch.where(success >= self.success_floor, nb.to(success), success - 1)
        self.log(SELECTION, selection, prog_bar=True, sync_dist=False)
        self.val_success.reset()
        self.val_neighborhood.reset()

    # ----- checkpoints: the editor only ---------------------------------------------------------------
    def on_fit_end(self) -> None:
        """Export the trained editor as safetensors + JSON (``<run>/editor``), the form to share and to load
        with ``lethe edit`` (editor_args.checkpoint): loading it runs no code."""
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            state = {f"net.{k}": v for k, v in self.net.state_dict().items()}
            training = {"steps": int(self.trainer.global_step),
                        "fit_seconds": round(time.perf_counter() - self._fit_t0, 1)}  # this fit call (not resumed parts)
            best = self.best_checkpoint()
            if best is not None:  # the editor chosen by validation, not the last step's
                ckpt = torch.load(best, map_location="cpu", weights_only=True)
                state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
                training.update(chosen_step=int(ckpt.get("global_step", -1)), chosen_by=SELECTION)
            meta = {**self.editor_meta(), "training": training}
            export_editor(state, dict(self.hparams), meta, Path(self.trainer.default_root_dir) / "editor")

    def on_fit_start(self) -> None:
        self._fit_t0 = time.perf_counter()

    def best_checkpoint(self) -> str | None:
        """The file of the best ``val/selection`` checkpoint this fit kept, if any."""
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None) == SELECTION and cb.best_model_path:
                return cb.best_model_path
        return None

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
