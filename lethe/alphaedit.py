"""AlphaEdit (Fang et al., ICLR 2025, "Null-Space Constrained Knowledge Editing"): MEMIT for long streams.

MEMIT's least-squares update trades the new facts against the keys the model usually sees
(λ C) and knows nothing of the edits made before it, so after a few hundred sequential edits
the updates pile into the same directions and the model collapses. AlphaEdit keeps MEMIT's
targets z and keys K and changes only the update step (``update_step``, the one seam MEMIT
offers):

- P = projector onto the null space of the preserved keys: the eigenvectors of C = E[k kᵀ]
  (lethe's covariance cache) whose eigenvalues are below ``nullspace_threshold`` (the reference's
  absolute rule, 2e-2). A perturbation ΔW P leaves every preserved key's output alone. Being absolute, the
  threshold does not carry over between models: the world decoder's C has eigenvalues up to ~98 (3.0 leaves
  95-99% of its 512 directions null), SmolLM2's up to 0.4-2.0 (3.0 leaves all 1536: P = I). Each artifact
  records ``meta["null_space"]`` (layer -> null dimension, key dimension, largest eigenvalue), and a threshold
  above every eigenvalue warns.
- G = Σ k kᵀ over the keys of the edits made earlier in the stream (this editor's own calls, or
  the artifact a resumed run starts from), so a new batch does not overwrite them either.
- Preserved facts (optional, ``preserve_source`` / ``preserve_weight`` β): C + β·mean k kᵀ over the keys, at
  the edit position, of the rewrite prompts of facts the model should keep (e.g. ``world:train``,
  ``real_facts``, a CounterFact file). A corpus covariance averages over every token, so the few keys at
  which a model recalls facts sit in its small eigen-directions, inside the "null" space; where a model
  recalls facts at the prediction position (lethe's world decoder), every same-relation fact then bleeds.
  Facts whose subject the stream edits (this batch or earlier) are left out of the preserved set (one
  does not preserve the fact being rewritten), so P is rebuilt per call, an eigh of an in × in matrix.
  With ``preserve_gram_weight`` γ > 0 the same keys also join the soft term beside G (γ · Σ k kᵀ): the update
  is kept off each preserved fact's key in least squares, as off an earlier edit's, where P's hard rule keeps
  only the directions above the threshold. Not in the paper; on the world decoder it trades efficacy for
  untouched-fact recall (configs/edit/alphaedit_decoder.yaml).
- Fresh keys, optional (``refresh_keys``): G and the preserved facts' keys are otherwise the keys as each
  edit was written and as the unedited model computed them. An edit of a lower layer moves every key above
  it, so with several edited layers the later updates are kept off stale keys. With ``refresh_keys`` both are
  read on the model as it is at each call and layer (one forward over the earlier edits' rows and the kept
  preserved facts per layer and call): on the world decoder's tuning stream, untouched-fact recall after 750
  edits 0.83 -> 0.87 with efficacy 0.94 -> 0.945 (configs/edit/alphaedit_decoder.yaml). A resumed or
  rolled-back stream reads them from the weights it has, so it matches the uninterrupted run; the artifact's
  stored keys still serve rollback.
- Lapsed edits written again, optional (``reassert_edits``, needs ``refresh_keys``): before each call, every
  earlier edit of the stream whose new object no longer beats the true one on its rewrite prompt (or on one of
  the ``edit_prompts`` phrasings it was written at; never its held-out paraphrases) joins the
  call's requests (a new z and key on the current model, same case id) and its own keys leave G for that call
  (G would otherwise hold the lapsed output where it is). ``meta["reasserted"]`` lists every edit a call wrote
  again (lapsed earlier ones and, with passes, its own); a rollback of such an edit takes every row written for it. With ``reassert_passes`` n, the call's own edits
  that do not win yet after it are written again, up to n more passes (a strongly protected update writes a
  new edit only in part). Not in the paper: the null space and G slow the drift of earlier edits, they do not
  stop it; this repairs what drifted, at one forward per earlier edit per call and pass.
- Preserved outputs pulled back, optional (``anchor_preserved`` α, needs ``refresh_keys``): P and γ bound what
  one update does to a preserved key's output, measured from the model the update starts on; over a stream
  the small moves add up (on the world decoder's tuning stream, 15 of 353 untouched facts lost after 750
  edits, each through the MLP outputs at its prompt's last position: with the unedited weights at that one
  position, 14 of the 15 came back). Before each call, at each edited layer (lowest first), a least-squares
  correction F puts the kept preserved facts' MLP outputs back to the unedited model's (read before the
  stream's first edit, so a resumed run reads the same), weight α against the keys of the stream's edits
  (weight 1, every phrasing): F = α Dᵀ Kp (α KpᵀKp + KeᵀKe + l2 I)⁻¹ with D = target - W Kp. F joins the call's
  deltas but no edit's factors (a rollback leaves it; ``meta["anchor"]``: layer -> [facts, mean output
  error before, after]). Where edit and preserved keys overlap (one template's last token) the two trade,
  and an edit F takes back is written again by ``reassert_edits``. ``preserve_prompts`` n reads each
  preserved fact's keys at up to n of its ``edit_prompts`` phrasings too (for P, γ and the anchor). Not in
  the paper.
- MEMIT's corpus term, optional (``mom2_update_weight`` λ, 0 in the paper): λ C joins the soft term, so the
  update also pays λ·E‖ΔW P k‖² over the corpus keys. P removes only the directions whose eigenvalue is above
  the threshold; where C's spectrum is flat (SmolLM2: the null space still carries 24-44% of the corpus keys'
  energy at the reference's 2e-2) the rest of the corpus is left to the isotropic ridge. λ C is a ridge
  weighted by how much the corpus uses each direction. Not in the paper; on in configs/edit/alphaedit_smollm2.yaml.
- ΔW = Rᵀ V with V = (M⁻¹ P Kᵀ)ᵀ, M = P (KᵀK + G [+ γ Σ k kᵀ] [+ λ C]) + ``l2_weight`` · I (the reference's
  ``L2``), solved in float64: the minimiser of ‖(ΔW P) K - R‖² + ‖ΔW P‖² · l2 + ‖(ΔW P) K_prev‖², written as
  ΔW = ΔW P. With P = I, G = 0 and l2 → 0 it is MEMIT's update.

The stream state G lives in the artifacts: every MEMIT-family artifact carries each request's key
(``factors[param]["k"]``), so ``resume_stream(total)`` rebuilds G from a saved run, and a rolled-back
edit's key leaves G with it. Layers, z optimisation and every shared value are MEMIT's; the presets
are ``configs/edit/alphaedit_*.yaml``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lethe.adapters import unwrap
from lethe.edits import EditArtifact, resolve_hparams
from lethe.memit import MEMITEditor, MEMITHyperParams, with_phrasings


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    """MEMIT's knobs plus the null-space rule and the ridge. ``mom2_update_weight`` (MEMIT's λ on C) is 0 here,
    as in the paper; > 0 puts λ C in the soft term (module docstring)."""

    mom2_update_weight: float = 0.0  # λ: MEMIT's corpus term λ C beside G (0: the paper's update)

    nullspace_threshold: float = 2e-2  # eigenvalues of C below this span the null space (absolute, as the reference)
    l2_weight: float = 10.0  # ridge on the projected update (the reference's "L2")
    stream_keys: bool = True  # protect the keys of earlier edits in the stream (G); False: P alone
    preserve_source: str | None = None  # requests whose facts' keys join the preserved set (None: corpus C alone)
    preserve_weight: float = 0.0  # β: weight of the preserved facts' mean k kᵀ beside C
    preserve_limit: int | None = None  # use at most this many preserved facts (None: all)
    preserve_prompts: int = 0  # each preserved fact's keys also at up to this many of its edit_prompts phrasings
    preserve_gram_weight: float = 0.0  # γ: the preserved facts' keys also in the soft term, γ·Σ k kᵀ beside G
    refresh_keys: bool = False  # recompute the preserved facts' and earlier edits' keys on the current model
    reassert_edits: bool = False  # write again, with each call, the earlier edits whose new object lost its prompt
    reassert_passes: int = 0  # and then the call's own edits that do not win yet, up to this many more passes
    anchor_preserved: float = 0.0  # α: pull the kept preserved facts' MLP outputs back to the unedited model's


def hparams_from(spec: AlphaEditHyperParams | dict | str | None = None, **overrides) -> AlphaEditHyperParams:
    return resolve_hparams(AlphaEditHyperParams, "alphaedit", spec, **overrides)


def null_space(cov: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, eigenvalues of ``cov``): P = U_s U_sᵀ over the eigenvectors of the symmetric ``cov`` whose eigenvalues
    are < ``threshold``."""
    evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
    u = evecs[:, evals < threshold]
    return u @ u.T, evals


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    return null_space(cov, threshold)[0]


