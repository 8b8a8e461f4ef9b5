"""Edits as artifacts: what changed (additive weight deltas) plus the requests that asked for it.

An edit can then be inspected, saved, re-applied to a fresh copy of the model and
reverted bit-for-bit. Every editor (ROME, MEMIT, MEND, KE, KN) returns one of these
from ``Editor.edit(loaded, requests)``, with the edit already applied to the model it
was given, so ``artifact.revert(model)`` undoes it exactly.

Deltas are stored in each parameter's own layout (GPT-2's Conv1D weights are (in, out)),
keyed by the parameter's name in the unwrapped model, in float32.

Sequential editing: ``combine`` sums artifacts into one; the edit CLI saves the running
sum after each batch of requests, so a long sequential run resumes from its last save.

Per-edit factors: the closed-form editors (ROME, MEMIT, AlphaEdit) write each parameter's delta as a
sum of one rank-one part per request, ΔW = Σ_j u_j v_jᵀ (out × in). An artifact that carries these
factors (``factors[param] = {"u": n × out, "v": n × in, "k": n × in}``, row j = ``requests[j]``; k is
the request's key, which AlphaEdit's stream needs) can take back single edits: ``rollback`` subtracts
their parts and leaves the others. That is exact for the parameters' arithmetic (the model ends with
base + the remaining parts); whether the rolled-back fact fully returns depends on what later edits
did on top of it (see ``rollback``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lethe.adapters import unwrap
from lethe.io import atomic_path
from lethe.records import EditRequest

ARTIFACT_DIR = "edit_artifact"  # in a sequential `lethe edit` run folder: the running sum of its edits
MODEL_DIR = "edited_model"  # ... and the edited model, when the run saves it
DELTAS_FILE = "deltas.safetensors"
WEIGHTS_FILE = "weights.safetensors"  # optional: the edited parameters' values after the edit (exact resume)
META_FILE = "artifact.json"
FACTORS_FILE = "factors.safetensors"  # optional: per-request rank-one parts (rollback of single edits)
FORMAT_VERSION = 1


class EditArtifactError(ValueError):
    pass


def request_to_dict(req: EditRequest) -> dict:
    return dataclasses.asdict(req)


def request_from_dict(d: dict) -> EditRequest:
    names = {f.name for f in dataclasses.fields(EditRequest)}
    req = EditRequest(**{k: v for k, v in d.items() if k in names})
    for k, v in d.items():  # fields a later EditRequest may carry (e.g. neighborhood_targets)
        if k not in names:
            setattr(req, k, v)
    return req


def fingerprint(t: torch.Tensor) -> str:
    """A short hash of a tensor's bytes: tells whether an artifact meets the weights it was made on."""
    data = t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(unwrap(model).named_parameters())


