"""What MEND and KnowledgeEditor share: which matrices they edit, the rank-one gradient factors of an
edit, the edited forward pass, the losses' pieces, checkpoint checks and the ``lethe edit`` editor (the
training LightningModule is ``lightning_modules.hypernet_common.HypernetModule``).

Both hypernetworks turn the gradient of the edit's NLL at a few weight matrices into a weight update.
The gradient of a linear layer ``y = W x`` summed over tokens t is ``∇W = Σ_t δ_t x_tᵀ`` (δ the gradient
at the layer's output, x its input), so one forward/backward with hooks on the edited modules gives, for
every token, the factors (x_t, δ_t): MEND feeds those factors to its editor, KE multiplies them into the
full ∇W. Updates are expressed in the (out, in) layout and converted to each parameter's own storage
(GPT-2's Conv1D keeps (in, out)) only when they touch the parameter.

The base model never changes while an editor trains: the edited forward pass is
``torch.func.functional_call`` with ``W + ΔW`` substituted, and every base parameter has
``requires_grad=False``. Checkpoints hold the editor only (plus what it was trained for: model, layers,
shapes, a fingerprint of the edited weights), and refuse to load into another model or other layers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lethe import lm
from lethe.adapters import unwrap
from lethe.edits import EditArtifact
from lethe.hooks import TraceDict
from lethe.records import EditRequest

KINDS = ("mlp_in", "mlp_out")
EDITOR_META_KEY = "lethe_editor"  # the checkpoint entry that says what an editor was trained for


class EditorCheckpointError(ValueError):
    """An editor checkpoint that does not fit the model or layers it is asked to edit."""


class EditInputError(ValueError):
    """An edit request that cannot be encoded for this model (e.g. longer than its context)."""


@dataclass(frozen=True)
class Site:
    """One edited weight matrix."""

    module: str
    param: str
    out_features: int
    in_features: int
    transposed: bool  # the parameter is stored (in, out)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def resolve_sites(model: nn.Module, adapter, layers: Sequence[int], kinds: Sequence[str] = KINDS,
                  stack: str | None = None) -> list[Site]:
    """The (layer, kind) matrices of ``stack``; negative layers count from the last block."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if not layers:
        raise ValueError("layers is empty: name at least one block to edit")
    idx = sorted({adapter.check_layer(model, int(layer), stack) for layer in layers})
    sites = []
    for i in idx:
        for kind in kinds:
            name = adapter.mlp_in_name(i, stack) if kind == "mlp_in" else adapter.mlp_out_name(i, stack)
            mod = adapter.module(model, name)
            out_f, in_f = adapter.weight_out_in(mod).shape
            sites.append(Site(name, f"{name}.weight", int(out_f), int(in_f), bool(adapter.transposed)))
    return sites


def param_layout(site: Site, delta_out_in: torch.Tensor) -> torch.Tensor:
    return delta_out_in.T if site.transposed else delta_out_in


