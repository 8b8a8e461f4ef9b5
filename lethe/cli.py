"""The ``lethe`` command.

Training jobs (``fit``, ``validate``, ``test``, ``predict``) are Lightning's own
subcommands through ``LightningCLI``: ``--config configs/<preset>.yaml``,
``--print_config``, ``--ckpt_path last`` to resume. Every run lives in one
predictable folder, ``<run.root>/<run.name>/``: its checkpoints
(``checkpoints/last.ckpt``), its CSV metrics, its wandb files and id, so that a
resumed run continues the same logger run instead of scattering versions.

Jobs that train nothing (editing, attribution, tracing, building the world) are
further entries of the same ``COMMANDS`` table; each points at a ``main(argv)``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import uuid
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lethe.registry import import_object

# Callbacks every training job gets unless its preset already has one of the class, by class path as in a
# preset (lethe/ imports nothing from callbacks/).
DEFAULT_CALLBACKS = ("callbacks.process_group.CleanDistributedExit", "callbacks.progress.LineProgress",
                     "callbacks.interrupt.SaveOnInterrupt")

# The one command table: name -> (what runs it, one line of help). LightningCLI runs the training jobs
# (``--config``, ``--print_config``, ``--ckpt_path last``); every other job is a ``module:main(argv)`` whose
# parser is a jsonargparse ArgumentParser too (``--config`` YAML, ``--help``). Later features add one line.
LIGHTNING = "lightning"
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": (LIGHTNING, "train a method (unlearning, an editor hypernetwork, a language model) from a preset"),
    "validate": (LIGHTNING, "run a preset's validation loop"),
    "test": (LIGHTNING, "run a preset's test loop"),
    "predict": (LIGHTNING, "run a preset's predict loop"),
    "edit": ("lethe.edit_cli:main", "apply an editor (ROME, MEMIT, AlphaEdit, MEND, KE, KN, FT-L) to edit requests from a preset"),
    "rollback": ("lethe.rollback_cli:main", "take single edits back out of a sequential `lethe edit` run"),
    "attribute": ("lethe.attribute_cli:main", "Knowledge-Neurons attribution: scores, refined neurons, heatmaps"),
    "trace": ("lethe.trace_cli:main", "causal tracing: where a model stores a fact, as a heatmap"),
    "world": ("lethe.world_models:main", "build the synthetic world and pretrain its tiny models (cached)"),
    "evaluate": ("lethe.evaluate_cli:main", "is it really gone? membership inference, privleak and recovery attacks"),
}
TRAINER_COMMANDS = {name: help_ for name, (target, help_) in COMMANDS.items() if target == LIGHTNING}


def _available_commands() -> dict[str, tuple[str, str]]:
    """The non-training commands whose module is installed."""
    out = {}
    for name, (target, help_) in COMMANDS.items():
        if target != LIGHTNING and importlib.util.find_spec(target.split(":")[0]) is not None:
            out[name] = (target, help_)
    return out


FINISHED = "finished.json"  # in a run folder: the fit ended normally; resuming it is a no-op unless run.continue


class ConfigError(ValueError):
    """A preset (or a command-line value) that does not make a valid job; names the preset file."""


class SaveConfigWhenStarted(SaveConfigCallback):
    """Writes the run's ``config.yaml`` only once the job has really started (after the model, data,
    optimiser and any checkpoint were set up without error), so a failed command leaves an existing
    run's config untouched."""

    _stage = "fit"

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage

    def _save(self, trainer, pl_module) -> None:
        if not self.already_saved:
            super().setup(trainer, pl_module, self._stage)

    def on_train_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)


