"""Second-moment statistics C = E[k kᵀ] of an MLP's keys (the input of its output projection).

ROME's and MEMIT's closed-form updates weigh directions by C⁻¹. Users' top complaint
about the reference code is that computing C takes days and blows memory when the
sequence length defaults to the model's full context; here lengths are capped
(``max_length``), texts stream in small batches, progress is shown, the pass stops right
after the hooked module, and the result is cached on disk.

Cache: ``<cache_root>/covariance/<model-id>/<stack>.<layer>.<corpus>-<corpus-hash>.n<samples>.L<len>.safetensors``
so a different corpus or sample count gets its own file (the old one is not reused).
Each file records a fingerprint of the model's weights that shape the keys (embeddings
and the layer's MLP input projection, which ROME/MEMIT never edit); loading a cache made
by another model raises :class:`CovarianceCacheError`.

With ``torch.distributed`` initialised, each process takes every world-size-th text and
the sums are all-reduced, so the statistics of several processes equal those of one.

Corpora (``corpus=``): ``"pydoc"`` — Python's own documentation topics
(``pydoc_data.topics``, English prose shipped with every Python, so it works offline);
``"world"`` — the synthetic world's training corpus (what the world models were trained
on); ``"tofu"`` — TOFU's answers (``lethe.io.tofu_dir``); a
path to a text/JSONL/CSV file of documents; or an explicit list of strings.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lethe.adapters import ArchAdapter, unwrap
from lethe.hooks import Trace
from lethe.io import atomic_path, cache_root, tofu_dir
from lethe.precision import full_precision_call


class CovarianceCacheError(RuntimeError):
    pass


# --------------------------------------------------------------------------- solving with C
def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with a x = b for a symmetric positive semi-definite ``a`` (a covariance, or λC + KᵀK), in float64.

    Neurons that never fire (ReLU FFNs: T5) give ``a`` zero rows and columns, and keys taken from the same
    activations are zero there too, so the system stays consistent; the pseudo-inverse then gives its
    minimum-norm solution (zero on the dead neurons) where a plain solve fails as singular.
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64).to(a.device)
    try:
        return torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError:
        return torch.linalg.pinv(a, hermitian=True) @ b


# --------------------------------------------------------------------------- corpora
def _chunks(text: str, words: int) -> list[str]:
    toks = text.split()
    return [" ".join(toks[i:i + words]) for i in range(0, len(toks), words) if len(toks[i:i + words]) >= 8]


def pydoc_texts(words_per_text: int = 96) -> list[str]:
    """Python's documentation topics (``help()`` texts): real English prose available offline."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        body = re.sub(r"\s+", " ", topics[key])
        out += _chunks(body, words_per_text)
    return out


def tofu_texts(directory: str | os.PathLike | None = None) -> list[str]:
    from lethe.records import read_tofu

    path = tofu_dir(directory) / "full.json"
    if not path.is_file():
        raise FileNotFoundError(f"TOFU corpus not found at {path}; set LETHE_TOFU_DIR or use corpus='pydoc'")
    return [f"{r.question} {r.answer}" for r in read_tofu(path)]


def world_texts() -> list[str]:
    from lethe.world import load_world

    return list(load_world().training_corpus())


def load_corpus(corpus: str | Sequence[str]) -> tuple[str, list[str]]:
    """(name, texts) for a corpus spec (see the module docstring)."""
    if isinstance(corpus, str) and "+" in corpus:
        # "a+b": interleave the corpora so that the first n samples draw on all of them
        parts = [load_corpus(c)[1] for c in corpus.split("+")]
        mixed = [t for group in itertools.zip_longest(*parts) for t in group if t is not None]
        return corpus.replace("+", "_"), mixed
    if not isinstance(corpus, str):
        texts = [t for t in corpus if t and t.strip()]
        return "texts", texts
    if corpus == "pydoc":
        return "pydoc", pydoc_texts()
    if corpus == "world":
        return "world", world_texts()
    if corpus == "tofu" or corpus.startswith("tofu:"):
        return "tofu", tofu_texts(corpus.split(":", 1)[1] if ":" in corpus else None)
    path = Path(corpus)
    if path.exists():
        from lethe.records import read_text

        return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem), [r.text for r in read_text(path)]
    raise ValueError(f"unknown corpus {corpus!r}: use 'pydoc', 'world', 'tofu', a file of texts, or a list")


def _added_tokens(tok) -> str:
    """The ids the tokenizer adds around a text ("" when it adds none)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    return "" if full == plain else ",".join(map(str, full))


def corpus_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- model identity
def _tensor_hash(t: torch.Tensor) -> str:
    flat = t.detach().reshape(-1)
    if flat.numel() > 1 << 20:  # hash a strided sample of big tables: enough to tell models apart
        flat = flat[:: flat.numel() // (1 << 20) + 1]
    return hashlib.sha256(flat.to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def model_fingerprint(model: nn.Module, adapter: ArchAdapter, layer: int, stack: str | None = None) -> str:
    """Hash of the weights that shape layer ``layer``'s keys but that editors leave alone."""
    emb = adapter.embeddings(model).weight
    mlp_in = adapter.module(model, adapter.mlp_in_name(layer, stack)).weight
    return f"{_tensor_hash(emb)}-{_tensor_hash(mlp_in)}"


def model_id(model: nn.Module, source: str | None = None) -> str:
    cfg = getattr(unwrap(model), "config", None)
    base = Path(str(source)).name if source else getattr(cfg, "_name_or_path", "") or "model"
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", base.split("/")[-1] or "model")
    return f"{getattr(cfg, 'model_type', 'model')}-{base}"


