"""``lethe edit --config configs/edit/<method>_<family>.yaml``: edit a model from a preset.

The preset is an ordinary Lightning ``test`` config: ``model`` is
``lightning_modules.editing.EditingModule`` (the model, the editor from ``EDITORS`` and
its arguments), ``data`` is ``datamodules.edits.EditDataModule`` (where the requests come
from). The edit-evaluation callback scores every edit; the run folder
(``runs/<name>/``) receives the metrics (CSV / wandb), ``edit_results.json``, the artifact
(``edit_artifact/``: weight deltas + requests) and the edited model (``edited_model/``).
Running the same command again resumes a sequential run from its artifact.
"""

from __future__ import annotations

from lethe.registry import Registry

# Editing methods: name -> a class with ``edit(loaded, requests) -> EditArtifact``. Add yours with one line,
# EDITORS.register("mine", "my_package.my_module:MyEditor"), or name its import path in a preset.
EDITORS = Registry("editor", {
    "rome": "lethe.rome:ROMEEditor", "memit": "lethe.memit:MEMITEditor", "mend": "lethe.mend:MENDEditor",
    "ke": "lethe.knowledge_editor:KEEditor", "kn": "lethe.knowledge_neurons:KnowledgeNeuronsEditor",
})
# Where the editors lived before lethe/ held every algorithm (accepted for one release, with a warning).
MOVED = {"lightning_modules.rome": "lethe.rome", "lightning_modules.memit": "lethe.memit",
         "lightning_modules.mend": "lethe.mend", "lightning_modules.knowledge_editor": "lethe.knowledge_editor",
         "lightning_modules.knowledge_neurons": "lethe.knowledge_neurons"}


def build_editor(editor: str, editor_args: dict | None = None):
    """An editor from a registry name or an import path (``module:Class`` / dotted), with its arguments."""
    import warnings

    for old, new in MOVED.items():
        if editor.startswith((old + ":", old + ".")):
            moved = new + editor[len(old):]
            warnings.warn(f"editor {editor!r} moved to {moved!r}; the old path is deprecated", DeprecationWarning,
                          stacklevel=2)
            editor = moved
    return EDITORS.get(editor)(**(editor_args or {}))


def main(argv: list[str] | None = None) -> None:
    import sys

    from lethe.cli import run_trainer_cli

    argv = list(sys.argv[2:] if argv is None else argv)
    if not any(a == "--trainer.inference_mode" or a.startswith("--trainer.inference_mode=") for a in argv):
        # the editors optimise vectors (ROME's v*): gradients must be available inside test_step
        argv += ["--trainer.inference_mode=false"]
    # LightningCLI reads sys.argv (so a DDP re-launch of this command line behaves the same)
    sys.argv = [sys.argv[0], "test", *argv]
    run_trainer_cli(None)