class LetheCLI(LightningCLI):
    """LightningCLI plus lethe's run folder, loggers and checkpointing."""

    def instantiate_classes(self) -> None:
        # an error building the model or data names the preset it came from
        try:
            super().instantiate_classes()
        except Exception as err:
            sub = getattr(self, "subcommand", None)
            files = [str(f) for f in ((self.config[sub] if sub else self.config).get("config") or [])]
            where = " + ".join(files) if files else "the command line"
            raise ConfigError(f"{where}: {user_error(err)}") from err

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run.name", type=str | None, default=None,
                            help="run name; the run folder is <run.root>/<run.name> (default: the preset's name)")
        parser.add_argument("--run.root", type=str, default="runs", help="folder holding all runs")
        parser.add_argument("--run.logger", type=str, default="csv",
                            help="csv, wandb, csv+wandb or none (wandb honours WANDB_MODE=offline)")
        parser.add_argument("--run.project", type=str, default="lethe", help="wandb project")
        parser.add_argument("--run.save_every_n_steps", type=int | None, default=50,
                            help="update checkpoints/last.ckpt every N training steps, so a killed run resumes "
                                 "from there (null: only at the end)")
        parser.add_argument("--run.continue", type=bool, default=False,
                            help="resume a run whose stop rule ended it and train on; without it (or, for a run "
                                 "that used up its steps, a larger --trainer.max_steps) resuming a finished run "
                                 "changes nothing")

    def _run_settings(self, subcommand: str | None = None):
        subcommand = subcommand or getattr(self, "subcommand", None)
        cfg = self.config[subcommand] if subcommand else self.config
        run = cfg.get("run")
        name = run.get("name")
        if not name:
            configs = cfg.get("config") or []
            name = Path(str(configs[-1])).stem if configs else "run"
        return run, name, Path(run.get("root") or "runs") / name

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, before anything else: a damaged file must
        # fail with its name, not with an unpickling error
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and str(ckpt) not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(ckpt)
        if sub == "fit" and ckpt:
            run, name, run_dir = self._run_settings(sub)
            done = run_dir / FINISHED
            if done.is_file() and not run.get("continue"):
                info = json.loads(done.read_text())
                max_steps = (self.config[sub].get("trainer") or {}).get("max_steps")
                new_budget = (not info.get("stopped_by_rule") and isinstance(max_steps, int)
                              and max_steps > int(info.get("global_step", 0)))
                if not new_budget:  # a larger step budget for a run that used up its own is asking to continue
                    print(f"lethe: run {name} already finished at step {info.get('global_step')} "
                          f"({info.get('reason')}); nothing was changed. To train on, give a larger "
                          "--trainer.max_steps, or --run.continue true for a run its stop rule ended.")
                    raise SystemExit(0)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        # a fit that really starts (fresh, resumed or continued) is not finished until it ends
        (Path(self.trainer.default_root_dir) / FINISHED).unlink(missing_ok=True)
        ckpt = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt:  # the CSV rows the interrupted run wrote after this checkpoint are replaced by the resumed run's
            path = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
            step = resumed_log_step(path)
            for logger in self.trainer.loggers:
                if hasattr(logger, "resume_step"):
                    logger.resume_step = step

    def after_fit(self) -> None:
        """Mark the run finished (stop rule or step budget reached), so resuming it later changes nothing."""
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.interrupted:
            return
        from lethe.io import write_json

        stopped = trainer.should_stop and (trainer.max_steps < 0 or trainer.global_step < trainer.max_steps)
        write_json(Path(trainer.default_root_dir) / FINISHED,
                   {"global_step": trainer.global_step, "stopped_by_rule": bool(stopped),
                    "reason": "stopped by a callback's rule" if stopped else "step or epoch budget reached"})

    def instantiate_trainer(self, **kwargs):
        run, name, run_dir = self._run_settings()
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("default_root_dir", str(run_dir))
        if trainer_cfg.get("logger") is None:
            resuming = bool(self.config[self.subcommand].get("ckpt_path")) if self.subcommand else False
            kwargs["logger"] = make_loggers(run.get("logger"), run_dir, name, run.get("project"), resuming)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if trainer_cfg.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                             every_n_train_steps=run.get("save_every_n_steps")))
            metric = getattr(self.model, "selection_metric", None)
            if metric:  # editors: also keep the best checkpoint by their validation metric, as best.ckpt
                callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor=metric, mode="max",
                                                 save_top_k=1, filename="best", auto_insert_metric_name=False))
        for path in DEFAULT_CALLBACKS:
            cls = import_object(path)
            if not any(isinstance(c, cls) for c in callbacks):
                callbacks.append(cls())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


class CheckpointError(ValueError):
    pass


