"""Knowledge Neurons as an editor: attribution (``lethe.attribution``), then neuron edits as artifacts.

Nothing trains here. ``KnowledgeNeuronsEditor.edit`` attributes each request's TRUE object over its
prompts (the rewrite prompt plus its paraphrases: the paper's "several prompts of the same fact", so
the paraphrase score is not held out for this method), keeps the refined neurons and shifts their
value vectors from the old target's word embedding toward the new one's (v -= lambda_old E[old];
v += lambda_new E[new]; the FIRST token of a multi-token target). ``erase_artifact`` zeroes value
vectors (relation erasure). Both return applied ``EditArtifact`` s that save, re-apply and revert
like every other editor's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lethe import attribution as A
from lethe.edits import EditArtifact
from lethe.records import EditRequest


def _apply_in_place(loaded, deltas: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            if name not in before:
                before[name] = params[name].detach().clone()
            params[name].add_(d.to(params[name].device, params[name].dtype))


def erase_artifact(loaded, neurons: Sequence[A.Neuron], requests: Sequence[EditRequest] = (),
                   meta: dict | None = None) -> EditArtifact:
    """Zero the neurons' value vectors in ``loaded.model`` and return the applied artifact."""
    deltas = A.erase_deltas(loaded.model, neurons, loaded.adapter)
    before = EditArtifact.snapshot(loaded.model, deltas)
    _apply_in_place(loaded, deltas, {})
    return EditArtifact.from_weights("kn-erase", loaded.source, before, loaded.model, requests,
                                     {"neurons": [n.to_list() for n in neurons], **(meta or {})})


class KnowledgeNeuronsEditor:
    """``Editor`` for ``lethe edit`` (name ``kn``): requests are edited one after another."""

    name = "kn"

    def __init__(self, layers: list[int] | None = None, stacks: list[str] | None = None,
                 steps: int = A.DEFAULT_STEPS, threshold: float = A.DEFAULT_THRESHOLD,
                 share: float = A.DEFAULT_SHARE, lambda_old: float = 1.0, lambda_new: float = 8.0,
                 fallback_top_k: int = 3, max_prompts: int | None = 4, max_rows: int | None = 256,
                 progress: bool = False) -> None:
        self.layers, self.stacks, self.steps = layers, stacks, steps
        self.threshold, self.share = threshold, share
        self.lambda_old, self.lambda_new = lambda_old, lambda_new
        self.fallback_top_k, self.max_prompts, self.max_rows = fallback_top_k, max_prompts, max_rows
        self.progress = progress
        self.last_attributions: list[A.FactAttribution] = []

    def prompts(self, req: EditRequest) -> list[str]:
        prompts = [req.rewrite_prompt, *req.paraphrase_prompts]
        return prompts[: self.max_prompts] if self.max_prompts else prompts

    def neurons(self, loaded, req: EditRequest) -> tuple[list[A.Neuron], A.FactAttribution]:
        """The refined neurons of the request's true fact; the top-k by mean score if none survive."""
        if req.target_true is None:
            raise ValueError(f"case {req.case_id}: Knowledge Neurons attributes target_true, which is missing")
        fa = A.attribute(loaded.model, loaded.tokenizer, loaded.family, self.prompts(req), req.target_true,
                         self.layers, self.stacks, self.steps, self.threshold, self.share, self.max_rows,
                         adapter=loaded.adapter)
        neurons = list(fa.refined)
        if not neurons and self.fallback_top_k:
            neurons = top_neurons(fa, self.fallback_top_k)
            fa.meta["fallback_top_k"] = self.fallback_top_k
        return neurons, fa

    def edit(self, loaded, requests: Sequence[EditRequest]) -> EditArtifact:
        from tqdm.auto import tqdm

        before: dict[str, torch.Tensor] = {}
        self.last_attributions = []
        used = []
        for req in tqdm(requests, desc="kn edit", disable=not self.progress):
            neurons, fa = self.neurons(loaded, req)
            self.last_attributions.append(fa)
            used.append([n.to_list() for n in neurons])
            if not neurons:
                continue
            deltas = A.edit_deltas(loaded.model, loaded.tokenizer, neurons, req.target_true, req.target_new,
                                   self.lambda_old, self.lambda_new, loaded.adapter)
            _apply_in_place(loaded, deltas, before)
        meta = {"neurons": used, "lambda_old": self.lambda_old, "lambda_new": self.lambda_new,
                "steps": self.steps, "threshold": self.threshold, "share": self.share}
        return EditArtifact.from_weights("kn", loaded.source, before, loaded.model, requests, meta)


def top_neurons(fa: A.FactAttribution, k: int) -> list[A.Neuron]:
    """The k neurons with the highest mean score over the fact's prompts (any site)."""
    cands = []
    for stack, s in fa.scores.items():
        mean = s.mean(0)
        vals, idx = mean.flatten().topk(min(k, mean.numel()))
        for v, i in zip(vals.tolist(), idx.tolist()):
            cands.append((v, A.Neuron(stack, fa.layers[stack][i // mean.shape[1]], i % mean.shape[1])))
    return [n for _, n in sorted(cands, key=lambda c: -c[0])[:k]]
