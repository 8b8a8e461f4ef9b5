"""The one model loader every method uses.

``load_model(name_or_path)`` takes a Hugging Face hub name, a local directory,
or a lethe alias (``lethe:world-decoder``, ``lethe:smollm2``, registered by the
modules that build those models), and returns the model, its tokenizer, its
architecture adapter and its family. Safetensors are preferred; pickled
``.bin`` weights only load with ``weights_only=True``; ``trust_remote_code`` is
off unless asked for; the tokenizer is checked against the model's vocabulary.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lethe.adapters import ArchAdapter, get_adapter

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "16": torch.float16, "16-mixed": torch.float16,
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ModelLoadError(RuntimeError):
    pass


class TokenizerMismatchError(ModelLoadError):
    pass


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: ArchAdapter
    family: str
    source: str

    def __iter__(self):  # allows ``model, tokenizer = load_model(...)[:2]``-style unpacking
        return iter((self.model, self.tokenizer))


# ---------------------------------------------------------------------------
# Aliases: "lethe:<name>" resolved to a local directory by whoever registered it.
# ---------------------------------------------------------------------------
_ALIASES: dict[str, Callable[[], Path]] = {}


def register_alias(name: str, resolver: Callable[[], Path]) -> None:
    """Register ``lethe:<name>``; ``resolver()`` builds the model if needed and returns its folder."""
    _ALIASES[name] = resolver


def resolve(name_or_path: str | os.PathLike) -> str:
    """Turn an alias into a local folder; pass hub names and paths through."""
    text = str(name_or_path)
    if text.startswith("lethe:"):
        key = text.split(":", 1)[1]
        _import_alias_providers()
        if key not in _ALIASES:
            raise ModelLoadError(f"unknown lethe model alias {text!r}; known: "
                                 f"{', '.join('lethe:' + k for k in sorted(_ALIASES))}")
        return str(_ALIASES[key]())
    return text


def _import_alias_providers() -> None:
    # Modules that register aliases; imported lazily so that loading a plain path stays cheap.
    for mod in ("lethe.world_models", "lethe.smollm2", "lethe.tofu"):
        try:
            __import__(mod)
        except ImportError:
            pass


def model_class_for(family: str):
    import transformers as tf

    return {
        "decoder": tf.AutoModelForCausalLM,
        "mlm": tf.AutoModelForMaskedLM,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
    }[family]


def family_from_config(config) -> str:
    adapter = get_adapter(getattr(config, "model_type", "?"))  # raises UnknownArchitectureError
    return adapter.family


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    present = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if not present:
        raise ModelLoadError(
            f"{path} has no weights file: expected one of {', '.join(WEIGHT_FILES)} "
            f"(found: {', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'})"
        )
    single = path / "model.safetensors"
    if single.is_file():
        _check_safetensors(single)


def _check_safetensors(path: Path) -> None:
    """Read the header so a truncated or corrupt file fails with its name, not deep inside torch."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])  # the header's offsets must fit the file
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"file is {size} bytes but its header describes {8 + header_len + end}")
    except Exception as err:
        raise ModelLoadError(f"corrupt weights file {path}: {err}") from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, local_files_only: bool | None = None):
    from transformers import AutoTokenizer

    source = resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            local_files_only=_offline(source, local_files_only))
    except OSError as err:
        raise ModelLoadError(_not_found_message(source, err)) from err
    if tok.pad_token is None:
        # Decoders often ship without a pad token; padding is masked out everywhere in lethe.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _offline(source: str, local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    if Path(source).exists():
        return True
    return offline_reason() is not None