# Metrics callbacks log with step = trainer.global_step (the state after that many steps); Lightning logs a
# training step's own metrics one lower (its count of batches stepped before that step), and a checkpoint
# taken at global step N records N - 1 of them. After a resume from it, Lightning's rows up to N - 1 and these
# prefixes' rows up to N are the interrupted run's valid ones; later rows are replaced by the resumed run's.
AFTER_STEP_PREFIXES = ("forgetting/", "stop_rule/", "tofu/", "mia/")


def resumed_log_step(path: Path) -> int | None:
    """The last logging step a checkpoint covers (Lightning's count of batches stepped it holds), or None."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- "best"/"hpc" names, or a file Lightning will report itself
        return None
    loop = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(loop.get("_batches_that_stepped", ckpt.get("global_step", 0)))


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Fail before training on a checkpoint that is missing or is not a PyTorch archive, naming the file."""
    import zipfile

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--ckpt_path {p}: no such checkpoint file")
    if not zipfile.is_zipfile(p):
        raise CheckpointError(f"--ckpt_path {p}: not a PyTorch checkpoint (not a zip archive; truncated or corrupt?)")
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"--ckpt_path {p}: the checkpoint archive is damaged ({err})") from err
    if bad is not None:
        raise CheckpointError(f"--ckpt_path {p}: the checkpoint archive is damaged (entry {bad} fails its CRC)")


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def wandb_run_id(run_dir: Path) -> str:
    """The run folder's wandb id: created once, reused on resume so the same wandb run continues."""
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if _rank() == 0:
        from lethe.io import atomic_path

        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(run_id + "\n")
    return run_id


def _csv_logger_class():
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        """Lightning's writer deletes an existing metrics.csv; a resumed run appends to it instead."""

        _trimmed = False
        resume_step: int | None = None  # set on a resumed run: rows logged after this checkpoint are replaced
        fresh = False  # a fresh run in an existing folder: the older metrics.csv is moved aside at the first write

        def _move_aside(self) -> None:
            if self.fresh and _rank() == 0 and os.path.isfile(self.metrics_file_path):
                old = Path(self.metrics_file_path)
                os.replace(old, old.parent / f"metrics.{int(old.stat().st_mtime)}.csv")
                self.metrics_keys = []
            self.fresh = False

        def save(self) -> None:
            if self.metrics:  # a run that failed before logging anything leaves the older file where it is
                self._move_aside()
            super().save()

        def _check_log_dir_exists(self) -> None:
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as fh:
                    self.metrics_keys = list(next(csv.reader(fh), []))

        def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
            # The first row of a resumed run: rows the interrupted run logged at or after this step (after its last
            # checkpoint) are replaced by the ones this run logs, so every step stays in metrics.csv once.
            self._move_aside()
            if not self._trimmed and (step is not None or self.resume_step is not None) \
                    and os.path.isfile(self.metrics_file_path):
                from lethe.records import atomic_write

                with open(self.metrics_file_path, newline="") as fh:
                    rows = list(csv.DictReader(fh))
                if self.resume_step is None:
                    keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
                else:
                    n = self.resume_step

                    def valid(r: dict) -> bool:
                        if not r.get("step"):
                            return True
                        s = int(float(r["step"]))
                        after_step = all(k == "step" or not v or k.startswith(AFTER_STEP_PREFIXES)
                                         for k, v in r.items())
                        return s <= n or (s == n + 1 and after_step)

                    keep = [r for r in rows if valid(r)]
                if len(keep) < len(rows):
                    import io

                    buf = io.StringIO()
                    writer = csv.DictWriter(buf, fieldnames=self.metrics_keys, lineterminator="\n")
                    writer.writeheader()
                    writer.writerows(keep)
                    atomic_write(self.metrics_file_path, buf.getvalue())
            self._trimmed = True
            super().log_metrics(metrics_dict, step)

    class RunCSVLogger(CSVLogger):
        fresh = False  # a fresh run (not a resume): an older metrics.csv is moved aside when logging starts
        resume_step: int | None = None  # the resumed checkpoint's logging step (LetheCLI.before_fit)

        @property
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
                self._experiment.fresh = self.fresh
                self._experiment.resume_step = self.resume_step
            return self._experiment

    return RunCSVLogger


