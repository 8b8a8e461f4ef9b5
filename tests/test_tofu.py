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
