"""Every training preset parses (class paths exist, arguments type-check), so no config rots."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from lethe.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _is_fit_preset(cfg: dict) -> bool:
    """A LightningCLI preset: model and data given as class paths (attribution presets name a model)."""
    return isinstance(cfg.get("model"), dict) and isinstance(cfg.get("data"), dict) and "class_path" in cfg["model"]


FIT_PRESETS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if _is_fit_preset(yaml.safe_load(p.read_text()) or {}))


def test_there_are_fit_presets():
    assert len(FIT_PRESETS) >= 5


@pytest.mark.parametrize("preset", FIT_PRESETS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_fit_preset_parses(preset):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(preset), "--print_config"])
    assert exit_.value.code in (0, None), out.getvalue()[-2000:]
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


LOCATE_EDIT_PRESETS = sorted(p for p in (ROOT / "configs" / "edit").glob("*.yaml")
                             if p.name.startswith(("rome_", "memit_", "alphaedit_", "ft_")))


@pytest.mark.parametrize("preset", LOCATE_EDIT_PRESETS, ids=lambda p: p.name)
def test_edit_preset_holds_every_value_and_print_config_shows_them(preset, monkeypatch):
    """Final values in YAML: a ROME/MEMIT preset names every hyperparameter, and --print_config prints them."""
    import dataclasses
    import sys

    from lethe.edit_cli import EDITORS
    from lethe.edit_cli import main as edit_main

    cfg = yaml.safe_load(preset.read_text())["model"]["init_args"]
    editor = EDITORS.get(cfg["editor"])
    fields = {f.name for f in dataclasses.fields(editor.hparams_class)}
    assert set(cfg["editor_args"]["hparams"]) == fields, preset.name
    out = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["lethe", "edit"])
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        edit_main(["--config", str(preset), "--print_config"])
    assert exit_.value.code in (0, None), out.getvalue()[-2000:]
    printed = yaml.safe_load(out.getvalue())["model"]["init_args"]["editor_args"]["hparams"]
    assert printed == cfg["editor_args"]["hparams"]