def make_loggers(kind: str | None, run_dir: Path, name: str, project: str = "lethe",
                 resuming: bool = False) -> list:
    """Loggers writing into the run folder. A fresh run moves an older metrics.csv aside, never deletes it."""
    from lightning.pytorch.loggers import WandbLogger

    kinds = {k.strip() for k in (kind or "none").replace(",", "+").split("+") if k.strip()}
    unknown = kinds - {"csv", "wandb", "none"}
    if unknown:
        raise ValueError(f"unknown run.logger {sorted(unknown)}: use csv, wandb, csv+wandb or none")
    loggers = []
    if "csv" in kinds:  # a fresh run moves an older metrics.csv aside when it first logs (not if it fails before)
        csv_logger = _csv_logger_class()(save_dir=str(run_dir.parent), name=run_dir.name, version="")
        csv_logger.fresh = not resuming
        loggers.append(csv_logger)
    if "wandb" in kinds:
        run_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(name=name, project=project, save_dir=str(run_dir), id=wandb_run_id(run_dir),
                                   resume="allow"))
    return loggers or False


def run_trainer_cli(args: list[str] | None = None) -> LetheCLI:
    return LetheCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigWhenStarted,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def print_help() -> None:
    extra = _available_commands()
    width = max(len(n) for n in [*TRAINER_COMMANDS, *extra])
    lines = [
        "usage: lethe <command> [options]   (lethe <command> --help for a command's options)",
        "",
        "lethe edits and erases knowledge in transformer language models, as Lightning jobs.",
        "",
        "commands (the training jobs and edit run through LightningCLI: --config configs/<preset>.yaml,",
        "--print_config, --ckpt_path last; --debug shows a failure's traceback):",
    ]
    lines += [f"  {n.ljust(width)}  {h}" for n, (target, h) in COMMANDS.items() if target == LIGHTNING or n in extra]
    print("\n".join(lines))


OUR_PACKAGES = ("lethe", "lightning_modules", "datamodules", "callbacks")


def user_error(err: BaseException) -> str:
    """The message a user should read for ``err``: the first error lethe raised along the chain of causes (what
    is wrong, and where: file, record, field), not the wrapper a library put around it."""
    seen, chain, x = set(), [], err
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        chain.append(x)
        x = x.__cause__ or x.__context__
    ours = [e for e in chain if type(e).__module__.split(".")[0] in OUR_PACKAGES]
    pick = ours[0] if ours else (chain[-1] if isinstance(chain[-1], OSError) else chain[0])
    text = " ".join(str(pick).split()) or type(pick).__name__
    return text if ours or isinstance(pick, ValueError | OSError) else f"{type(pick).__name__}: {text}"


def _dispatch(argv: list[str], from_sys: bool) -> None:
    command = argv[0]
    if command in TRAINER_COMMANDS:
        # From the shell, LightningCLI reads sys.argv itself (DDP re-launches the same command line).
        run_trainer_cli(None if from_sys else argv)
        return
    extra = _available_commands()
    if command in extra:
        module, fn = extra[command][0].split(":")
        getattr(importlib.import_module(module), fn)(argv[1:])
        return
    print(f"lethe: unknown command {command!r}\n", file=sys.stderr)
    print_help()
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """``lethe <command> ...``. A failure ends with ONE line, ``lethe: error: ...``, and exit code 2;
    ``--debug`` (or ``LETHE_DEBUG=1``) shows the whole traceback instead."""
    from_sys = argv is None
    if from_sys:
        from lethe.interrupts import die_with_parent

        die_with_parent()  # a job started by a benchmark (run_child) stops when the benchmark is killed
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LETHE_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        if from_sys:
            sys.argv = [sys.argv[0], *argv]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help()
        return
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        _dispatch(argv, from_sys)
    except SIGTERMException:
        # Lightning leaves the fit with this SystemExit (code 0); a stopped job must not look finished
        from lethe.interrupts import sigint_received

        raise SystemExit(130 if sigint_received() else 143) from None
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:
        if debug:
            raise
        sys.stdout.flush()
        print(f"(the traceback: rerun with --debug or LETHE_DEBUG=1)\nlethe: error: {user_error(err)}",
              file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
