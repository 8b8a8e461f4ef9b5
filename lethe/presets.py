"""The YAML presets under ``configs/`` as the one source of every final value.

``lethe edit --config configs/edit/rome_decoder.yaml`` reads a preset through LightningCLI; the
benchmarks and the Python API read the same files through ``editor_hparams`` (never a second copy
of the values in Python).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

CONFIGS_DIR = Path(os.environ.get("LETHE_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))

# Names the Python ``PRESETS`` dicts had before the values moved to YAML: name -> preset file suffix.
FORMER_NAMES = {"world-decoder": "decoder", "world-mlm": "mlm", "world-seq2seq": "seq2seq", "smollm2": "smollm2",
                "gpt2-xl": "gpt2-xl", "gpt-j": "gpt-j"}


class PresetError(ValueError):
    pass


def preset_path(name: str | os.PathLike) -> Path:
    """A preset file: a path, or a name relative to ``configs/`` (``edit/rome_decoder``, with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / path, CONFIGS_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise PresetError(f"no preset {str(name)!r}: neither a file nor a name under {CONFIGS_DIR}")


def read_preset(name: str | os.PathLike) -> dict:
    import yaml

    path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PresetError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset is a mapping, got {type(data).__name__}")
    return data


def editor_hparams(name: str | os.PathLike) -> dict:
    """``model.init_args.editor_args.hparams`` of an editing preset: every value the editor will use."""
    path = preset_path(name)
    args = (read_preset(path).get("model") or {}).get("init_args") or {}
    hparams = (args.get("editor_args") or {}).get("hparams")
    if not isinstance(hparams, dict):
        raise PresetError(f"{path}: model.init_args.editor_args.hparams is missing or not a mapping")
    return dict(hparams)


def editor_preset_for(method: str, model: str) -> Path:
    """The preset of ``method`` for a model name: the family's world preset, SmolLM2's, else GPT-2 XL's."""
    for name, suffix in FORMER_NAMES.items():
        if model.endswith(name):
            return preset_path(f"edit/{method}_{suffix}.yaml")
    return preset_path(f"edit/{method}_gpt2-xl.yaml")


def editor_preset(method: str, model: str, preset: str | os.PathLike | None = None) -> tuple[str, dict]:
    """(the preset's name relative to the checkout, its hyperparameters): ``preset`` if given, else the model's."""
    path = preset_path(preset) if preset else editor_preset_for(method, model)
    try:
        name = str(path.resolve().relative_to(CONFIGS_DIR.parent))
    except ValueError:  # a file outside the checkout: its name only, never a machine path
        name = path.name
    return name, editor_hparams(path)


def named_editor_hparams(method: str, name: str) -> dict:
    """Hyperparameters for a preset name: a former Python preset name (deprecated) or a preset file."""
    if name in FORMER_NAMES:
        path = preset_path(f"edit/{method}_{FORMER_NAMES[name]}.yaml")
        warnings.warn(f"the {method} preset name {name!r} is deprecated (its values now live in {path.name}); "
                      f"give the values or the file: editor_args.hparams: {path.relative_to(CONFIGS_DIR.parent)}",
                      DeprecationWarning, stacklevel=3)
        return editor_hparams(path)
    try:
        return editor_hparams(name)
    except PresetError as err:
        raise ValueError(f"unknown {method} preset {name!r}; former names: {sorted(FORMER_NAMES)}, or a preset "
                         f"file ({err})") from err