def alphaedit_directions(keys: torch.Tensor, projector: torch.Tensor, gram: torch.Tensor | None,
                         l2: float) -> torch.Tensor:
    """V (n × in) = (M⁻¹ P Kᵀ)ᵀ, M = P (KᵀK + G) + l2 I: AlphaEdit's ΔW is Rᵀ V (float64)."""
    k = keys.to(torch.float64)
    p = projector.to(k.device)
    kk = k.T @ k if gram is None else k.T @ k + gram.to(k.device, torch.float64)
    m = p @ kk + l2 * torch.eye(k.shape[1], dtype=torch.float64, device=k.device)
    return torch.linalg.solve(m, p @ k.T).T


class AlphaEditEditor(MEMITEditor):
    """MEMIT with AlphaEdit's update step; remembers the keys of its stream (see the module docstring)."""

    name = "alphaedit"
    hparams_class = AlphaEditHyperParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._projectors: dict[tuple, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}  # parameter name -> Σ k kᵀ of the stream's earlier edits
        self.stream_case_ids: set = set()  # edits so far (an edit written at several phrasings has several keys)
        self.stream_subjects: set[str] = set()  # subjects edited so far (left out of the preserved facts)
        self._batch_subjects: set[str] = set()
        self._preserved: dict[tuple, tuple[list[str], torch.Tensor]] = {}
        self.stream_rows: list = []  # the earlier edits' rows (one per phrasing), for refresh_keys
        self._fresh: dict[tuple, torch.Tensor] = {}  # refresh_keys: this call's keys per (what, layer)
        self._lapsed: set = set()  # reassert_edits: case ids of the earlier edits this call writes again
        if self.hp.reassert_edits and not self.hp.refresh_keys:
            raise ValueError("AlphaEdit hparams: reassert_edits needs refresh_keys: true (a lapsed edit's own keys "
                             "leave G while it is written again, which the stored keys cannot do)")
        if self.hp.anchor_preserved and not (self.hp.refresh_keys and self.hp.preserve_source):
            raise ValueError("AlphaEdit hparams: anchor_preserved needs preserve_source (the facts to anchor) and "
                             "refresh_keys: true (their keys are read on the model as it is at each call)")
        self._anchor_targets: dict[tuple, torch.Tensor] = {}  # (model, layer) -> unedited MLP outputs, preserved
        self.anchor_stats: dict[int, list] = {}
        # layer -> [null-space dimension, key dimension, largest eigenvalue] of the last P built (artifact meta)
        self.null_space_dims: dict[int, list] = {}

    def _null_space(self, cov: torch.Tensor, layer: int) -> torch.Tensor:
        """P for ``layer``; records its dimension and warns (once per layer) when it is the whole key space."""
        thr = self.hp.nullspace_threshold
        p, evals = null_space(cov, thr)
        nullity, largest = int((evals < thr).sum()), float(evals.max())
        if nullity == len(evals) and self.null_space_dims.get(layer, [None])[0] != nullity:
            warnings.warn(f"AlphaEdit: nullspace_threshold {thr:g} is above every eigenvalue of the preserved-key "
                          f"covariance at layer {layer} (the largest is {largest:.3g}), so the null space is the "
                          f"whole key space, P is the identity and the update protects nothing preserved. The "
                          f"threshold is absolute (the reference's rule) and does not carry over between models: "
                          f"set editor_args.hparams.nullspace_threshold well below {largest:.3g}.", stacklevel=3)
        self.null_space_dims[layer] = [nullity, len(evals), round(largest, 6)]
        return p

    def keys_now(self, loaded, requests, layer: int) -> torch.Tensor:
        """Keys (n × in, float64) of ``requests`` at ``layer`` on the model as it is now."""
        from lethe.memit import keys_and_outputs

        keys, _ = keys_and_outputs(loaded.model, loaded.tokenizer, loaded.adapter, loaded.family, requests, layer,
                                   layer, self.hp.stack, self.prefixes(loaded), self.hp.key_batch_size,
                                   self.hp.position)
        return keys.to(torch.float64)

    def preserved_requests(self) -> list:
        if not hasattr(self, "_preserved_requests"):
            from lethe.sources import load_requests

            reqs = load_requests(self.hp.preserve_source, limit=self.hp.preserve_limit)
            self._preserved_requests = with_phrasings(reqs, self.hp.preserve_prompts)
        return self._preserved_requests

    def preserved_keys(self, loaded, layer: int) -> tuple[list[str], torch.Tensor]:
        """(subjects, keys n × in) of the preserved facts at ``layer``, computed once on the model as first seen."""
        key = (id(unwrap(loaded.model)), layer)
        if key not in self._preserved:
            reqs = self.preserved_requests()
            self._preserved[key] = ([r.subject for r in reqs], self.keys_now(loaded, reqs, layer))
        return self._preserved[key]

    @property
    def stream_edits(self) -> int:
        return len(self.stream_case_ids)

    def projector(self, loaded, layer: int) -> torch.Tensor:
        """P for ``layer``: null space of C (+ β · the preserved facts not edited so far or in this call)."""
        hp = self.hp
        if not (hp.preserve_source and hp.preserve_weight):
            key = (id(unwrap(loaded.model)), layer, hp.nullspace_threshold)
            if key not in self._projectors:
                self._projectors[key] = self._null_space(self.covariance(loaded, layer), layer)
            return self._projectors[key]
        k = self.kept_preserved_keys(loaded, layer)
        cov = self.covariance(loaded, layer).to(torch.float64) + hp.preserve_weight * (k.T @ k) / max(len(k), 1)
        return self._null_space(cov, layer)

    def kept_preserved_keys(self, loaded, layer: int) -> torch.Tensor:
        """The preserved facts' keys at ``layer``, less those whose subject the stream edits (so far or now).
        With ``refresh_keys`` they are read on the model as it is at this call and layer (the edited layers
        below move them), once per call."""
        edited = self.stream_subjects | self._batch_subjects
        if self.hp.refresh_keys:
            if ("preserved", layer) not in self._fresh:
                kept = [r for r in self.preserved_requests() if r.subject not in edited]
                self._fresh[("preserved", layer)] = (self.keys_now(loaded, kept, layer) if kept else
                                                     self.preserved_keys(loaded, layer)[1][:0])  # all edited
            return self._fresh[("preserved", layer)]
        subjects, keys = self.preserved_keys(loaded, layer)
        return keys[torch.tensor([s not in edited for s in subjects], dtype=torch.bool)]

    def stream_gram(self, loaded, layer: int, name: str) -> torch.Tensor | None:
        """G = Σ k kᵀ over the earlier edits' keys: as each was written, or (``refresh_keys``) read now."""
        if not self.hp.refresh_keys:
            return self.gram.get(name)
        rows = [r for r in self.stream_rows if r.case_id not in self._lapsed]  # a lapsed edit is rewritten, not kept
        if not rows:
            return None
        k = self.keys_now(loaded, rows, layer)
        return k.T @ k

    def update_step(self, loaded, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        hp = self.hp
        name = f"{loaded.adapter.mlp_out_name(layer, hp.stack)}.weight"
        soft = []  # the soft term beside KᵀK: G, γ Σ k kᵀ over the kept preserved keys, λ C
        gram = self.stream_gram(loaded, layer, name) if hp.stream_keys else None
        if gram is not None:
            soft.append(gram)
        if hp.preserve_source and hp.preserve_gram_weight:
            k = self.kept_preserved_keys(loaded, layer)
            soft.append(hp.preserve_gram_weight * (k.T @ k))
        if hp.mom2_update_weight:
            soft.append(hp.mom2_update_weight * self.covariance(loaded, layer).to(torch.float64))
        gram = sum(t.to(keys.device, torch.float64) for t in soft) if soft else None
        return alphaedit_directions(keys, self.projector(loaded, layer), gram, hp.l2_weight)

    def prepare(self, loaded) -> None:
        """Statistics from the model before any edit of the stream (``lethe edit`` calls this before it applies
        a resumed run's weights, so a resumed stream uses what the uninterrupted one used)."""
        for layer in self.hp.layers:
            self.covariance(loaded, layer)
            if self.hp.preserve_source and (self.hp.preserve_weight or self.hp.preserve_gram_weight) \
                    and not self.hp.refresh_keys:
                self.preserved_keys(loaded, layer)
            if self.hp.anchor_preserved:
                self.anchor_targets(loaded, layer)

    def _mlp_out(self, loaded, layer: int) -> torch.Tensor:
        """Layer ``layer``'s MLP output projection as an (out, in) view of its weight."""
        name = loaded.adapter.mlp_out_name(layer, self.hp.stack)
        return loaded.adapter.weight_out_in(loaded.adapter.module(loaded.model, name))

    def anchor_targets(self, loaded, layer: int) -> torch.Tensor:
        """The preserved facts' MLP outputs (n × out, bias left out) at ``layer`` on the model as first seen:
        the values ``anchor_preserved`` pulls them back to (read before the stream's first edit)."""
        key = (id(unwrap(loaded.model)), layer)
        if key not in self._anchor_targets:
            k = self.keys_now(loaded, self.preserved_requests(), layer)
            self._anchor_targets[key] = k @ self._mlp_out(loaded, layer).detach().to(k.device, torch.float64).T
        return self._anchor_targets[key]

    @torch.no_grad()
    def anchor(self, loaded, requests) -> None:
        """Before a call (``anchor_preserved`` α > 0): at each edited layer, lowest first, a least-squares
        correction F pulls the MLP outputs of the preserved facts whose subjects the stream has not edited (nor
        this call) back to the unedited model's, F = α Dᵀ Kp (α KpᵀKp + KeᵀKe + l2 I)⁻¹, D = target - W Kp, with
        Kp their keys and Ke the stream's edits' keys (every phrasing), both read on the model as it is. The
        soft and null-space terms bound how far one update moves a preserved key's output; they do not undo
        what many updates moved it. Not in the paper."""
        hp = self.hp
        edited = self.stream_subjects | {r.subject for r in requests}
        reqs = self.preserved_requests()
        keep = [i for i, r in enumerate(reqs) if r.subject not in edited]
        if not keep or not self.stream_rows:
            return
        for layer in self.hp.layers:
            target = self.anchor_targets(loaded, layer)[keep]
            kp = self.keys_now(loaded, [reqs[i] for i in keep], layer)
            w = self._mlp_out(loaded, layer)
            d = target.to(kp.device) - kp @ w.to(torch.float64).T
            name = f"{loaded.adapter.mlp_out_name(layer, hp.stack)}.weight"
            m = hp.anchor_preserved * (kp.T @ kp) + self.stream_gram(loaded, layer, name).to(kp.device)  # KeᵀKe
            m = m + hp.l2_weight * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
            fix = torch.linalg.solve(m, hp.anchor_preserved * (kp.T @ d)).T  # (out × in); M symmetric
            w.add_(fix.to(w.device, w.dtype))
            left = target.to(kp.device) - kp @ w.to(torch.float64).T
            self.anchor_stats[layer] = [len(keep), round(float(d.norm(dim=-1).mean()), 6),
                                        round(float(left.norm(dim=-1).mean()), 6)]

    def lapsed_edits(self, loaded, exclude: set) -> list:
        """The stream's earlier edits (one request each, as first written) whose new object no longer beats the
        true one on their rewrite prompt or on a phrasing they were written at (``edit_prompts``), less the case
        ids in ``exclude``."""
        import dataclasses

        from lethe import evaluation as ev

        firsts, seen = [], set(exclude)
        for r in self.stream_rows:
            if r.case_id not in seen:
                seen.add(r.case_id)
                firsts.append(r)
        if not firsts:
            return []
        n = self.hp.edit_prompts  # the phrasings each edit was written at (never its held-out paraphrases)
        probe = [dataclasses.replace(r, paraphrase_prompts=[t.format(r.subject) for t in r.edit_prompts[:n]],
                                     neighborhood_prompts=[], neighborhood_targets=[]) for r in firsts]
        scores = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, probe)
        return [r for r, e, p in zip(firsts, scores["efficacy_per_case"], scores["paraphrase_per_case"])
                if e < 1.0 or (p is not None and p < 1.0)]

    def edit(self, loaded, requests) -> EditArtifact:
        """One call of the stream; with ``reassert_edits`` also the earlier edits that lapsed, and then (up to
        ``reassert_passes`` times) the call's own edits that do not win yet, each pass on the model the last left."""
        self.prepare(loaded)
        hp = self.hp
        before = None  # with anchor_preserved: the weights before the call's anchor
        if hp.anchor_preserved and self.stream_rows:
            names = [f"{loaded.adapter.mlp_out_name(layer, hp.stack)}.weight" for layer in hp.layers]
            before = EditArtifact.snapshot(loaded.model, names)
        arts, reasserted, call_ids = [], [], set()
        try:
            if before is not None:
                self.anchor(loaded, requests)
            todo = list(requests)
            if hp.reassert_edits and self.stream_rows:
                todo += self.lapsed_edits(loaded, exclude={r.case_id for r in requests})
            for n in range(1 + (hp.reassert_passes if hp.reassert_edits else 0)):
                if n:
                    todo = self.lapsed_edits(loaded, exclude=self.stream_case_ids - call_ids)
                    if not todo:
                        break
                reasserted += [r.case_id for r in todo if r.case_id in self.stream_case_ids]
                arts.append(self._write(loaded, todo))
                call_ids |= {r.case_id for r in todo}
        except BaseException:  # bad input fails the first write: a call that wrote nothing takes its anchor back
            if before is not None and not arts:
                EditArtifact.from_weights(self.name, loaded.source, before, loaded.model).revert(loaded.model)
            raise
        art = arts[0] if len(arts) == 1 else EditArtifact.combine(arts)
        art._originals = dict(arts[0]._originals)  # revert() puts back the weights from before the call
        if before is not None:  # the anchor joins the call's deltas (from before it), in no edit's factors
            transposed = art.meta.get("factor_transposed", {})
            art = EditArtifact.from_weights(self.name, loaded.source, before, loaded.model, art.requests,
                                            art.meta).with_factors(art.factors, transposed)
            art.meta["anchor"] = {str(layer): list(v) for layer, v in self.anchor_stats.items()}
        art.meta["null_space"] = {str(layer): list(v) for layer, v in self.null_space_dims.items()}
        art.meta["reasserted"] = list(dict.fromkeys(reasserted))
        art.meta["passes"] = len(arts)
        return art

    def _write(self, loaded, requests) -> EditArtifact:
        """MEMIT's call with this editor's update step; the requests' own earlier keys leave G meanwhile."""
        self._lapsed = {r.case_id for r in requests} & self.stream_case_ids
        self._batch_subjects = {r.subject for r in requests}
        self._fresh = {}
        try:
            art = super().edit(loaded, requests)
        finally:
            self._batch_subjects, self._fresh, self._lapsed = set(), {}, set()
        self._add_keys(art, +1)
        return art

    def _add_keys(self, art: EditArtifact | None, sign: int) -> None:
        if art is None:
            return
        for name, f in art.factors.items():
            k = f["k"].to(torch.float64)
            g = sign * (k.T @ k)
            self.gram[name] = self.gram[name] + g if name in self.gram else g
        if sign > 0:
            self.stream_rows += list(art.requests)
            self.stream_subjects |= {r.subject for r in art.requests}
            self.stream_case_ids |= {r.case_id for r in art.requests}

    def resume_stream(self, total: EditArtifact | None) -> None:
        """Set the stream state to the edits of ``total`` (a resumed run's artifact, what remains after a
        rollback, or None for a fresh stream)."""
        self.gram, self.stream_case_ids, self.stream_subjects, self.stream_rows = {}, set(), set(), []
        if total is not None and total.factors:
            self._add_keys(total, +1)
        elif total is not None and total.requests:
            raise ValueError(f"the {total.method} artifact has no per-edit keys, so AlphaEdit cannot protect its "
                             f"{len(total.requests)} edits; start the stream over (model.init_args.resume: false)")
