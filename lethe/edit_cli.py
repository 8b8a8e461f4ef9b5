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
    "rome": "lethe.rome:ROMEEditor", "memit": "lethe.memit:MEMITEditor", "alphaedit": "lethe.alphaedit:AlphaEditEditor",
    "ft": "lethe.ft:FTEditor", "mend": "lethe.mend:MENDEditor",
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


HELP = """usage: lethe edit --config configs/edit/<method>_<family>.yaml [--<section>.<key> VALUE ...] [--debug]

Edit a model from a preset: every request of the data source is given to the editor, each edit is scored
(CounterFact and token-accuracy protocols) and saved as an artifact (the weight deltas and the requests).

editors (model.init_args.editor; editor_args are the editor's arguments):
{editors}
  or an import path module:Class of your own editor (edit(loaded, requests) -> EditArtifact)

sources (data.init_args.source; kind: counterfact or zsre; limit / offset / seed / batch_size):
  world[:train|unseen]   lethe's synthetic world (for the lethe:world-* models)
  real_facts             the bundled real facts SmolLM2 knows
  <file>                 a CounterFact / zsRE file (JSON, JSONL or CSV); errors name file, record and field

outputs, in <run.root>/<run.name>/ (default runs/<preset name>/):
  edit_artifact/         sequential runs: the running sum of all edits so far, saved after every batch
  edit_artifacts/NNNNN/  independent runs (sequential: false): one artifact per batch, each reverted after scoring
  edit_results.json      per-edit scores; metrics.csv (and wandb with --run.logger csv+wandb)
  edited_model/          the edited model (save_model: true)

resume: running the same command again continues a sequential run after its last saved batch
(model.init_args.resume: false starts over). Every option of a preset, with its value:
  lethe edit --config <preset> --print_config
"""


EDITOR_HELP = {
    "rome": "ROME: one fact at a time, a rank-one update of one MLP (editor_args: hparams, overrides)",
    "memit": "MEMIT: a batch of facts in one call, spread over several MLPs (editor_args: hparams, overrides)",
    "alphaedit": "AlphaEdit: MEMIT with its update projected onto the preserved keys' null space (long streams)",
    "ft": "FT-L: constrained fine-tuning of MLP output projections (a baseline; editor_args: hparams)",
    "mend": "MEND: a trained hypernetwork (editor_args.checkpoint from lethe fit configs/edit/mend_*.yaml)",
    "ke": "KnowledgeEditor: a trained hypernetwork (editor_args.checkpoint from configs/edit/ke_*.yaml)",
    "kn": "Knowledge Neurons: attribute the fact, then rewrite its neurons' value slots",
}


def _help_text() -> str:
    lines = [f"  {name:<22} {EDITOR_HELP.get(name, 'a registered editor')}" for name in EDITORS.names()]
    return HELP.format(editors="\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    import sys

    from lethe.cli import run_trainer_cli

    argv = list(sys.argv[2:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(_help_text())
        return
    if not any(a == "--trainer.inference_mode" or a.startswith("--trainer.inference_mode=") for a in argv):
        # the editors optimise vectors (ROME's v*): gradients must be available inside test_step
        argv += ["--trainer.inference_mode=false"]
    # LightningCLI reads sys.argv (so a DDP re-launch of this command line behaves the same)
    sys.argv = [sys.argv[0], "test", *argv]
    run_trainer_cli(None)
