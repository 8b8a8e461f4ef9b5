"""TOFU metrics against hand-computed values, and the evaluation of one set on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hmean

from lethe import tofu
from lethe.records import QARecord
from lethe.testing import save_tiny


def test_rouge_l_recall_by_hand():
    assert tofu.rouge_l_recall("the cat sat on the mat", "the cat sat") == 1.0
    # LCS("a x c", "a b c d") = "a c" -> 2 / 4
    assert tofu.rouge_l_recall("a x c", "a b c d") == pytest.approx(0.5)
    assert tofu.rouge_l_recall("Hello, World!", "hello world") == 1.0  # case and punctuation ignored
    assert tofu.rouge_l_recall("", "a b") == 0.0


def test_truth_ratio_forget_quality_and_utility_by_hand():
    para = np.array([1.0, 2.0])
    pert = np.array([[2.0, 4.0], [2.0, 2.0]])  # mean perturbed NLL 3 and 2
    assert tofu.truth_ratios(para, pert).tolist() == pytest.approx([math.e ** 2, 1.0])
    same = [0.1, 0.5, 0.9, 1.3]
    assert tofu.forget_quality(same, same) == pytest.approx(1.0)
    assert tofu.forget_quality([0.01, 0.02, 0.03, 0.04, 0.05], [5, 6, 7, 8, 9]) < 0.05
    res = {s: {"prob": 0.5, "rougeL_recall": 0.25, "truth_ratio": 1.0} for s in tofu.UTILITY_SETS}
    assert tofu.model_utility(res) == pytest.approx(hmean([0.5, 0.25, 1.0] * 3))
    res["retain"]["rougeL_recall"] = 0.0
    assert tofu.model_utility(res) == 0.0


def test_evaluate_set_on_tiny_model(tmp_path):
    from lethe.models import load_model

    loaded = load_model(save_tiny("gpt2", tmp_path / "m"))
    recs = [QARecord(question="w1 w2", answer="w3 w4", paraphrased_answer="w4 w3", perturbed_answer=["w5", "w6 w7"]),
            QARecord(question="w8", answer="w9", paraphrased_answer="w10", perturbed_answer=["w11", "w12"])]
    out = tofu.evaluate_set(loaded.model, loaded.tokenizer, recs, "forget", max_new_tokens=4)
    nll = tofu.mean_nll(loaded.model, loaded.tokenizer, ["w1 w2", "w8"], ["w3 w4", "w9"])
    assert out["prob"] == pytest.approx(float(np.mean(np.exp(-nll))))
    para = tofu.mean_nll(loaded.model, loaded.tokenizer, ["w1 w2", "w8"], ["w4 w3", "w10"])
    p1 = tofu.mean_nll(loaded.model, loaded.tokenizer, ["w1 w2", "w8"], ["w5", "w11"])
    p2 = tofu.mean_nll(loaded.model, loaded.tokenizer, ["w1 w2", "w8"], ["w6 w7", "w12"])
    ratio = np.exp((p1 + p2) / 2 - para)
    assert out["truth_ratios"] == pytest.approx(ratio.tolist())
    assert out["truth_ratio"] == pytest.approx(float(np.mean(np.minimum(ratio, 1 / ratio))))
    assert 0.0 <= out["rougeL_recall"] <= 1.0
    real = tofu.evaluate_set(loaded.model, loaded.tokenizer, recs, "real_authors", max_new_tokens=4)
    assert 0 < real["prob"] < 1


def test_tofu_splits_load_by_name_from_the_local_folder_when_offline(tmp_path, monkeypatch):
    """``tofu:<split>`` loads a split as users do (the hub); offline it reads $LETHE_TOFU_DIR, naming what failed."""
    from lethe.records import QARecord, read_records, write_records

    recs = [QARecord(question=f"Who wrote book {i}?", answer=f"Author {i}.") for i in range(3)]
    write_records(recs, tmp_path / "forget10.json", "tofu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LETHE_TOFU_DIR", str(tmp_path))
    got = read_records("tofu:forget10", "tofu")
    assert [(r.question, r.answer) for r in got] == [(r.question, r.answer) for r in recs]
    with pytest.raises(FileNotFoundError, match=r"'retain90'.*HF_HUB_OFFLINE.*retain90.json.*LETHE_TOFU_DIR"):
        read_records("tofu:retain90", "tofu")
    with pytest.raises(ValueError, match="use kind 'tofu'"):
        read_records("tofu:forget10", "text")


def test_no_committed_config_or_result_names_a_path_of_this_machine():
    root = Path(__file__).resolve().parents[1]
    bad = []
    for folder in ("configs", "benchmarks/results"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.suffix in (".yaml", ".yml", ".json", ".md", ".txt", ".csv"):
                text = path.read_text(errors="replace")
                bad += [f"{path.relative_to(root)}: {m}" for m in ("/work/", "/root/", "/home/", "/tmp/") if m in text]
    assert not bad, bad


# ---------------------------------------------------------------------------------------------- prompt formats


def test_prompt_format_wraps_the_question_and_the_answer_follows_without_a_space(tmp_path):
    from lethe import lm
    from lethe.models import load_model

    tok = load_model(save_tiny("gpt2", tmp_path / "m")).tokenizer
    plain = lm.encode_pairs(tok, "decoder", ["w1 w2"], ["w3 w4"])
    fmt = lm.encode_pairs(tok, "decoder", ["w1 w2"], ["w3 w4"], prompt_format="w5 {prompt} w6")
    ids = lambda b: b["input_ids"][0][b["attention_mask"][0].bool()].tolist()
    target = lambda b: [t for t in b["labels"][0].tolist() if t != -100]
    assert target(fmt) == target(plain)  # the loss is on the answer alone
    assert len(ids(fmt)) == len(ids(plain)) + 2
    assert lm.format_prompt(tok, "q?", "Question: {prompt}\nAnswer:") == "Question: q?\nAnswer:"
    assert lm.target_text("Yes.", "...assistant\n") == "Yes." and lm.target_text("Yes.", "Is it?") == " Yes."
    with pytest.raises(lm.EncodingError, match="no chat template"):
        lm.format_prompt(tok, "q?", "chat")
    with pytest.raises(lm.EncodingError, match=r"\{prompt\}"):
        lm.format_prompt(tok, "q?", "Question:")


# ---------------------------------------------------------------------------------------------- subsets, slices


def _fake_tofu(folder: Path, authors: int = 200, per: int = 20) -> None:
    """A TOFU-shaped folder: ``authors`` authors of ``per`` questions; the last 2 are forget01, last 4 forget05."""
    import json

    full = [{"question": f"Q{a}-{i}?", "answer": f"A{a}-{i}."} for a in range(authors) for i in range(per)]
    pert = lambda rows: [dict(r, paraphrased_answer=r["answer"], perturbed_answer=["x.", "y."]) for r in rows]
    files = {"full": full, "forget01": full[-2 * per:], "forget05": full[-4 * per:], "forget10": full[-20 * per:],
             "retain90": full[:-20 * per],
             "forget05_perturbed": pert(full[-4 * per:]), "retain_perturbed": pert(full[:3 * per])}
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))


def test_tofu_subset_keeps_its_authors_and_refuses_to_shrink_a_forget_split(tmp_path, monkeypatch):
    from lethe.records import read_records

    _fake_tofu(tmp_path, authors=200, per=20)
    author = lambda recs: sorted({int(r.question[1:].split("-")[0]) for r in recs})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LETHE_TOFU_DIR", str(tmp_path))
    retain = read_records("tofu:retain90", "tofu", tofu_subset="cpu40")
    assert author(retain) == list(range(30)) and len(retain) == 600
    assert author(read_records("tofu:full", "tofu", tofu_subset="cpu40")) == [*range(30), *range(190, 200)]
    assert author(read_records("tofu:forget05", "tofu", tofu_subset="cpu40")) == [196, 197, 198, 199]
    assert len(read_records("tofu:retain90", "tofu", tofu_subset="full")) == 180 * 20
    assert author(read_records("tofu:forget05[:2]", "tofu")) == [196, 197]
    assert author(read_records("tofu:forget05[-1:]", "tofu")) == [199]
    with pytest.raises(ValueError, match=r"tofu:forget10 has 200 of its 400 questions outside tofu_subset 'cpu40'"):
        read_records("tofu:forget10", "tofu", tofu_subset="cpu40")
    assert author(read_records("tofu:full", "tofu", tofu_subset="cpu20")) == [*range(10), *range(190, 200)]
    with pytest.raises(ValueError, match=r"tofu_subset='tiny': use one of full, cpu20, cpu40"):
        read_records("tofu:forget05", "tofu", tofu_subset="tiny")
    with pytest.raises(ValueError, match="name a TOFU split"):
        read_records("tofu:forget05[2]", "tofu")


# ---------------------------------------------------------------------------------------------- the callback


def _world_tofu(folder: Path) -> int:
    """A TOFU-shaped folder from lethe's world (questions the world decoder can read); returns forget size."""
    import json

    from lethe.world import load_world

    world = load_world()
    seen, unseen = world.to_tofu("train"), world.to_tofu("unseen")
    row = lambda r, para=True: {"question": r.question, "answer": r.answer,
                                **({"paraphrased_answer": r.paraphrased_answer} if para else {}),
                                "perturbed_answer": r.perturbed_answer}
    files = {"forget01": [{"question": r.question, "answer": r.answer} for r in seen[:10]],
             "forget01_perturbed": [row(r) for r in seen[:10]], "retain_perturbed": [row(r) for r in seen[10:18]],
             "real_authors_perturbed": [row(r, False) for r in unseen[:6]],
             "world_facts_perturbed": [row(r, False) for r in unseen[6:12]]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))
    return len(files["forget01_perturbed"])


