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

# Editing methods: name -> "module:Class" of a class with ``edit(loaded, requests) -> EditArtifact``.
# Add yours with a one-line entry.
EDITORS: dict[str, str] = {
    "rome": "lightning_modules.rome:ROMEEditor", "memit": "lightning_modules.memit:MEMITEditor",
    "mend": "lightning_modules.mend:MENDEditor", "ke": "lightning_modules.knowledge_editor:KEEditor",
    "kn": "lightning_modules.knowledge_neurons:KnowledgeNeuronsEditor",
}


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
