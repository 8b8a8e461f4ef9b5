"""The editing infrastructure every editor reuses: both evaluation protocols, edit artifacts, and the
``lethe edit`` job (datamodule → editor → evaluation callback → artifact + edited model, resumable)."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch

from lethe import evaluation as ev
from lethe.edits import EditArtifact, EditArtifactError
from lethe.lm import target_probability
from lethe.records import EditRequest, write_counterfact, write_text
from lethe.testing import save_tiny, tiny_model, tiny_tokenizer


def req(i: int = 0, **kw) -> EditRequest:
    base = {"prompt": "w1 {} w3", "subject": f"w{5 + i} w6", "target_new": "w10", "target_true": "w11",
            "paraphrase_prompts": [f"w7 w{5 + i} w6 w3", f"w2 w{5 + i} w6 w3"],
            "neighborhood_prompts": ["w8 w9 w3", "w4 w9 w3"], "case_id": i}
    base.update(kw)
    return EditRequest(**base)


def test_counterfact_scores_follow_the_definitions():
    m, tok = tiny_model("gpt2"), tiny_tokenizer("gpt2")
    r = req(neighborhood_targets=["w12", "w13"])
    s = ev.counterfact_scores(m, tok, "decoder", [r])
    assert s["protocol"] == "counterfact"

    def p(prompt, target):
        return float(target_probability(m, tok, "decoder", [prompt], [target])[0])

    assert s["efficacy"] == float(p(r.rewrite_prompt, "w10") > p(r.rewrite_prompt, "w11"))
    para = [float(p(q, "w10") > p(q, "w11")) for q in r.paraphrase_prompts]
    assert s["paraphrase"] == pytest.approx(sum(para) / 2)
    nb = [float(p(q, t) > p(q, "w10")) for q, t in zip(r.neighborhood_prompts, ["w12", "w13"])]
    assert s["neighborhood"] == pytest.approx(sum(nb) / 2)
    # without neighborhood_targets the neighbours' true object is target_true (CounterFact)
    plain = ev.counterfact_scores(m, tok, "decoder", [req()])
    nb_true = [float(p(q, "w11") > p(q, "w10")) for q in r.neighborhood_prompts]
    assert plain["neighborhood"] == pytest.approx(sum(nb_true) / 2)


def test_two_hop_probes_follow_the_edited_country_and_score_as_counterfact_does():
    def fact(subject, relation, prompt, true, new="x"):
        return EditRequest(prompt=prompt, subject=subject, target_new=new, target_true=true, relation=relation)

    bank = [fact("France", "capital", "The capital of {} is", "Paris"),
            fact("Germany", "capital", "The capital of {} is", "Berlin"),
            fact("France", "official_language", "The official language of {} is", "French"),
            fact("Germany", "official_language", "The official language of {} is", "German"),
            fact("Austria", "official_language", "The official language of {} is", "German"),
            fact("France", "currency", "{}'s currency is the", "euro"),
            fact("Germany", "currency", "{}'s currency is the", "euro")]
    edits = [fact("Lyon", "city_country", "{} is a city in", "France", "Germany"),
             fact("Siemens", "headquarters_country", "{} is based in", "Germany", "Austria"),
             fact("Lyon", "continent", "{} is in", "Europe", "Asia")]  # not a country: no probe
    probes = ev.portability_probes(edits, bank)
    got = {(p.case, p.hop): (p.prompt, p.old, p.new) for p in probes}
    assert got == {
        (0, "capital"): ("The capital of the country where Lyon is located is", "Paris", "Berlin"),
        (0, "official_language"): ("The official language of the country where Lyon is located is", "French",
                                   "German"),
        # the currency is the same in both countries (nothing to move), Austria's capital is unknown, and German
        # is Austria's language as well as Germany's
    }
    assert ev.portability_probes(edits[1:], bank) == []
    m, tok = tiny_model("gpt2"), tiny_tokenizer("gpt2")
    word_probes = [ev.PortabilityProbe(0, "capital", "w1 w2 w3", "w10", "w11"),
                   ev.PortabilityProbe(0, "currency", "w4 w5", "w12", "w13")]
    scores = ev.portability_scores(m, tok, "decoder", word_probes)
    for p, s in zip(word_probes, scores):
        new, old = (float(target_probability(m, tok, "decoder", [p.prompt], [t])[0]) for t in (p.new, p.old))
        assert s == float(new > old)


def test_neighbour_filters_keep_only_prompts_that_can_measure_bleed():
    m, tok = tiny_model("gpt2"), tiny_tokenizer("gpt2")
    r = req(neighborhood_prompts=["w8 w9 w3", "w4 w9 w3", "w2 w3", "w7 w3"],
            neighborhood_targets=["w12", "w13", "w14", "w15"])

    def p(prompt, target):
        return float(target_probability(m, tok, "decoder", [prompt], [target])[0])

    (kept,), dropped = ev.known_neighbours_only(m, tok, "decoder", [r])
    want = [i for i, (q, t) in enumerate(zip(r.neighborhood_prompts, r.neighborhood_targets)) if p(q, t) > p(q, "w10")]
    assert kept.neighborhood_prompts == [r.neighborhood_prompts[i] for i in want]
    assert kept.neighborhood_targets == [r.neighborhood_targets[i] for i in want]
    assert dropped == 4 - len(want) and r.neighborhood_prompts[0] == "w8 w9 w3"  # the input is not modified
    # on the kept prompts the unedited model scores a full neighbourhood
    if want:
        assert ev.counterfact_scores(m, tok, "decoder", [kept])["neighborhood"] == 1.0

    # a neighbour prompt about another subject edited for the same relation is meant to change: left out
    a = req(0, relation="r", neighborhood_prompts=["w1 w6 w6 w3", "w6 w7 w3"])
    b = req(1, relation="r")
    c = req(2, relation="other", neighborhood_prompts=["w1 w6 w6 w3"])
    (a2, b2, c2), dropped = ev.without_edited_neighbours([a, b, c])
    assert a2.neighborhood_prompts == ["w6 w7 w3"] and dropped == 1
    assert b2.neighborhood_prompts == b.neighborhood_prompts and c2.neighborhood_prompts == c.neighborhood_prompts


def test_token_accuracy_and_locality():
    m, tok = tiny_model("gpt2"), tiny_tokenizer("gpt2")
    r = req(loc_prompts=["w30 w31"], loc_answers=["w32 w33"])
    ref = ev.locality_reference(m, tok, "decoder", [r])
    s = ev.token_accuracy_scores(m, tok, "decoder", [r], ref)
    assert s["protocol"] == "token_accuracy" and s["locality"] == 1.0
    (pred, gold), = ev.teacher_forced_predictions(m, tok, "decoder", [(r.rewrite_prompt, "w10")])
    assert s["efficacy_acc"] == float(pred == gold)
    with torch.no_grad():  # scramble the output layer: predictions on the loc prompt change
        m.transformer.ln_f.weight.mul_(-3.0)
        m.transformer.ln_f.bias.add_(torch.randn_like(m.transformer.ln_f.bias))
    assert ev.token_accuracy_scores(m, tok, "decoder", [r], ref)["locality"] < 1.0
    assert ev.token_accuracy_scores(m, tok, "decoder", [r])["locality"] is None


def test_artifact_checks_and_combine(tmp_path):
    m = tiny_model("gpt2")
    name = "transformer.h.0.mlp.c_proj.weight"
    w = dict(m.named_parameters())[name]
    a = EditArtifact("test", "tiny", {name: torch.ones_like(w)}, [req()])
    b = EditArtifact("test", "tiny", {name: 2 * torch.ones_like(w)}, [req(1)])
    both = EditArtifact.combine([a, b])
    assert torch.equal(both.deltas[name], 3 * torch.ones_like(w)) and len(both.requests) == 2
    with pytest.raises(EditArtifactError, match="not applied"):
        a.revert(m)
    a.apply(m)
    with pytest.raises(EditArtifactError, match="already applied"):
        a.apply(m)
    a.revert(m)
    with pytest.raises(EditArtifactError, match="does not have"):
        a.apply(tiny_model("llama"))
    wrong = EditArtifact("test", "tiny", {name: torch.ones(3, 3)})
    with pytest.raises(EditArtifactError, match="shape"):
        wrong.apply(m)
    with pytest.raises(EditArtifactError, match="missing"):
        EditArtifact.load(tmp_path)
    a.save(tmp_path / "a")
    (tmp_path / "a" / "artifact.json").write_text("{")
    with pytest.raises(EditArtifactError, match="not valid JSON"):
        EditArtifact.load(tmp_path / "a")


@pytest.fixture()
def tiny_job(tmp_path):
    save_tiny("gpt2", tmp_path / "model")
    rng = random.Random(0)
    write_text([" ".join(f"w{rng.randrange(80)}" for _ in range(16)) for _ in range(64)], tmp_path / "corpus.txt")
    write_counterfact([req(i) for i in range(3)], tmp_path / "reqs.json")
    return tmp_path


def _run_edit(tmp, limit: int, sequential: bool, monkeypatch, name: str = "job", precision: str = "32") -> None:
    from lethe.edit_cli import main

    cfg = {
        "model": {"class_path": "lightning_modules.editing.EditingModule", "init_args": {
            "model": str(tmp / "model"), "editor": "rome", "sequential": sequential,
            "editor_args": {"hparams": {"layer": 0, "mom2_corpus": str(tmp / "corpus.txt"), "mom2_n_samples": 64,
                                        "context_templates": [[2, 4]], "context_source": "corpus", "v_steps": 4},
                            "cache_dir": str(tmp / "cov"), "progress": False}}},
        "data": {"class_path": "datamodules.edits.EditDataModule",
                 "init_args": {"source": str(tmp / "reqs.json"), "limit": limit}},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "precision": precision},
        "run": {"root": str(tmp / "runs"), "name": name, "logger": "csv"},
    }
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(sys, "argv", ["lethe", "edit"])
    main(["--config", str(tmp / "cfg.json")])


def test_edit_job_sequential_resumes_and_saves(tiny_job, monkeypatch):
    from lethe.models import load_model

    tmp = tiny_job
    _run_edit(tmp, 2, True, monkeypatch)
    run = tmp / "runs" / "job"
    first = EditArtifact.load(run / "edit_artifact")
    assert first.meta["completed_batches"] == 2 and len(first.requests) == 2
    results = json.loads((run / "edit_results.json").read_text())
    assert len(results["cases"]) == 2 and "edit_mean/counterfact/efficacy" in results["summary"]
    assert (run / "metrics.csv").is_file() and (run / "edit_efficacy.png").is_file()
    # a second run with one more request resumes: only the third request is edited
    _run_edit(tmp, 3, True, monkeypatch)
    total = EditArtifact.load(run / "edit_artifact")
    assert total.meta["completed_batches"] == 3
    assert [r.case_id for r in total.requests] == [0, 1, 2]
    results = json.loads((run / "edit_results.json").read_text())
    assert [c["case_id"] for c in results["cases"]] == [0, 1, 2]  # earlier cases kept
    assert json.loads((run / "edit_job.json").read_text())["batches"] == 1  # and not edited again
    # the saved edited model equals the artifact applied to a fresh copy of the original
    edited = load_model(run / "edited_model").model
    fresh = load_model(tmp / "model").model
    total.apply(fresh)
    for (n, p), (_, q) in zip(edited.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_edit_job_independent_edits_revert(tiny_job, monkeypatch):
    tmp = tiny_job
    _run_edit(tmp, 2, False, monkeypatch, name="indep")
    run = tmp / "runs" / "indep"
    arts = sorted((run / "edit_artifacts").iterdir())
    assert len(arts) == 2 and not (run / "edited_model").exists()
    a0 = EditArtifact.load(arts[0])
    assert [r.case_id for r in a0.requests] == [0]
    # every edit met the original weights: the module reverted the previous one after its evaluation
    assert a0.base_fingerprints == EditArtifact.load(arts[1]).base_fingerprints


def test_edit_job_in_bf16_mixed_edits_float32_weights_and_refuses_bf16_true(tiny_job, monkeypatch):
    """--trainer.precision bf16-mixed: the edit's optimisation runs under bf16 autocast, the model stays float32 and
    the edit lands (efficacy scored); bf16-true is refused before any weight changes."""
    tmp = tiny_job
    _run_edit(tmp, 1, True, monkeypatch, name="bf16", precision="bf16-mixed")
    run = tmp / "runs" / "bf16"
    art = EditArtifact.load(run / "edit_artifact")
    assert all(d.dtype == torch.float32 and float(d.norm()) > 0 for d in art.deltas.values())
    results = json.loads((run / "edit_results.json").read_text())
    assert results["cases"][0]["counterfact/efficacy"] == 1.0
    with pytest.raises(ValueError, match="trainer.precision='bf16-true'"):
        _run_edit(tmp, 1, True, monkeypatch, name="bf16true", precision="bf16-true")
    assert not (tmp / "runs" / "bf16true" / "edit_artifact").exists()


@pytest.mark.slow
def test_edit_job_killed_after_its_10th_edit_resumes_to_the_uninterrupted_weights(tiny_job):
    """A 20-edit sequential ROME run killed (kill -9) after its 10th edit was scored: the artifact on disk
    holds the first 9 or 10 edits, the same command resumes after them, and the final edited model and the
    per-case scores equal an uninterrupted run's bit for bit. Output redirected to a file shows progress."""
    import os
    import subprocess
    from pathlib import Path

    from safetensors.torch import load_file

    tmp = tiny_job
    write_counterfact([req(i) for i in range(20)], tmp / "reqs20.json")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def config(name: str, kill_after: int | None = None) -> Path:
        callbacks = [] if kill_after is None else [{"class_path": "lethe.testing.SignalAtStep",
                                                     "init_args": {"step": kill_after, "signum": 9}}]
        cfg = {
            "model": {"class_path": "lightning_modules.editing.EditingModule", "init_args": {
                "model": str(tmp / "model"), "editor": "rome", "sequential": True,
                "editor_args": {"hparams": {"layer": 0, "mom2_corpus": str(tmp / "corpus.txt"), "mom2_n_samples": 64,
                                            "context_templates": [[2, 4]], "context_source": "corpus", "v_steps": 4},
                                "cache_dir": str(tmp / "cov"), "progress": False},
                "evaluate": {"final": False}}},
            "data": {"class_path": "datamodules.edits.EditDataModule", "init_args": {"source": str(tmp / "reqs20.json")}},
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_checkpointing": False,
                        "enable_model_summary": False, "callbacks": callbacks},
            "run": {"root": str(tmp / "runs"), "name": name, "logger": "csv"},
        }
        path = tmp / f"{name}-{kill_after}.json"
        path.write_text(json.dumps(cfg))
        return path

    def edit(path: Path) -> subprocess.CompletedProcess:
        with open(tmp / "stdout.txt", "w") as out:  # stdout is a file, not a terminal
            res = subprocess.run([sys.executable, "-m", "lethe.cli", "edit", "--config", str(path)], stdout=out,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=tmp, timeout=900, check=False)
        res.stdout = (tmp / "stdout.txt").read_text()
        return res

    full = edit(config("full"))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "test batches (edits): 20/20" in full.stdout, full.stdout[-2000:]  # progress lines in a file
    killed = edit(config("killed", kill_after=10))
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    run = tmp / "runs" / "killed"
    saved = EditArtifact.load(run / "edit_artifact")
    assert saved.meta["completed_batches"] >= 9 and len(saved.requests) == saved.meta["completed_batches"]
    assert not (run / "edited_model").exists()
    resumed = edit(config("killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{saved.meta['completed_batches']} batches already applied" in resumed.stdout
    want = load_file(str(tmp / "runs" / "full" / "edited_model" / "model.safetensors"))
    got = load_file(str(run / "edited_model" / "model.safetensors"))
    assert max(float((want[k] - got[k]).abs().max()) for k in want) == 0.0
    a, b = (json.loads((tmp / "runs" / n / "edit_results.json").read_text()) for n in ("full", "killed"))
    assert [c["case_id"] for c in b["cases"]] == list(range(20)) and "partial" not in b
    assert a["cases"] == b["cases"] and a["summary"] == b["summary"]