def offline_reason() -> str | None:
    """Why the hub is out of reach (HF_HUB_OFFLINE set, or no connection to it), or None when it answers.

    Checked once per process with one short TCP connection (2 s at most), so a name that is not in the
    local cache fails at once instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    return _hub_unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.cache
def _hub_unreachable(endpoint: str) -> str | None:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=2.0).close()
    except OSError as err:
        return f"the hub ({url.hostname}:{port}) cannot be reached: {err}"
    return None


def _not_found_message(source: str, err: Exception) -> str:
    if Path(source).exists():
        return f"could not load {source}: {err}"
    reason = offline_reason()
    return (
        f"could not load {source!r}: it is not a local directory and not in the Hugging Face cache, and "
        f"{'lethe is offline (' + reason + ')' if reason else 'the hub could not provide it'}. Pass a local path (a folder with config.json and model.safetensors, "
        "e.g. one saved with save_pretrained), run once with network access to fill the cache, or use one "
        f"of lethe's offline models (lethe:world-decoder, lethe:world-mlm, lethe:world-seq2seq, "
        f"lethe:smollm2). Underlying error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )


def check_tokenizer(tokenizer, model: nn.Module, source: str = "") -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    rows = model.get_input_embeddings().weight.shape[0]
    n = len(tokenizer)
    if n > rows:
        raise TokenizerMismatchError(
            f"tokenizer/model mismatch{' for ' + source if source else ''}: the tokenizer has {n} tokens "
            f"but the model's embedding has {rows} rows; load the tokenizer that was saved with this model"
        )


def trained_checkpoint(path: str | os.PathLike) -> Path | None:
    """The Lightning checkpoint behind ``path`` when it is one (``*.ckpt``) or a ``lethe fit`` run folder without a
    saved model (``checkpoints/last.ckpt``, no ``config.json``); None for a model folder, hub name or alias."""
    p = Path(path)
    if p.is_file() and p.suffix == ".ckpt":
        return p
    if p.is_dir() and not (p / "config.json").is_file() and (p / "checkpoints" / "last.ckpt").is_file():
        return p / "checkpoints" / "last.ckpt"
    return None


def load_trained(ckpt: str | os.PathLike, device: str | torch.device | None = None) -> LoadedModel:
    """The model a ``lethe fit`` checkpoint holds: its LightningModule is rebuilt from the checkpoint's own
    hyperparameters (the class path it was trained with), the weights loaded, LoRA merged."""
    from lethe.registry import import_object

    ckpt = Path(ckpt)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        hp = state["hyper_parameters"]
        class_path = hp["_class_path"]
    except KeyError as err:
        raise ModelLoadError(f"{ckpt}: not a lethe fit checkpoint (no {err} among its hyperparameters)") from err
    except Exception as err:
        raise ModelLoadError(f"corrupt checkpoint {ckpt}: {type(err).__name__}: {err}") from err
    module = import_object(class_path).load_from_checkpoint(ckpt, map_location="cpu")
    if not hasattr(module, "merged_model"):
        raise ModelLoadError(f"{ckpt}: a {class_path} checkpoint holds no language model to load")
    model = module.merged_model().eval()
    if device is not None:
        model.to(device)
    return LoadedModel(model=model, tokenizer=module.tokenizer, adapter=module.adapter, family=module.family,
                       source=str(ckpt))


def load_model(
    name_or_path: str | os.PathLike,
    family: str | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load model + tokenizer + adapter. See the module docstring for the rules."""
    from transformers import AutoConfig

    source = resolve(name_or_path)
    ckpt = trained_checkpoint(source)
    if ckpt is not None:
        return load_trained(ckpt, device)
    local = Path(source).exists()
    if local:
        _check_local_dir(Path(source))
    offline = _offline(source, local_files_only)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision,
                                            local_files_only=offline)
    except OSError as err:
        raise ModelLoadError(_not_found_message(source, err)) from err
    except ValueError as err:
        raise ModelLoadError(f"could not read the config of {source}: {err}") from err
    adapter = get_adapter(getattr(config, "model_type", "?"))
    family = family or adapter.family
    if family != adapter.family:
        raise ModelLoadError(f"{source} is a {adapter.family} model ({config.model_type}); "
                             f"family {family!r} was asked for")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    use_st = None
    if local:
        use_st = any((Path(source) / f).is_file() for f in WEIGHT_FILES[:2]) or None
    try:
        model = model_class_for(family).from_pretrained(
            source, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=revision,
            local_files_only=offline, use_safetensors=use_st,
        )
    except OSError as err:
        raise ModelLoadError(_not_found_message(source, err)) from err
    except (RuntimeError, ValueError) as err:
        raise ModelLoadError(f"could not load the weights of {source}: {err}") from err
    tok = load_tokenizer(tokenizer or source, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    check_tokenizer(tok, model, source)
    model.eval()
    if device is not None:
        model.to(device)
    return LoadedModel(model=model, tokenizer=tok, adapter=adapter, family=family, source=source)
