"""The lethe command: help lists every subcommand; a 2-process run resumes in the same run folder."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lethe.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
LETHE = [sys.executable, "-m", "lethe.cli"]


def _env():
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_help_lists_subcommands():
    out = subprocess.run([*LETHE, "--help"], capture_output=True, text=True, env=_env(), check=True).stdout
    from lethe.cli import COMMANDS, TRAINER_COMMANDS, _available_commands

    available = _available_commands()
    assert {"world", "edit"} <= set(available)
    for sub in ("fit", "validate", "test", "predict", *available):
        assert f"  {sub}" in out, (sub, out)
    assert len([line for line in out.splitlines() if line.startswith("  ")]) == len(TRAINER_COMMANDS) + len(available)
    for sub in set(COMMANDS) - set(available) - set(TRAINER_COMMANDS):  # listed only once its module exists
        assert f"  {sub} " not in out


def test_unknown_command_fails_clearly():
    res = subprocess.run([*LETHE, "frobnicate"], check=False, capture_output=True, text=True, env=_env())
    assert res.returncode == 2 and "unknown command 'frobnicate'" in res.stderr


def _preset(tmp_path: Path) -> Path:
    model_dir = save_tiny("gpt2", tmp_path / "tiny-gpt2")
    texts = [" ".join(f"w{(i * 7 + j) % 80}" for j in range(8)) for i in range(32)]
    preset = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 2,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "lightning_modules.lm.LanguageModelModule",
                  "init_args": {"model": str(model_dir), "lr": 1e-3}},
        "data": {"class_path": "datamodules.lm.LMDataModule",
                 "init_args": {"texts": texts, "batch_size": 4, "max_length": 16}},
        "run": {"root": str(tmp_path / "runs"), "name": "ddp-resume", "logger": "csv+wandb"},
    }
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _fit(preset: Path, *extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run([*LETHE, "fit", "--config", str(preset), *extra], check=False, capture_output=True,
                         text=True, env=_env(), cwd=preset.parent, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


@pytest.mark.slow
def test_two_process_run_resumes_same_steps_and_same_logger_run(tmp_path):
    preset = _preset(tmp_path)
    run_dir = tmp_path / "runs" / "ddp-resume"
    _fit(preset)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2
    wandb_id = (run_dir / "wandb_id").read_text().strip()

    # resume: continue to step 4 in the same run folder, same wandb id, same metrics file
    _fit(preset, "--trainer.max_steps", "4", "--ckpt_path", "last")
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    assert (run_dir / "wandb_id").read_text().strip() == wandb_id
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").iterdir() if p.name.startswith("offline-run"))
    assert wandb_runs and all(name.endswith(wandb_id) for name in wandb_runs), wandb_runs
    with open(run_dir / "metrics.csv") as fh:
        steps = sorted({int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")})
    assert steps == [0, 1, 2, 3], steps  # the resumed run appended steps 2 and 3 to the same file
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("version")) == []
    # the saved config names the run, so the same command line resumes it
    assert (run_dir / "config.yaml").is_file()


def _unlearn_preset(tmp_path: Path, **init_args) -> Path:
    model_dir = save_tiny("gpt2", tmp_path / "tiny-gpt2")
    preset = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "enable_progress_bar": False},
        "model": {"class_path": "lightning_modules.unlearning.UnlearningModule",
                  "init_args": {"model": str(model_dir), **init_args}},
        "data": {"class_path": "datamodules.forget_retain.ForgetRetainDataModule",
                 "init_args": {"forget_texts": ["w1 w2 w3 w4"], "batch_size": 1}},
        "run": {"root": str(tmp_path / "runs"), "name": "bad"},
    }
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


BAD_INPUT = {  # case -> (model.init_args, extra command-line arguments, what the last line must say)
    "unknown method": ({"method": "bogus"}, [], "method='bogus' is not an unlearning method"),
    "unknown objective argument": ({"method": "npo", "method_args": {"betta": 1}}, [],
                                   "method_args: npo has no argument(s) ['betta']"),
    "unknown retain loss": ({"method": "ga", "retain_loss": "bogus"}, [], "'bogus'"),
    "layer index out of range": ({"method": "rmu", "method_args": {"layer": 9}}, [],
                                 "layer 9 is out of range: this gpt2 model's"),
    "negative learning rate": ({"lr": -1e-3}, [], "model.init_args.lr=-0.001: must be a finite number >= 0"),
    "corrupt checkpoint": ({}, ["--ckpt_path", "{tmp}/junk.ckpt"], "junk.ckpt: not a PyTorch checkpoint"),
    "missing checkpoint": ({}, ["--ckpt_path", "{tmp}/gone.ckpt"], "gone.ckpt: no such checkpoint file"),
    "unknown model (HF_HUB_OFFLINE)": ({}, ["--model.init_args.model", "no-such-org/no-such-model"],
                                       "lethe is offline (HF_HUB_OFFLINE is set)"),
    "unknown model (no network)": ({}, ["--model.init_args.model", "no-such-org/no-such-model"],
                                   "lethe is offline (the hub (127.0.0.1:9) cannot be reached"),
    "unknown record kind": ({}, ["--data.init_args.kind", "pairs"], "data.init_args.kind='pairs': expected one of"),
    "bad record in a data file": ({}, ["--data.init_args.forget", "{tmp}/forget.jsonl", "--data.init_args.kind",
                                       "tofu", "--data.init_args.forget_texts", "null"],
                                  "forget.jsonl: line 2: field 'answer': missing field"),
    "tokenizer/model mismatch": ({"tokenizer": "{tmp}/big-tok"}, [], "tokenizer/model mismatch"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_ends_with_one_line_naming_what_is_wrong_and_changes_no_file(tmp_path, capsys, monkeypatch, case):
    """Every row of the bad-input table: exit code 2, the last line names the file / record / field, and an
    existing run folder of the same name (config.yaml, metrics.csv, a checkpoint) is left byte for byte."""
    from lethe.cli import main
    from lethe.models import _hub_unreachable

    init, extra, want = BAD_INPUT[case]
    fill = lambda v: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
    preset = _unlearn_preset(tmp_path, **{k: fill(v) for k, v in init.items()})
    extra = [fill(a) for a in extra]
    (tmp_path / "junk.ckpt").write_bytes(b"\x80\x04not a zip")
    (tmp_path / "forget.jsonl").write_text('{"question": "w1 w2", "answer": "w3"}\n{"question": "w4 w5"}\n')
    if case == "tokenizer/model mismatch":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp_path / "tiny-gpt2"))
        tok.add_tokens([f"extra{i}" for i in range(5000)])
        tok.save_pretrained(str(tmp_path / "big-tok"))
    if case == "unknown model (no network)":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
        _hub_unreachable.cache_clear()
    run = tmp_path / "runs" / "bad"  # an earlier run of the same name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("# the earlier run's config\n")
    (run / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"earlier")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(preset), *extra])
    _hub_unreachable.cache_clear()
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lethe: error: ") and want in last, last
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert after == before  # no file written, moved or changed


def test_edit_help_documents_editors_sources_outputs_and_resume():
    res = subprocess.run([*LETHE, "edit", "--help"], capture_output=True, text=True, env=_env(), check=True)
    from lethe.edit_cli import EDITORS

    for word in (*EDITORS.names(), "world[:train|unseen]", "real_facts", "edit_artifact/", "resume",
                 "--print_config"):
        assert word in res.stdout, word
    assert "Perform one evaluation epoch" not in res.stdout  # not Lightning's generic test help


def test_progress_lines_when_output_is_not_a_terminal():
    import io

    from lethe.progress import Progress

    out = io.StringIO()  # not a terminal
    bar = Progress(20, "ROME edits", every=5, seconds=1e9, stream=out)
    for _ in range(20):
        bar.update()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert all("/s" in line and "left" in line for line in lines)


def test_resuming_a_finished_run_changes_no_file_unless_asked_to_continue(tmp_path):
    from lethe.cli import main

    model_dir = save_tiny("gpt2", tmp_path / "tiny-gpt2")
    preset = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "enable_progress_bar": False,
                    "log_every_n_steps": 1},
        "model": {"class_path": "lightning_modules.lm.LanguageModelModule", "init_args": {"model": str(model_dir)}},
        "data": {"class_path": "datamodules.lm.LMDataModule",
                 "init_args": {"texts": ["w1 w2 w3 w4", "w5 w6 w7 w8"] * 4, "batch_size": 2}},
        "run": {"root": str(tmp_path / "runs"), "name": "done"},
    }
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    main(["fit", "--config", str(path)])
    run = tmp_path / "runs" / "done"
    assert (run / "finished.json").is_file()

    def snapshot():
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}

    before = snapshot()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path), "--ckpt_path", "last"])
    assert exit_.value.code == 0
    assert snapshot() == before  # nothing rewritten
    main(["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_steps", "4"])  # a new budget
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4


def _ga_preset(tmp_path: Path, name: str, signal_at: int | None, signum: int = 15, save_every: int = 100) -> Path:
    model_dir = tmp_path / "tiny-gpt2"
    if not model_dir.exists():
        save_tiny("gpt2", model_dir)
    texts = [" ".join(f"w{(i * 7 + j) % 80}" for j in range(6)) for i in range(8)]
    callbacks = [] if signal_at is None else [{"class_path": "lethe.testing.SignalAtStep",
                                               "init_args": {"step": signal_at, "signum": signum}}]
    preset = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks},
        "model": {"class_path": "lightning_modules.unlearning.UnlearningModule",
                  "init_args": {"model": str(model_dir), "method": "graddiff", "lr": 1e-3}},
        "data": {"class_path": "datamodules.forget_retain.ForgetRetainDataModule",
                 "init_args": {"forget_texts": texts[:4], "retain_texts": texts[4:], "batch_size": 1}},
        "run": {"root": str(tmp_path / "runs"), "name": name, "save_every_n_steps": save_every},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "at", "saved"), [(15, 2, 2), (15, 4, 4), (9, 3, 2), (9, 5, 4), (2, 3, 3)],
                         ids=["sigterm-mid-epoch", "sigterm-epoch-boundary", "kill9-mid-epoch", "kill9-epoch-boundary",
                              "ctrl-c-mid-epoch"])
def test_interrupted_run_resumes_to_the_same_weights_and_rows(tmp_path, signum, at, saved):
    """4 forget batches per epoch. SIGTERM after step 2 (mid-epoch) or 4 (the epoch's last batch) saves that
    step and exits 143; kill -9 after step 3 or 5 leaves the checkpoint of step 2 or 4 (saved every 2 steps)."""
    def run(preset: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*LETHE, "fit", "--config", str(preset), *extra], capture_output=True, text=True,
                              env={**_env(), "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=600, check=False)

    full = run(_ga_preset(tmp_path, "full", None))
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = _ga_preset(tmp_path, "stopped", at, signum, save_every=2)
    res = run(stopped)
    assert res.returncode == {15: 143, 9: -9, 2: 130}[signum], (res.returncode, res.stderr[-3000:])
    ckpt = tmp_path / "runs" / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] == saved
    resumed = run(_ga_preset(tmp_path, "stopped", None, save_every=2), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = torch.load(tmp_path / "runs" / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    got = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6
    assert max(float((want[k].float() - got[k].float()).abs().max()) for k in want) == 0.0
    with open(tmp_path / "runs" / "stopped" / "metrics.csv") as fh:
        steps = [row["step"] for row in csv.DictReader(fh) if row.get("train/loss")]
    assert len(steps) == len(set(steps)) == 6, steps  # each step logged once


@pytest.mark.slow
def test_readme_main_job_killed_after_30_s_resumes_from_its_checkpoint(tmp_path):
    """The README's main job with its preset's defaults, killed (-9) 30 s after it started: --ckpt_path last
    resumes from the checkpoint it left (not from step 0) and every step is logged once."""
    import time

    from lethe.world_models import ensure_world_model

    ensure_world_model("decoder", progress=False)  # a first build is not part of the 30 s
    preset = ROOT / "configs" / "unlearn" / "world_decoder_npo.yaml"
    common = ["--run.root", str(tmp_path / "runs"), "--model.init_args.save_dir", str(tmp_path / "model")]
    env = {**_env(), "OMP_NUM_THREADS": "2"}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([*LETHE, "fit", "--config", str(preset), *common], stdout=log, stderr=log, env=env,
                                cwd=tmp_path)
        time.sleep(30)
        proc.kill()
        proc.wait()
    assert proc.returncode == -9, (tmp_path / "first.log").read_text()[-3000:]
    run = tmp_path / "runs" / "world_decoder_npo"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), (tmp_path / "first.log").read_text()[-3000:]
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]
    assert saved > 0
    res = subprocess.run([*LETHE, "fit", "--config", str(preset), *common, "--ckpt_path", "last",
                          "--trainer.max_steps", str(saved + 1)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {ckpt}" in res.stdout + res.stderr
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] == saved + 1
    with open(run / "metrics.csv") as fh:
        steps = [int(float(r["step"])) for r in csv.DictReader(fh) if r.get("train/loss")]
    assert len(steps) == len(set(steps)), steps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_job_started_with_run_child_stops_when_its_parent_is_killed(tmp_path):
    """A benchmark runs `lethe fit` through lethe.interrupts.run_child; killed (even with SIGKILL), it must not
    leave the job training on. The child here calls die_with_parent as `lethe` does at start."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = (f"from lethe.interrupts import die_with_parent, PARENT_ENV; import os, time; die_with_parent(); "
             f"assert PARENT_ENV not in os.environ; "  # the job's own children (DDP ranks) must not inherit it
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    parent = (f"import sys; from lethe.interrupts import run_child; "
              f"run_child([sys.executable, '-c', {child!r}], check=False)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env)
    try:
        deadline = time.time() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.time() < deadline and proc.poll() is None, "the child did not start"
            time.sleep(0.1)
        pid = int(pid_file.read_text())

        def alive() -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                return False
            return state != "Z"

        assert alive()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 10
        while alive() and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(), "the child outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid_file.is_file() and pid_file.read_text():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