# --------------------------------------------------------------------------- computing
@dataclass
class CovarianceSpec:
    corpus: str | Sequence[str] = "pydoc"
    n_samples: int = 1000
    max_length: int = 128
    batch_size: int = 8


def _encode(tok, family: str, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Plain texts as model input (no masking for MLMs: keys of ordinary tokens are what C describes)."""
    enc = tok(list(texts), add_special_tokens=True, truncation=True, max_length=max_length, padding=True,
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
@full_precision_call
def second_moment(model: nn.Module, tok, adapter: ArchAdapter, family: str, layer: int,
                  texts: Sequence[str], stack: str | None = None, max_length: int = 128, batch_size: int = 8,
                  progress: bool = True) -> tuple[torch.Tensor, int]:
    """(Σ k kᵀ in float64, number of tokens) over all non-pad tokens of ``texts`` (this process's share)."""
    from tqdm.auto import tqdm

    layer = adapter.check_layer(model, layer, stack)
    stack = stack or adapter.default_stack
    name = adapter.mlp_out_name(layer, stack)
    rank, world = _rank_world()
    mine = list(texts)[rank::world]
    device = next(model.parameters()).device
    d = adapter.ffn_width(model, layer, stack)
    total = torch.zeros(d, d, dtype=torch.float64, device=device)
    count = 0
    was_training = model.training
    model.eval()
    runner = unwrap(model).get_encoder() if family == "seq2seq" and stack == "encoder" else model
    if family == "seq2seq" and stack != "encoder":
        raise ValueError("covariance of a seq2seq model's decoder keys is not supported; edit the encoder")
    steps = range(0, len(mine), batch_size)
    for s in tqdm(steps, desc=f"covariance {name}", disable=not progress or rank != 0, leave=False):
        batch = _encode(tok, family, mine[s:s + batch_size], max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        # the hook sits on the module inside the full model; running only the encoder still reaches it
        with Trace(model, name, retain_input=True, retain_output=False, stop=True) as tr:
            runner(**batch)
        x = tr.input if tr.input.dim() == 3 else tr.input.view(*batch["input_ids"].shape, -1)  # OPT flattens
        k = x[batch["attention_mask"].bool()].to(torch.float64)
        total += k.T @ k
        count += k.shape[0]
    model.train(was_training)
    if world > 1:
        n = torch.tensor([count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(n)
        count = int(n.item())
    return total, count


def cache_path(model: nn.Module, adapter: ArchAdapter, layer: int, stack: str | None, corpus_name: str,
               chash: str, n_samples: int, max_length: int, source: str | None = None,
               cache_dir: str | os.PathLike | None = None) -> Path:
    stack = stack or adapter.default_stack
    root = Path(cache_dir) if cache_dir else cache_root() / "covariance"
    return root / model_id(model, source) / f"{stack}.{layer}.{corpus_name}-{chash}.n{n_samples}.L{max_length}.safetensors"


def load_cached(path: Path, expect_fingerprint: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        got = meta.get("model_fingerprint")
        if got != expect_fingerprint:
            raise CovarianceCacheError(
                f"covariance cache {path} was computed for another model (weights fingerprint {got}, this model "
                f"{expect_fingerprint}; made from {meta.get('model_source')!r}); delete it or use another cache_dir")
        return f.get_tensor("mom2")


def layer_covariance(model: nn.Module, tok, adapter: ArchAdapter, family: str, layer: int,
                     stack: str | None = None, corpus: str | Sequence[str] = "pydoc", n_samples: int = 1000,
                     max_length: int = 128, batch_size: int = 8, source: str | None = None,
                     cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                     progress: bool = True) -> torch.Tensor:
    """E[k kᵀ] (float64, CPU) of layer ``layer``'s keys over ``n_samples`` corpus texts, cached on disk."""
    layer = adapter.check_layer(model, layer, stack)
    corpus_name, texts = load_corpus(corpus)
    if not texts:
        raise ValueError(f"corpus {corpus_name!r} has no texts")
    texts = texts[:n_samples]
    # the tokens the tokenizer adds around a text (BOS/CLS, SEP...) are part of what C measures: a tokenizer
    # that adds others (e.g. lethe's SmolLM2 with its document-start token) gets its own cache file
    added = _added_tokens(tok)
    chash = corpus_hash(texts + [f"\x00added-tokens:{added}"] if added else texts)
    path = cache_path(model, adapter, layer, stack, corpus_name, chash, n_samples, max_length, source, cache_dir)
    fp = model_fingerprint(model, adapter, layer, stack)
    if use_cache and path.is_file():
        return load_cached(path, fp)
    total, count = second_moment(model, tok, adapter, family, layer, texts, stack, max_length, batch_size, progress)
    if count == 0:
        raise ValueError(f"corpus {corpus_name!r} produced no tokens")
    mom2 = (total / count).cpu()
    rank, _ = _rank_world()
    if use_cache and rank == 0:
        from safetensors.torch import save_file

        meta = {"model_fingerprint": fp, "model_source": str(source or model_id(model)), "layer": str(layer),
                "stack": stack or adapter.default_stack, "corpus": corpus_name, "corpus_hash": chash,
                "n_samples": str(len(texts)), "tokens": str(count), "max_length": str(max_length)}
        with atomic_path(path) as tmp:
            save_file({"mom2": mom2.contiguous()}, str(tmp), metadata=meta)
    return mom2