def context_length(model: nn.Module) -> int | None:
    """The longest input the model's positions allow (None: relative positions, e.g. T5)."""
    cfg = unwrap(model).config
    for key in ("n_positions", "max_position_embeddings"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def encode(tok, family: str, pairs: Sequence[tuple[str, str]], max_length: int | None, what: str,
           owners: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
    """``lm.encode_pairs`` whose error names the request (case id) and the field that does not fit."""
    try:
        return lm.encode_pairs(tok, family, [p for p, _ in pairs], [t for _, t in pairs], max_length=max_length)
    except lm.EncodingError as err:
        msg = str(err)
        bad = None
        if msg.startswith("pair "):
            try:
                bad = int(msg.split()[1])
            except ValueError:
                bad = None
        case = owners[bad].case_id if bad is not None and bad < len(owners) else "?"
        raise EditInputError(f"edit request case {case}: its {what} {pairs[bad] if bad is not None else ''} does "
                             f"not fit this model (context {max_length} tokens): {msg}") from err


# ----- gradient factors ------------------------------------------------------------------------------
@dataclass
class GradFactors:
    """Per site: token rows x (n, in) and δ (n, out) with ∇W = δᵀ x; ``seq`` = the batch row of each."""

    x: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    seq: dict[str, torch.Tensor]

    def grad(self, site: Site, rows: torch.Tensor | None = None) -> torch.Tensor:
        x, d = self.x[site.module], self.delta[site.module]
        if rows is not None:
            x, d = x[rows], d[rows]
        return d.T @ x

    def select(self, site: Site, seqs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.isin(self.seq[site.module], torch.as_tensor(list(seqs), device=self.seq[site.module].device))
        return self.x[site.module][keep], self.delta[site.module][keep]


def token_loss(logits: torch.Tensor, labels: torch.Tensor, family: str, smoothing: float = 0.0) -> torch.Tensor:
    """Per-sequence mean target-token NLL (optionally label-smoothed), so a row's gradient is its own."""
    lg, lb = lm.aligned(logits, labels, family)
    mask = lb != lm.IGNORE
    logp = torch.log_softmax(lg.float(), -1)
    nll = -logp.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if smoothing:
        nll = (1 - smoothing) * nll - smoothing * logp.mean(-1)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def gradient_factors(model: nn.Module, family: str, sites: Sequence[Site], batch: dict[str, torch.Tensor],
                     smoothing: float = 0.0) -> GradFactors:
    """Hook the edited modules' inputs and output gradients for the summed per-sequence NLL of ``batch``.

    The base weights need no gradient: the first hooked output is made a leaf that requires one, so
    autograd reaches every edited module (later ones through it) without touching any parameter.
    """
    names = [s.module for s in sites]

    def into_graph(t: torch.Tensor, name: str) -> torch.Tensor:
        if not t.requires_grad:
            t.requires_grad_(True)
        return t

    with torch.inference_mode(False), torch.enable_grad():
        batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with TraceDict(model, names, retain_input=True, retain_output=True, edit_output=into_graph) as td:
            logits = lm.forward_logits(model, batch, family)
            loss = token_loss(logits, batch["labels"], family, smoothing).sum()
            outs = [td[n].output for n in names]
            ins = [td[n].input for n in names]
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
    xs, ds, seqs = {}, {}, {}
    for name, x, g in zip(names, ins, grads):
        x = x.detach()
        if g is None:
            g = torch.zeros(*x.shape[:-1], outs[names.index(name)].shape[-1], dtype=x.dtype, device=x.device)
        seq = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand(x.shape[:-1])
        x2, g2, s2 = x.reshape(-1, x.shape[-1]), g.detach().reshape(-1, g.shape[-1]), seq.reshape(-1)
        keep = (x2 != 0).any(-1) & (g2 != 0).any(-1)  # tokens with no gradient carry no edit
        xs[name], ds[name], seqs[name] = x2[keep].float(), g2[keep].float(), s2[keep]
    return GradFactors(xs, ds, seqs)


# ----- edited forward and losses ---------------------------------------------------------------------
def edited_logits(model: nn.Module, family: str, batch: dict[str, torch.Tensor],
                  deltas: dict[str, torch.Tensor], sites: Sequence[Site]) -> torch.Tensor:
    """Logits of the model with ``W + ΔW`` at the sites (deltas keyed by parameter, (out, in) layout)."""
    base = unwrap(model)
    params = dict(base.named_parameters())
    by_param = {s.param: s for s in sites}
    new = {n: params[n] + param_layout(by_param[n], d).to(params[n].dtype) for n, d in deltas.items()}
    out = torch.func.functional_call(base, new, args=(), kwargs=lm.model_inputs(batch, family), strict=False)
    return out.logits


def kl_at_labels(pre: torch.Tensor, post: torch.Tensor, labels: torch.Tensor, family: str) -> torch.Tensor:
    """Per-sequence mean KL(pre ‖ post) of the next-token distributions at the answer positions."""
    a, lb = lm.aligned(pre, labels, family)
    b, _ = lm.aligned(post, labels, family)
    mask = (lb != lm.IGNORE).float()
    lp, lq = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def exact_match(logits: torch.Tensor, labels: torch.Tensor, family: str) -> torch.Tensor:
    lg, lb = lm.aligned(logits, labels, family)
    mask = lb != lm.IGNORE
    return ((lg.argmax(-1) == lb) | ~mask).all(-1).float()


def changed_tokens(pre: torch.Tensor, post: torch.Tensor, labels: torch.Tensor, family: str) -> torch.Tensor:
    """Share of answer tokens whose top-1 prediction the edit changed (MEND's 'drawdown' on locality)."""
    a, lb = lm.aligned(pre, labels, family)
    b, _ = lm.aligned(post, labels, family)
    mask = lb != lm.IGNORE
    return ((a.argmax(-1) != b.argmax(-1)) & mask).sum() / mask.sum().clamp(min=1)


# ----- the hypernetwork interface ----------------------------------------------------------------------
class HyperNet(nn.Module):
    """An editor network: ``deltas(model, tok, family, requests)`` → {param: ΔW (out, in)}."""

    method = "hypernet"

    def __init__(self, sites: Sequence[Site]) -> None:
        super().__init__()
        self.sites = list(sites)
        self.max_length: int | None = None
        self.smoothing = 0.0

    def edit_batch(self, tok, family: str, requests: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        return encode(tok, family, [(r.rewrite_prompt, r.target_new) for r in requests], self.max_length,
                      "rewrite prompt + target_new", requests)

    def factors(self, model, tok, family: str, requests: Sequence[EditRequest]) -> GradFactors:
        device = next(model.parameters()).device
        batch = lm.to_device(self.edit_batch(tok, family, requests), device)
        return gradient_factors(model, family, self.sites, batch, self.smoothing)

    def deltas(self, model, tok, family: str, requests: Sequence[EditRequest],
               groups: Sequence[Sequence[int]] | None = None) -> list[dict[str, torch.Tensor]]:
        """One delta dict per group of request indices (each group edited jointly; default: all at once)."""
        raise NotImplementedError


def site_key(site: Site) -> str:
    return site.module.replace(".", "__")


def sites_fingerprint(model: nn.Module, sites: Sequence[Site]) -> str:
    params = dict(unwrap(model).named_parameters())
    h = hashlib.sha256()
    for s in sites:
        h.update(params[s.param].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def editor_meta(model: nn.Module, adapter, source: str, sites: Sequence[Site], method: str) -> dict:
    return {"method": method, "model_source": str(source), "model_type": adapter.model_type,
            "sites": [asdict(s) for s in sites], "fingerprint": sites_fingerprint(model, sites)}


def check_meta(saved: dict, here: dict, where: str, allow_other_weights: bool = False) -> None:
    """Refuse an editor trained for another model or other layers, naming what differs."""
    if saved.get("method") != here["method"]:
        raise EditorCheckpointError(f"{where} is a {saved.get('method')!r} editor, not a {here['method']!r} one")
    if saved.get("model_type") != here["model_type"]:
        raise EditorCheckpointError(
            f"{where} was trained for a {saved.get('model_type')} model ({saved.get('model_source')}), "
            f"not this {here['model_type']} ({here['model_source']})")
    s_sites = [(s["param"], s["out_features"], s["in_features"]) for s in saved.get("sites", [])]
    h_sites = [(s["param"], s["out_features"], s["in_features"]) for s in here["sites"]]
    if s_sites != h_sites:
        raise EditorCheckpointError(
            f"{where} edits {[f'{p} {o}x{i}' for p, o, i in s_sites]} of {saved.get('model_source')} but this "
            f"model/layer choice ({here['model_source']}) gives {[f'{p} {o}x{i}' for p, o, i in h_sites]}: it was "
            "trained for another model or other layers")
    if saved.get("fingerprint") != here["fingerprint"] and not allow_other_weights:
        raise EditorCheckpointError(
            f"{where} was trained on other weights ({saved.get('model_source')}, fingerprint "
            f"{saved.get('fingerprint')}) than this model ({here['model_source']}, {here['fingerprint']}); "
            "an editor learns one model's gradients (pass allow_other_weights=true to use it anyway)")


# ----- applying a trained editor (lethe edit) -------------------------------------------------------------
EDITOR_WEIGHTS = "editor.safetensors"  # an exported editor: its network's tensors ...
EDITOR_JSON = "editor.json"  # ... and what it is (hyperparameters, the model and sites it was trained for)


def export_editor(state_dict: dict[str, torch.Tensor], hyper_parameters: dict, meta: dict, dest: str | Path) -> Path:
    """Write a trained editor as ``dest/editor.safetensors`` + ``dest/editor.json`` (atomically): tensors
    and JSON only, so loading it can never run code. ``state_dict`` keys start with ``net.``."""
    import json

    from safetensors.torch import save_file

    from lethe.io import atomic_path

    with atomic_path(dest, is_dir=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / EDITOR_WEIGHTS))
        (tmp / EDITOR_JSON).write_text(json.dumps({"format": "lethe-editor-v1", "hyper_parameters": hyper_parameters,
                                                   EDITOR_META_KEY: meta}, indent=1, default=str) + "\n")
    return Path(dest)


def load_editor_checkpoint(path: str | Path) -> dict:
    """A trained editor as ``{"state_dict", "hyper_parameters", EDITOR_META_KEY}``, from an exported editor
    folder (``editor.safetensors`` + ``editor.json``) or a ``lethe fit`` checkpoint (read with
    ``weights_only=True``); any other file is refused, naming it."""
    import json

    path = Path(path)
    if path.is_dir() or path.name in (EDITOR_WEIGHTS, EDITOR_JSON):
        folder = path if path.is_dir() else path.parent
        for name in (EDITOR_WEIGHTS, EDITOR_JSON):
            if not (folder / name).is_file():
                raise EditorCheckpointError(f"{folder} is not an exported lethe editor: {name} is missing")
        try:
            from safetensors.torch import load_file

            info = json.loads((folder / EDITOR_JSON).read_text())
            state = load_file(str(folder / EDITOR_WEIGHTS))
        except Exception as err:  # bad JSON, a truncated safetensors file
            raise EditorCheckpointError(f"{folder}: the exported editor cannot be read ({err})") from err
        if EDITOR_META_KEY not in info:
            raise EditorCheckpointError(f"{folder / EDITOR_JSON}: no {EDITOR_META_KEY!r} entry")
        return {"state_dict": state, "hyper_parameters": info.get("hyper_parameters", {}),
                EDITOR_META_KEY: info[EDITOR_META_KEY]}
    if not path.is_file():
        raise FileNotFoundError(f"editor checkpoint {path} does not exist (train one with `lethe fit`)")
    try:  # tensors and plain containers only: a checkpoint from elsewhere must not be able to run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, zip errors ...
        raise EditorCheckpointError(f"{path}: not a loadable lethe editor checkpoint (read with weights_only=True, "
                                    f"so objects other than tensors and plain containers are refused): {err}") from err
    if EDITOR_META_KEY not in ckpt:
        raise EditorCheckpointError(f"{path} is not a lethe MEND/KE editor checkpoint (no {EDITOR_META_KEY!r})")
    return ckpt


class HypernetEditor:
    """``Editor`` for ``lethe edit``: edits requests with a trained MEND/KE checkpoint.

    Args: checkpoint — the exported editor folder ``lethe fit`` writes at the end (``runs/mend_decoder/editor``:
    safetensors + JSON) or one of its checkpoints (``runs/mend_decoder/checkpoints/last.ckpt``);
    batch_size — requests edited jointly in one update (None: all requests of a call together);
    allow_other_weights — use an editor trained on other weights of the same architecture and layers.
    """

    name = "hypernet"
    method = "hypernet"

    def __init__(self, checkpoint: str, batch_size: int | None = None, allow_other_weights: bool = False) -> None:
        self.checkpoint = str(checkpoint)
        self.batch_size = batch_size
        self.allow_other_weights = allow_other_weights
        self._ckpt: dict | None = None
        self._nets: dict[int, HyperNet] = {}

    net_class: type[HyperNet]  # the editor network a subclass applies (built by its ``from_hparams``)

    def net_for(self, loaded) -> HyperNet:
        key = id(unwrap(loaded.model))
        if key in self._nets:
            return self._nets[key]
        if self._ckpt is None:
            self._ckpt = load_editor_checkpoint(self.checkpoint)
        ckpt = self._ckpt
        hp = dict(ckpt.get("hyper_parameters", {}))
        saved = ckpt[EDITOR_META_KEY]
        try:
            sites = resolve_sites(loaded.model, loaded.adapter, hp["layers"], hp["kinds"], hp.get("stack"))
        except (ValueError, IndexError) as err:
            raise EditorCheckpointError(f"{self.checkpoint}: its layers {hp.get('layers')} do not exist in this "
                                        f"model ({loaded.source}): {err}") from err
        here = editor_meta(loaded.model, loaded.adapter, loaded.source, sites, self.method)
        check_meta(saved, here, self.checkpoint, self.allow_other_weights)
        net = self.net_class.from_hparams(hp, sites, loaded)
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(state, strict=True)
        net.max_length = hp.get("max_length") or context_length(loaded.model)
        net.to(next(loaded.model.parameters()).device).eval()
        self._nets[key] = net
        return net

    def edit(self, loaded, requests: Sequence[EditRequest]) -> EditArtifact:
        requests = list(requests)
        if not requests:
            raise ValueError("no edit requests")
        net = self.net_for(loaded)
        k = self.batch_size or len(requests)
        groups = [list(range(i, min(len(requests), i + k))) for i in range(0, len(requests), k)]
        with torch.no_grad():
            per_group = net.deltas(loaded.model, loaded.tokenizer, loaded.family, requests, groups)
        total: dict[str, torch.Tensor] = {}
        for d in per_group:
            for n, t in d.items():
                total[n] = total[n] + t if n in total else t
        before = EditArtifact.snapshot(loaded.model, list(total))
        params = dict(unwrap(loaded.model).named_parameters())
        by_param = {s.param: s for s in net.sites}
        with torch.no_grad():
            for n, d in total.items():
                params[n].add_(param_layout(by_param[n], d).to(params[n].dtype))
        return EditArtifact.from_weights(self.method, str(loaded.source), before, loaded.model, requests,
                                         {"checkpoint": self.checkpoint, "groups": len(groups)})


def grads_from_loss_check(model: nn.Module, family: str, site: Site, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """∇W (out, in) of the summed per-sequence NLL by plain autograd on the parameter (a test reference)."""
    p = dict(unwrap(model).named_parameters())[site.param]
    flag = p.requires_grad
    p.requires_grad_(True)
    try:
        with torch.enable_grad():
            loss = token_loss(lm.forward_logits(model, batch, family), batch["labels"], family).sum()
            (g,) = torch.autograd.grad(loss, [p])
    finally:
        p.requires_grad_(flag)
    return g.T if site.transposed else g