@dataclass
class EditArtifact:
    """The weight deltas of an edit and the requests behind it (see the module docstring)."""

    method: str
    model_source: str
    deltas: dict[str, torch.Tensor]
    requests: list[EditRequest] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    base_fingerprints: dict[str, str] = field(default_factory=dict)
    factors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _originals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    # ----- construction -----------------------------------------------------
    @classmethod
    def from_weights(cls, method: str, model_source: str, before: dict[str, torch.Tensor], model: nn.Module,
                     requests: Sequence[EditRequest] = (), meta: dict | None = None) -> EditArtifact:
        """An artifact for an edit already made in place: ``before`` are the parameters' original values.

        The model counts as applied: ``revert(model)`` puts ``before`` back bit-for-bit.
        """
        params = _params(model)
        deltas = {n: (params[n].detach().float() - t.float()).cpu() for n, t in before.items()}
        art = cls(method, model_source, deltas, list(requests), dict(meta or {}),
                  {n: fingerprint(t) for n, t in before.items()})
        art._originals[id(unwrap(model))] = {n: t.detach().clone() for n, t in before.items()}
        return art

    @staticmethod
    def snapshot(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Copies of the named parameters (what ``from_weights`` needs as ``before``)."""
        params = _params(model)
        missing = [n for n in names if n not in params]
        if missing:
            raise EditArtifactError(f"the model has no parameters named {missing}")
        return {n: params[n].detach().clone() for n in names}

    # ----- apply / revert ---------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Refuse a model whose parameter names or shapes differ from the ones this edit was made on."""
        params = _params(model)
        for name, delta in self.deltas.items():
            if name not in params:
                raise EditArtifactError(
                    f"this {self.method} edit (made on {self.model_source}) changes parameter {name!r}, which "
                    f"this {type(unwrap(model)).__name__} does not have: it is a different architecture")
            if tuple(params[name].shape) != tuple(delta.shape):
                raise EditArtifactError(
                    f"parameter {name!r} has shape {tuple(params[name].shape)} here but the {self.method} edit "
                    f"(made on {self.model_source}) has a delta of shape {tuple(delta.shape)}")

    def changed_bases(self, model: nn.Module) -> list[str]:
        """The edited parameters whose values in ``model`` differ from those this edit was computed on."""
        params = _params(model)
        return [n for n, fp in self.base_fingerprints.items() if n in params and fingerprint(params[n]) != fp]

    def is_applied(self, model: nn.Module) -> bool:
        return id(unwrap(model)) in self._originals

    @torch.no_grad()
    def apply(self, model: nn.Module, check_base: bool = True) -> nn.Module:
        """Add the deltas to ``model`` in place, remembering the original tensors for ``revert``."""
        self.check(model)
        key = id(unwrap(model))
        if key in self._originals:
            raise EditArtifactError("this edit is already applied to this model; revert it first")
        params = _params(model)
        if check_base:
            changed = self.changed_bases(model)
            if changed:
                warnings.warn(f"the weights of {changed} differ from those the {self.method} edit was computed "
                              "on (another model, or other edits applied first); applying anyway", stacklevel=2)
        self._originals[key] = {n: params[n].detach().clone() for n in self.deltas}
        for n, d in self.deltas.items():
            params[n].add_(d.to(params[n].device, params[n].dtype))
        return model

    @torch.no_grad()
    def revert(self, model: nn.Module) -> nn.Module:
        """Put the original tensors back, bit-for-bit."""
        key = id(unwrap(model))
        if key not in self._originals:
            raise EditArtifactError("this edit is not applied to this model (nothing to revert)")
        params = _params(model)
        for n, t in self._originals.pop(key).items():
            params[n].copy_(t)
        return model

    # ----- composition ------------------------------------------------------
    @classmethod
    def combine(cls, artifacts: Sequence[EditArtifact], method: str | None = None) -> EditArtifact:
        """One artifact whose deltas are the sum of several (a sequential run's running total)."""
        if not artifacts:
            raise EditArtifactError("nothing to combine")
        deltas: dict[str, torch.Tensor] = {}
        requests: list[EditRequest] = []
        fps: dict[str, str] = {}
        for a in artifacts:
            for n, d in a.deltas.items():
                deltas[n] = deltas[n] + d if n in deltas else d.clone()
            requests += a.requests
            for n, fp in a.base_fingerprints.items():
                fps.setdefault(n, fp)
        first = artifacts[0]
        meta = {**first.meta, "combined": len(artifacts)}
        factors: dict[str, dict[str, torch.Tensor]] = {}
        meta.pop("factor_transposed", None)
        if all(a.factors and set(a.factors) == set(deltas) for a in artifacts):  # rows follow the requests
            factors = {n: {k: torch.cat([a.factors[n][k] for a in artifacts]) for k in first.factors[n]}
                       for n in deltas}
            meta["factor_transposed"] = {n: first.meta.get("factor_transposed", {}).get(n, False) for n in factors}
        return cls(method or first.method, first.model_source, deltas, requests, meta, fps, factors)

    def with_factors(self, factors: dict[str, dict[str, torch.Tensor]], transposed: dict[str, bool]) -> EditArtifact:
        """Attach per-request rank-one parts (see the module docstring); ``transposed[param]``: the parameter
        is stored (in, out) (GPT-2's Conv1D). Each must have one row per request."""
        for name, f in factors.items():
            if name not in self.deltas:
                raise EditArtifactError(f"factors for {name!r}, which this {self.method} edit does not change")
            for key in ("u", "v"):
                if f[key].shape[0] != len(self.requests):
                    raise EditArtifactError(f"{name}: {f[key].shape[0]} factor rows for {len(self.requests)} requests")
        self.factors = {n: {k: t.detach().float().cpu() for k, t in f.items()} for n, f in factors.items()}
        self.meta["factor_transposed"] = {n: bool(transposed.get(n, False)) for n in factors}
        return self

    def part(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """The requests ``rows``' share of parameter ``name``'s delta, in the parameter's own layout."""
        f = self.factors[name]
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        d = f["u"][idx].T.double() @ f["v"][idx].double()  # (out, in)
        return (d.T if self.meta.get("factor_transposed", {}).get(name) else d).float()

    def find(self, case_ids: Iterable) -> list[int]:
        """Row indices of the requests with these case ids; an unknown id is an error naming it."""
        wanted = [str(c) for c in case_ids]
        by_id: dict[str, list[int]] = {}
        for i, r in enumerate(self.requests):
            by_id.setdefault(str(r.case_id), []).append(i)
        missing = [c for c in wanted if c not in by_id]
        if missing:
            raise EditArtifactError(f"no edit with case_id {missing} in this {self.method} artifact "
                                    f"({len(self.requests)} edits)")
        return sorted({i for c in wanted for i in by_id[c]})

    @torch.no_grad()
    def rollback(self, model: nn.Module, rows: Sequence[int], repair: bool = False,
                 ridge: float = 1e-2) -> EditArtifact:
        """Take back the edits at ``rows`` (indices into ``requests``; ``find`` maps case ids) from ``model``,
        in place, leaving every other edit: their rank-one parts are subtracted from the parameters.
        Returns the artifact of what remains (its deltas, requests and factors without those rows).

        Exact in weight space: the model then holds base + the other edits' parts, the same weights as
        applying only the remaining artifact. Not exact in behaviour when later edits were computed on a
        model that held the rolled-back ones (their keys and residuals saw it) or when two edits' keys
        overlap; the closer the edits' keys are to orthogonal (AlphaEdit constrains this), the closer the
        rolled-back facts come back. Artifacts without factors (MEND, KE, KN, fine-tuning) cannot split
        a batch: revert the whole artifact instead.

        ``repair``: then also undo what the remaining edits still change at the rolled-back edits' keys. Per
        edited matrix, the remaining delta D moves each rolled-back key k_j's output by D k_j; a least-squares
        correction F (rank <= the rows rolled back) puts those outputs back to the unedited ones,
        F k_j = -D k_j, while holding the remaining edits' keys: minimise ||F K_J^T + D K_J^T||^2 +
        ||F K_o^T||^2 + ridge * mean(diag M) * ||F||^2 (M = K_J^T K_J + K_o^T K_o). Needs the per-edit keys
        (ROME, MEMIT, AlphaEdit artifacts). F joins the deltas but no edit's factors (``meta.repaired`` lists
        the case ids), so a later rollback leaves it in place."""
        rows = sorted({int(r) for r in rows})
        if not rows:
            return self
        bad = [r for r in rows if not 0 <= r < len(self.requests)]
        if bad:
            raise EditArtifactError(f"rollback rows {bad} out of range: this artifact holds {len(self.requests)} edits")
        if not self.factors or set(self.factors) != set(self.deltas):
            raise EditArtifactError(f"this {self.method} artifact has no per-edit factors, so single edits cannot be "
                                    "rolled back; revert the whole artifact (or its batch) instead")
        if repair and not ridge >= 0:
            raise EditArtifactError(f"rollback: ridge must be >= 0, got {ridge}")
        if repair:
            keyless = [n for n, f in self.factors.items() if "k" not in f]
            if keyless:
                raise EditArtifactError(f"this {self.method} artifact keeps no per-edit keys for {keyless}, so "
                                        "rollback cannot repair; roll back without repair")
        self.check(model)
        params = _params(model)
        keep = [i for i in range(len(self.requests)) if i not in set(rows)]
        deltas = {}
        for name, delta in self.deltas.items():
            part = self.part(name, rows)
            params[name].sub_(part.to(params[name].device, params[name].dtype))
            deltas[name] = delta - part
            if repair:
                fix = self._repair(name, deltas[name], rows, keep, ridge)
                params[name].add_(fix.to(params[name].device, params[name].dtype))
                deltas[name] = deltas[name] + fix
        idx = torch.as_tensor(keep, dtype=torch.long)
        factors = {n: {k: t[idx] for k, t in f.items()} for n, f in self.factors.items()}
        meta = {**self.meta, "rolled_back": [*self.meta.get("rolled_back", []),
                                             *[request_to_dict(self.requests[r]) for r in rows]]}
        if repair:
            meta["repaired"] = [*self.meta.get("repaired", []),
                                *dict.fromkeys(str(self.requests[r].case_id) for r in rows)]
        out = EditArtifact(self.method, self.model_source, deltas, [self.requests[i] for i in keep], meta,
                           dict(self.base_fingerprints), factors)
        return out

    def _repair(self, name: str, remaining: torch.Tensor, rows: Sequence[int], keep: Sequence[int],
                ridge: float) -> torch.Tensor:
        """``rollback``'s correction F for parameter ``name`` (in the parameter's layout; see ``rollback``)."""
        transposed = self.meta.get("factor_transposed", {}).get(name)
        k = self.factors[name]["k"].double()
        kj, ko = k[list(rows)], k[list(keep)]
        d = remaining.double().T if transposed else remaining.double()  # (out, in)
        m = kj.T @ kj + ko.T @ ko
        m = m + ridge * float(m.diagonal().mean()) * torch.eye(m.shape[0], dtype=m.dtype)
        fix = torch.linalg.solve(m, kj.T @ (-(d @ kj.T)).T).T  # F = R K_J M^-1, R = -D K_J^T; M symmetric
        return (fix.T if transposed else fix).float()

    def norms(self) -> dict[str, float]:
        return {n: float(d.norm()) for n, d in self.deltas.items()}

    # ----- disk -------------------------------------------------------------
    def save(self, dest: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``deltas.safetensors`` + ``artifact.json`` into ``dest``, atomically (all or nothing).

        ``weights``: the edited parameters' values after the edit, saved beside the deltas
        (``weights.safetensors``) so a sequential run resumes bit-for-bit (base + summed deltas is
        only equal to the edited weights up to rounding)."""
        from safetensors.torch import save_file

        with atomic_path(dest, is_dir=True) as tmp:
            save_file({n: d.detach().float().contiguous().cpu() for n, d in self.deltas.items()},
                      str(tmp / DELTAS_FILE))
            if weights is not None:
                missing = sorted(set(self.deltas) - set(weights))
                if missing:
                    raise EditArtifactError(f"weights to save lack the edited parameters {missing}")
                save_file({n: weights[n].detach().contiguous().cpu() for n in self.deltas}, str(tmp / WEIGHTS_FILE))
            if self.factors:
                save_file({f"{n}::{k}": t.contiguous() for n, f in self.factors.items() for k, t in f.items()},
                          str(tmp / FACTORS_FILE))
            meta = {
                "format_version": FORMAT_VERSION,
                "method": self.method,
                "model_source": self.model_source,
                "shapes": {n: list(d.shape) for n, d in self.deltas.items()},
                "base_fingerprints": self.base_fingerprints,
                "requests": [request_to_dict(r) for r in self.requests],
                "meta": self.meta,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
        return Path(dest)

    @classmethod
    def load(cls, src: str | Path) -> EditArtifact:
        from safetensors.torch import load_file

        src = Path(src)
        for f in (META_FILE, DELTAS_FILE):
            if not (src / f).is_file():
                raise EditArtifactError(f"{src} is not an edit artifact: {f} is missing")
        try:
            meta = json.loads((src / META_FILE).read_text())
        except json.JSONDecodeError as err:
            raise EditArtifactError(f"{src / META_FILE}: not valid JSON ({err})") from err
        deltas = load_file(str(src / DELTAS_FILE))
        for n, shape in meta.get("shapes", {}).items():
            if n not in deltas or list(deltas[n].shape) != shape:
                raise EditArtifactError(f"{src}: {DELTAS_FILE} does not match {META_FILE} for parameter {n!r}")
        factors: dict[str, dict[str, torch.Tensor]] = {}
        if (src / FACTORS_FILE).is_file():
            try:
                flat = load_file(str(src / FACTORS_FILE))
            except Exception as err:  # a truncated or foreign file
                raise EditArtifactError(f"{src / FACTORS_FILE}: not a readable safetensors file ({err})") from err
            for key, t in flat.items():
                name, _, part = key.rpartition("::")
                factors.setdefault(name, {})[part] = t
        requests = [request_from_dict(r) for r in meta.get("requests", [])]
        for name, f in factors.items():
            if name not in deltas or any(t.shape[0] != len(requests) for t in f.values()):
                raise EditArtifactError(f"{src}: {FACTORS_FILE} does not match {META_FILE} for parameter {name!r}")
        return cls(meta["method"], meta["model_source"], deltas, requests, meta.get("meta", {}),
                   meta.get("base_fingerprints", {}), factors)


def load_weights(src: str | Path) -> dict[str, torch.Tensor] | None:
    """The edited parameters' values an artifact folder was saved with (``save(weights=...)``), or None."""
    from safetensors.torch import load_file

    path = Path(src) / WEIGHTS_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as err:  # a truncated or foreign file
        raise EditArtifactError(f"{path}: not a readable safetensors file ({err})") from err


@torch.no_grad()
def restore_edited(total: EditArtifact, model: nn.Module, src: str | Path) -> None:
    """Give ``model`` (the unedited base) the edited values of the run saved in ``src``: its
    ``weights.safetensors`` where saved (bit-exact resume), else base + the summed deltas (equal up to rounding)."""
    weights = load_weights(src)
    params = _params(model)
    for n, d in total.deltas.items():
        p = params[n]
        p.copy_(weights[n].to(p.device, p.dtype) if weights is not None else p + d.to(p.device, p.dtype))


class Editor(Protocol):
    """What every editing method provides to ``lethe edit`` and the benchmarks.

    ``edit`` changes ``loaded.model`` in place and returns the applied artifact
    (``artifact.revert(loaded.model)`` restores the model bit-for-bit).
    """

    name: str

    def edit(self, loaded, requests: Sequence[EditRequest]) -> EditArtifact: ...


def resolve_hparams(cls, method: str, spec=None, **overrides):
    """A hyperparameter dataclass ``cls`` from a dict or an instance (a preset's ``editor_args.hparams``), with
    ``overrides`` (None values ignored) on top; unknown keys fail naming the method and what is known.

    A string names a preset file (``configs/edit/<method>_<name>.yaml``); the former Python preset names
    (``world-decoder``, ``smollm2``, ``gpt2-xl`` ...) still work, with a deprecation warning.
    """
    if isinstance(spec, cls):
        base = dataclasses.asdict(spec)
    elif isinstance(spec, str):
        from lethe.presets import named_editor_hparams

        base = named_editor_hparams(method, spec)
    else:
        base = dict(spec or {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(base) - names
    if unknown:
        raise ValueError(f"unknown {method.upper()} hyperparameters {sorted(unknown)}; known: {sorted(names)}")
    return cls(**base)