@pytest.mark.slow
def test_unlearning_run_with_the_tofu_callback_killed_and_resumed_ends_like_an_uninterrupted_one(tmp_path):
    """World decoder, NPO, TofuEvaluation every 2 steps; kill -9 after step 3 (checkpoint of step 2), resume with
    --ckpt_path last: the same forget quality / model utility history (1e-6) and the same logged tofu rows."""
    import csv
    import json
    import os
    import subprocess
    import sys

    import yaml

    n = _world_tofu(tmp_path / "tofu")
    ratios = tmp_path / "reference.json"
    ratios.write_text(json.dumps([0.4 + 0.1 * i for i in range(n)]))

    def preset(name: str, kill_at: int | None) -> Path:
        callbacks = [{"class_path": "callbacks.tofu.TofuEvaluation",
                      "init_args": {"forget_split": "forget01", "reference_ratios": str(ratios), "every_n_steps": 2,
                                    "max_new_tokens": 4, "batch_size": 8}}]
        if kill_at is not None:
            callbacks.append({"class_path": "lethe.testing.SignalAtStep", "init_args": {"step": kill_at, "signum": 9}})
        cfg = {"seed_everything": 0,
               "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "log_every_n_steps": 1,
                           "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks},
               "model": {"class_path": "lightning_modules.unlearning.UnlearningModule",
                         "init_args": {"model": "lethe:world-decoder", "method": "npo", "retain_loss": "nll",
                                       "lr": 1e-3}},
               "data": {"class_path": "datamodules.forget_retain.ForgetRetainDataModule",
                        "init_args": {"builtin": "world", "n_forget": 8, "n_retain": 16, "n_unseen": 0,
                                      "batch_size": 16}},
               "run": {"root": str(tmp_path / "runs"), "name": name, "save_every_n_steps": 2}}
        path = tmp_path / f"{name}-{kill_at}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               LETHE_TOFU_DIR=str(tmp_path / "tofu"), PYTHONPATH=str(root))

    def run(path: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lethe.cli", "fit", "--config", str(path), *extra],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900, check=False)

    full = run(preset("full", None))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(preset("cut", 3))
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run(preset("cut", None), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def history(name):
        return json.loads((tmp_path / "runs" / name / "tofu.json").read_text())["history"]

    want, got = history("full"), history("cut")
    assert [r["step"] for r in want] == [r["step"] for r in got] == [0, 2, 4, 6]
    for a, b in zip(want, got):
        for key in ("forget_quality", "model_utility", "forget/rougeL_recall", "forget/prob", "retain/truth_ratio"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
    assert want[-1]["forget/prob"] < want[0]["forget/prob"]  # the run did unlearn something

    def tofu_rows(name):
        with open(tmp_path / "runs" / name / "metrics.csv") as fh:
            return [{k: v for k, v in r.items() if k.startswith("tofu/") and k != "tofu/seconds" and v}
                    for r in csv.DictReader(fh) if r.get("tofu/model_utility")]

    rows_want, rows_got = tofu_rows("full"), tofu_rows("cut")
    assert len(rows_want) == len(rows_got) == 4
    for a, b in zip(rows_want, rows_got):
        assert a.keys() == b.keys()
        for k in a:
            assert float(b[k]) == pytest.approx(float(a[k]), abs=1e-6), k
    assert (tmp_path / "runs" / "cut" / "tofu.png").stat().st_size > 1000


TOFU_BAD_INPUT = {  # case -> (change to the fake TOFU folder, preset data arguments, what the last line must say)
    "missing TOFU split": (None, {"forget": "tofu:forget07"},
                           "TOFU split 'forget07': not loaded from the hub"),
    "record without an answer": ("no-answer", {}, "forget01.json: record 3: field 'answer': missing field"),
    "perturbed questions not the forget set's": ("stray-perturbed", {},
                                                 ("tofu:forget01_perturbed does not match the forget set: record 5, "
                                                 "field 'question'")),
    "answers longer than max_length": (None, {"max_length": 6, "on_long": "error"},
                                       ("data.init_args.forget (tofu:forget01): 40 of 40 examples are longer than "
                                       "max_length=6 tokens (first: record 0, field 'answer'")),
}


@pytest.mark.parametrize("case", list(TOFU_BAD_INPUT))
def test_tofu_bad_input_ends_with_one_line_naming_file_record_field_and_changes_no_file(tmp_path, capsys,
                                                                                         monkeypatch, case):
    import json

    import yaml

    from lethe.cli import main

    change, data_args, want = TOFU_BAD_INPUT[case]
    _fake_tofu(tmp_path / "tofu")
    if change == "no-answer":
        rows = json.loads((tmp_path / "tofu" / "forget01.json").read_text())
        del rows[3]["answer"]
        (tmp_path / "tofu" / "forget01.json").write_text(json.dumps(rows))
    if change == "stray-perturbed":
        (tmp_path / "tofu" / "forget01_perturbed.json").write_text(json.dumps(
            [dict(r, paraphrased_answer=r["answer"], perturbed_answer=["x.", "y."]) for r in
             json.loads((tmp_path / "tofu" / "forget01.json").read_text())[:5]]
            + [{"question": "Who else?", "answer": "Nobody.", "perturbed_answer": ["x."]}]))
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        (tmp_path / "tofu" / f"{name}.json").write_text(json.dumps(
            [{"question": "Who wrote it?", "answer": "Someone.", "perturbed_answer": ["x.", "y."]}]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LETHE_TOFU_DIR", str(tmp_path / "tofu"))
    (tmp_path / "ratios.json").write_text(json.dumps([1.0] * 40))
    preset = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "callbacks.tofu.TofuEvaluation",
                                   "init_args": {"forget_split": "forget01",
                                                 "reference_ratios": str(tmp_path / "ratios.json")}}]},
        "model": {"class_path": "lightning_modules.unlearning.UnlearningModule",
                  "init_args": {"model": str(save_tiny("gpt2", tmp_path / "tiny-gpt2")), "method": "ga"}},
        "data": {"class_path": "datamodules.forget_retain.ForgetRetainDataModule",
                 "init_args": {"forget": "tofu:forget01", "kind": "tofu", "batch_size": 4, **data_args}},
        "run": {"root": str(tmp_path / "runs"), "name": "bad"},
    }
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    run = tmp_path / "runs" / "bad"  # an earlier run of the same name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("# the earlier run's config\n")
    (run / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(path)])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lethe: error: ") and want in last, last
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert after == before


def test_answers_longer_than_max_length_are_cut_with_a_count(tmp_path):
    from datamodules.forget_retain import ForgetRetainDataModule

    dm = ForgetRetainDataModule(forget_pairs=[["w1 w2", "w3 w4 w5 w6 w7 w8"], ["w1", "w2"]], max_length=5,
                                tokenizer=str(save_tiny("gpt2", tmp_path / "m")), family="decoder")
    with pytest.warns(UserWarning, match=r"1 of 2 examples are longer than max_length=5 tokens.*1 were cut"):
        dm.setup()
