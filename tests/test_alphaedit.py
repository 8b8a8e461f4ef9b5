"""AlphaEdit and lifelong editing: the null-space update, per-edit factors and rollback, stream checks, the
stream evaluation in ``lethe edit``, and a killed AlphaEdit stream that resumes to the uninterrupted weights."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lethe import evaluation as ev
from lethe.adapters import get_adapter
from lethe.alphaedit import AlphaEditEditor, alphaedit_directions, null_space_projector
from lethe.edits import EditArtifact, EditArtifactError
from lethe.memit import MEMITEditor, memit_directions
from lethe.models import LoadedModel
from lethe.records import EditRequest, write_counterfact
from lethe.streams import StreamError, check_stream, stream_row
from lethe.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RNG = random.Random(0)
TEXTS = [" ".join(f"w{RNG.randrange(80)}" for _ in range(16)) for _ in range(96)]


def tiny(model_type: str = "gpt2") -> LoadedModel:
    torch.manual_seed(0)
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    return LoadedModel(model, tiny_tokenizer(model_type), adapter, adapter.family, f"tiny-{model_type}")


def request(i: int, **kw) -> EditRequest:
    base = {"prompt": "w1 {} w3", "subject": f"w{5 + i} w{40 + i}", "target_new": f"w{10 + i}", "target_true": "w11",
            "paraphrase_prompts": [f"w7 w{5 + i} w{40 + i} w3"], "neighborhood_prompts": ["w8 w9 w3"],
            "case_id": i, "relation": "r"}
    base.update(kw)
    return EditRequest(**base)


TINY_HP = {"layers": [0, 1], "mom2_corpus": TEXTS, "mom2_n_samples": 96, "context_templates": [],
           "v_steps": 5, "mom2_update_weight": 3.0, "position": "prompt_last"}


def tiny_edit_job(tmp_path, name: str, batch_size: int = 1) -> subprocess.CompletedProcess:
    """`lethe edit` (MEMIT, sequential) on the tiny model saved in tmp_path/model, requests from tmp_path/reqs.json."""
    cfg = {"model": {"class_path": "lightning_modules.editing.EditingModule", "init_args": {
        "model": str(tmp_path / "model"), "editor": "memit", "evaluate": {"final": False},
        "editor_args": {"hparams": TINY_HP, "cache_dir": str(tmp_path / "cov"), "progress": False}}},
        "data": {"class_path": "datamodules.edits.EditDataModule",
                 "init_args": {"source": str(tmp_path / "reqs.json"), "batch_size": batch_size}},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_checkpointing": False},
        "run": {"root": str(tmp_path / "runs"), "name": name, "logger": "csv"}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lethe.cli", "edit", "--config", str(tmp_path / f"{name}.json")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)


# --------------------------------------------------------------------------- the update
def test_projector_spans_the_small_eigen_directions_and_kills_the_rest():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    evals = torch.tensor([5.0] * 10 + [1e-4] * 6, dtype=torch.float64)
    cov = q @ torch.diag(evals) @ q.T
    p = null_space_projector(cov, 2e-2)
    assert torch.allclose(p, p.T) and torch.allclose(p @ p, p, atol=1e-10)
    assert round(float(p.trace())) == 6
    assert float((p @ q[:, :10]).abs().max()) < 1e-10  # preserved directions untouched by ΔW P
    assert torch.allclose(p @ q[:, 10:], q[:, 10:], atol=1e-10)


def test_earlier_keys_are_protected_by_the_stream_term():
    """The same new batch written with and without the earlier edits' keys in G: with them, the update moves
    the earlier keys' outputs far less."""
    g = torch.Generator().manual_seed(1)
    width, out = 32, 8
    projector = torch.eye(width, dtype=torch.float64)  # an empty preserved set: only G protects
    prev = torch.randn(20, width, generator=g, dtype=torch.float64)
    keys = torch.randn(5, width, generator=g, dtype=torch.float64) + prev[:5]  # overlapping with earlier keys
    resid = torch.randn(5, out, generator=g, dtype=torch.float64)
    plain = resid.T @ alphaedit_directions(keys, projector, None, 0.1)
    guarded = resid.T @ alphaedit_directions(keys, projector, prev.T @ prev, 0.1)
    assert float((guarded @ prev.T).norm()) < 0.5 * float((plain @ prev.T).norm())
    # the new keys still get most of their values
    assert float((guarded @ keys.T - resid.T).norm()) < float(resid.norm())


# --------------------------------------------------------------------------- factors and rollback
def test_memit_artifact_factors_sum_to_its_deltas_and_roll_back_single_edits(tmp_path):
    lm_ = tiny()
    ed = MEMITEditor(TINY_HP, cache_dir=str(tmp_path / "cov"), progress=False)
    reqs = [request(i) for i in range(4)]
    base = {n: p.detach().clone() for n, p in lm_.model.named_parameters()}
    art = ed.edit(lm_, reqs)
    assert set(art.factors) == set(art.deltas)
    for name, delta in art.deltas.items():
        assert torch.allclose(art.part(name, range(4)), delta, atol=1e-5)
    art.save(tmp_path / "art")
    loaded_art = EditArtifact.load(tmp_path / "art")
    assert all(torch.equal(loaded_art.factors[n]["v"], art.factors[n]["v"]) for n in art.factors)
    left = loaded_art.rollback(lm_.model, loaded_art.find([1, 3]))
    assert [r.case_id for r in left.requests] == [0, 2] and len(left.meta["rolled_back"]) == 2
    params = dict(lm_.model.named_parameters())
    for name in art.deltas:  # the model now holds base + the parts of edits 0 and 2, nothing else
        want = base[name] + art.part(name, [0, 2])
        assert torch.allclose(params[name], want, atol=1e-5)
        assert torch.allclose(left.deltas[name], art.part(name, [0, 2]), atol=1e-5)
    with pytest.raises(EditArtifactError, match="case_id"):
        left.find([99])
    # combine keeps the rows in request order
    both = EditArtifact.combine([art, art])
    assert both.factors[next(iter(both.factors))]["u"].shape[0] == 8


def test_rollback_with_repair_puts_the_rolled_back_keys_outputs_back_and_holds_the_others(tmp_path):
    """A MEMIT stream of three sequential batches (keys not orthogonal): after a plain rollback of edit 1, the
    remaining edits still move edit 1's keys' outputs; repair=True puts them back to the unedited outputs
    (to the ridge) while the remaining edits' keys barely move, and the artifact says what was repaired.
    No per-edit keys or a negative ridge are refused."""
    lm_ = tiny()
    ed = MEMITEditor(TINY_HP, cache_dir=str(tmp_path / "cov"), progress=False)
    params = dict(lm_.model.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}
    arts = [ed.edit(lm_, [request(i, prompt=f"w{20 + i} {{}} w{60 + i}") for i in batch])
            for batch in ([0, 1], [2, 3], [4, 5])]
    total = EditArtifact.combine(arts)
    edited = {n: params[n].detach().clone() for n in total.deltas}
    rows, keep = total.find([1]), [i for i in range(6) if i != 1]
    gaps = {}
    for repair in (False, True):
        left = total.rollback(lm_.model, rows, repair=repair)
        gap, moved = 0.0, 0.0
        for name in total.deltas:
            plain = edited[name].double() - total.part(name, rows).double()  # the parameter's own layout
            w, w0, w1, fix = (t.T if total.meta["factor_transposed"][name] else t for t in (
                params[name].detach().double(), base[name].double(), edited[name].double(),
                params[name].detach().double() - plain))  # (out, in)
            k = total.factors[name]["k"].double()
            gap += float(((w - w0) @ k[rows].T).norm() / (w0 @ k[rows].T).norm())
            if repair:  # the correction itself barely touches the remaining edits' keys
                moved += float((fix @ k[keep].T).norm() / (w1 @ k[keep].T).norm())
        gaps[repair] = gap
        if repair:
            assert moved < 0.05, moved
            assert left.meta["repaired"] == ["1"] and [r.case_id for r in left.requests] == keep
        with torch.no_grad():
            for n, t in edited.items():
                params[n].copy_(t)
    assert gaps[False] > 0.1, gaps  # the other edits did move edit 1's keys
    assert gaps[True] < 0.1 * gaps[False], gaps
    with pytest.raises(EditArtifactError, match="ridge"):
        total.rollback(lm_.model, rows, repair=True, ridge=-1.0)
    keyless = EditArtifact.combine(arts)
    keyless.factors = {n: {k: t for k, t in f.items() if k != "k"} for n, f in keyless.factors.items()}
    with pytest.raises(EditArtifactError, match="no per-edit keys"):
        keyless.rollback(lm_.model, rows, repair=True)
    assert all(torch.equal(params[n], edited[n]) for n in edited)  # a refused rollback changes nothing


def test_rome_has_factors_and_ft_refuses_single_rollback(tmp_path):
    from lethe.ft import FTEditor
    from lethe.rome import ROMEEditor

    lm_ = tiny()
    rome = ROMEEditor({"layer": 0, "mom2_corpus": TEXTS, "mom2_n_samples": 96, "context_templates": [],
                       "v_steps": 5}, cache_dir=str(tmp_path / "cov"), progress=False)
    art = rome.edit(lm_, [request(0), request(1)])
    name = next(iter(art.deltas))
    assert torch.allclose(art.part(name, [0, 1]), art.deltas[name], atol=1e-5)
    art.revert(lm_.model)
    ft = FTEditor({"layers": [0], "epochs": 2}).edit(lm_, [request(0)])
    with pytest.raises(EditArtifactError, match="no per-edit factors"):
        ft.rollback(lm_.model, [0])


# --------------------------------------------------------------------------- stream checks
def test_stream_checks_name_the_records():
    reqs = [request(0), request(1), request(2)]
    assert check_stream(reqs, 2) == reqs
    with pytest.raises(StreamError, match="batch_size 4 is larger than the stream"):
        check_stream(reqs, 4)
    conflict = [*reqs, request(1, target_new="w30", case_id=7)]
    with pytest.raises(StreamError, match=r"record 1 \(case_id 1\) and record 3 \(case_id 7\) conflict"):
        check_stream(conflict, 1)
    with pytest.warns(UserWarning, match=r"record 3 is left out"):
        kept = check_stream([*reqs, request(2, case_id=9)], 1)
    assert [r.case_id for r in kept] == [0, 1, 2]


@pytest.mark.parametrize("bad", ["conflict", "subject"])
def test_edit_job_rejects_a_bad_stream_before_editing(tmp_path, bad):
    """A conflicting pair, or a subject missing from its prompt in the LAST record: the run stops before its first
    edit with one error naming the record(s), and writes no artifact."""
    from lethe.testing import save_tiny

    save_tiny("gpt2", tmp_path / "model")
    write_counterfact([request(0), request(1), request(0, target_new="w31", case_id=5)], tmp_path / "reqs.json")
    if bad == "subject":  # the last record's prompt has no place for its subject
        records = json.loads((tmp_path / "reqs.json").read_text())
        records[2]["requested_rewrite"].update(prompt="w1 w2 w3", subject="w70")
        (tmp_path / "reqs.json").write_text(json.dumps(records))
    res = tiny_edit_job(tmp_path, "c")
    assert res.returncode != 0
    if bad == "conflict":
        assert "record 0 (case_id 0) and record 2 (case_id 5) conflict" in res.stderr
    else:
        assert "reqs.json: record 2: field 'requested_rewrite.prompt'" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs" / "c" / "edit_artifact").exists()


# --------------------------------------------------------------------------- the world decoder
@pytest.fixture(scope="module")
def world():
    from lethe.models import load_model
    from lethe.sources import load_requests

    loaded = load_model("lethe:world-decoder")
    pool = load_requests("world:train", seed=3)[:200]
    known = ev.counterfact_scores(loaded.model, loaded.tokenizer, "decoder", pool)["efficacy_per_case"]
    reqs = [r for r, e in zip(pool, known) if e == 0.0][:48]
    reqs, _ = ev.known_neighbours_only(loaded.model, loaded.tokenizer, "decoder", reqs)
    return loaded, reqs


@pytest.mark.slow
def test_alphaedit_stream_writes_keeps_neighbours_and_rolls_back(world, tmp_path):
    """48 world facts in 3 sequential batches: every edit holds at the end, paraphrases moved, neighbours
    kept; then two edits rolled back return to their true objects while the others stay written."""
    loaded, reqs = world
    before = stream_row(loaded, reqs)
    ed = AlphaEditEditor("edit/alphaedit_decoder", cache_dir=str(tmp_path / "cov"), progress=False,
                         overrides={"mom2_n_samples": 1000})
    arts = [ed.edit(loaded, reqs[s:s + 16]) for s in (0, 16, 32)]
    assert ed.stream_edits == 48
    after = stream_row(loaded, reqs)
    total = EditArtifact.combine(arts)
    snapshot = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if n in total.deltas}
    try:
        assert after["efficacy"] >= 0.9, after
        assert after["paraphrase"] >= before["paraphrase"] + 0.3, (before, after)
        assert after["neighborhood"] >= 0.85, after
        picked = [reqs[3], reqs[20]]
        left = total.rollback(loaded.model, total.find([r.case_id for r in picked]))  # every phrasing of each
        back = ev.counterfact_scores(loaded.model, loaded.tokenizer, "decoder", picked)
        assert back["efficacy"] == 0.0, back  # both prefer their true object again
        rest = ev.counterfact_scores(loaded.model, loaded.tokenizer, "decoder",
                                     [r for r in reqs if r not in picked])
        assert rest["efficacy"] >= 0.9, rest
        ed.resume_stream(left)
        assert ed.stream_edits == 46
    finally:
        with torch.no_grad():
            params = dict(loaded.model.named_parameters())
            for n, t in snapshot.items():
                params[n].copy_(t)
        for a in reversed(arts):
            a.revert(loaded.model)


@pytest.mark.slow
def test_alphaedit_stream_killed_mid_way_resumes_to_the_same_weights(tmp_path):
    """``lethe edit`` with AlphaEdit on the world decoder, 12 edits in batches of 4 and a stream evaluation
    every 4: killed (kill -9) after its second batch, the same command resumes from the saved artifact
    (with the earlier edits' keys back in AlphaEdit's G) and ends on the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from lethe.world_models import ensure_world_model

    ensure_world_model("decoder", progress=False)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def config(name: str, kill_after: int | None = None) -> Path:
        callbacks = [] if kill_after is None else [{"class_path": "lethe.testing.SignalAtStep",
                                                     "init_args": {"step": kill_after, "signum": 9}}]
        cfg = {
            "model": {"class_path": "lightning_modules.editing.EditingModule", "init_args": {
                "model": "lethe:world-decoder", "editor": "alphaedit", "sequential": True,
                "editor_args": {"hparams": "edit/alphaedit_decoder", "cache_dir": str(tmp_path / "cov"),
                                "progress": False, "overrides": {"mom2_n_samples": 500}},
                "evaluate": {"final": False, "protocols": ["counterfact"], "stream_every": 4, "general": "world"}}},
            "data": {"class_path": "datamodules.edits.EditDataModule",
                     "init_args": {"source": "world:train", "limit": 12, "batch_size": 4, "seed": 5}},
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_checkpointing": False,
                        "enable_model_summary": False, "callbacks": callbacks},
            "run": {"root": str(tmp_path / "runs"), "name": name, "logger": "csv"},
        }
        path = tmp_path / f"{name}-{kill_after}.json"
        path.write_text(json.dumps(cfg))
        return path

    def edit(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lethe.cli", "edit", "--config", str(path)], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=900, check=False)

    full = edit(config("full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = edit(config("killed", kill_after=2))
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    saved = EditArtifact.load(tmp_path / "runs" / "killed" / "edit_artifact")
    assert 1 <= saved.meta["completed_batches"] <= 2 and saved.factors
    resumed = edit(config("killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{saved.meta['completed_batches']} batches already applied" in resumed.stdout
    want = load_file(str(tmp_path / "runs" / "full" / "edited_model" / "model.safetensors"))
    got = load_file(str(tmp_path / "runs" / "killed" / "edited_model" / "model.safetensors"))
    assert max(float((want[k] - got[k]).abs().max()) for k in want) == 0.0
    a, b = (json.loads((tmp_path / "runs" / n / "edit_results.json").read_text()) for n in ("full", "killed"))
    def scores(rows):  # the evaluations' own timings differ between runs
        return [{k: v for k, v in r.items() if k != "eval_seconds"} for r in rows]

    assert [r["n_edits"] for r in a["stream"]] == [4, 8, 12] and scores(a["stream"]) == scores(b["stream"])
    assert all(r["general"] >= 0.8 for r in a["stream"])  # untouched world facts are still recalled
    assert (tmp_path / "runs" / "full" / "stream_curves.png").stat().st_size > 1000


def test_rollback_command_takes_single_edits_out_of_a_run(tmp_path):
    """`lethe edit` (MEMIT, 6 edits in 3 sequential batches), then `lethe rollback RUN --case-ids 1,4`: the
    run's artifact and edited model now hold base + the other four edits' parts; an unknown id is refused."""
    from safetensors.torch import load_file

    from lethe.rollback_cli import main as rollback
    from lethe.testing import save_tiny

    save_tiny("gpt2", tmp_path / "model")
    write_counterfact([request(i) for i in range(6)], tmp_path / "reqs.json")
    res = tiny_edit_job(tmp_path, "r", batch_size=2)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    total = EditArtifact.load(run / "edit_artifact")
    assert len(total.requests) == 6 and total.factors
    with pytest.raises(SystemExit, match="case_id"):
        rollback([str(run), "--case-ids", "99"])
    out = rollback([str(run), "--case-ids", "1,4"])
    assert out["rolled_back"] == [1, 4] and out["remaining_edits"] == 4
    left = EditArtifact.load(run / "edit_artifact")
    assert [r.case_id for r in left.requests] == [0, 2, 3, 5]
    assert [r["case_id"] for r in left.meta["rolled_back"]] == [1, 4]
    base = load_file(str(tmp_path / "model" / "model.safetensors"))
    edited = load_file(str(run / "edited_model" / "model.safetensors"))
    for name in total.deltas:
        want = base[name] + total.part(name, [0, 2, 3, 5])
        assert torch.allclose(edited[name], want, atol=1e-5), name
    # the stream goes on: two more requests resume after the rollback, and the scores no longer list 1 and 4
    write_counterfact([request(i) for i in range(8)], tmp_path / "reqs.json")
    res = tiny_edit_job(tmp_path, "r", batch_size=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r.case_id for r in EditArtifact.load(run / "edit_artifact").requests] == [0, 2, 3, 5, 6, 7]
    cases = json.loads((run / "edit_results.json").read_text())["cases"]
    assert [c["case_id"] for c in cases] == [0, 2, 3, 5, 6, 7]
    # --repair: the artifact and the saved model both hold the correction, and the artifact says so
    before = EditArtifact.load(run / "edit_artifact")
    out = rollback([str(run), "--case-ids", "3", "--repair"])
    assert out["repaired"] is True and out["rolled_back"] == [3]
    left = EditArtifact.load(run / "edit_artifact")
    assert left.meta["repaired"] == ["3"] and [r.case_id for r in left.requests] == [0, 2, 5, 6, 7]
    edited = load_file(str(run / "edited_model" / "model.safetensors"))
    for name in before.deltas:
        assert torch.allclose(edited[name], base[name] + left.deltas[name], atol=1e-5), name
        # not a plain rollback: the correction is in the deltas
        assert not torch.allclose(left.deltas[name], before.deltas[name] - before.part(name, before.find([3])),
                                  atol=1e-7), name


def test_locality_leaves_out_neighbours_edited_earlier_in_the_stream():
    """A neighbour prompt about a subject the stream edited in an EARLIER batch (same relation) is not an
    unedited neighbour: it is left out once the stream so far is given, and counted."""
    from callbacks.edit_eval import EditEvaluation

    a = request(0, neighborhood_prompts=["w1 w6 w41 w3", "w8 w9 w3"])  # mentions request 1's subject
    b = request(1)
    (kept,), n = ev.without_edited_neighbours([a])
    assert n == 0 and kept.neighborhood_prompts == a.neighborhood_prompts
    (kept,), n = ev.without_edited_neighbours([a], edited_with=[b, a])
    assert n == 1 and kept.neighborhood_prompts == ["w8 w9 w3"]

    class Module:
        sequential = True

    cb = EditEvaluation(protocols=["counterfact"])
    cb.requests = [b]
    assert cb._edited_with(Module(), [a]) == [b, a]
    Module.sequential = False
    assert cb._edited_with(Module(), [a]) == [a]


def test_preserved_facts_leave_the_preserved_set_once_edited(tmp_path):
    """With preserve_source, P also keeps the preserved facts' keys; a fact whose subject is edited (in this call
    or earlier in the stream) is no longer preserved, and a rollback gives it back to the preserved set."""
    lm_ = tiny()
    write_counterfact([request(i) for i in range(6)], tmp_path / "keep.json")
    hp = {**TINY_HP, "preserve_source": str(tmp_path / "keep.json"), "preserve_weight": 1e4,
          "nullspace_threshold": 1e-3}
    ed = AlphaEditEditor(hp, cache_dir=str(tmp_path / "cov"), progress=False)
    ed.prepare(lm_)
    subjects, keys = ed.preserved_keys(lm_, 0)
    assert subjects == [request(i).subject for i in range(6)] and keys.shape[0] == 6
    p_all = ed.projector(lm_, 0)
    assert float((p_all @ keys.T).norm()) < 1e-3 * float(keys.norm())  # preserved keys are outside P's range
    art = ed.edit(lm_, [request(1)])
    assert ed.stream_subjects == {request(1).subject}
    p_after = ed.projector(lm_, 0)
    assert float((p_after @ keys[1]).norm()) > 10 * float((p_all @ keys[1]).norm())  # request 1 no longer kept
    ed.resume_stream(None)
    assert ed.stream_subjects == set()
    art.revert(lm_.model)


def test_edit_prompts_write_the_edit_at_further_phrasings(tmp_path):
    """edit_prompts: n expands each request into its phrasings (same case id, so a rollback takes them all);
    a record's edit prompt without exactly one '{}' is refused naming the record and field."""
    from lethe.memit import with_phrasings
    from lethe.records import RecordError, read_counterfact

    r = request(0, edit_prompts=["w2 {} w3", "w4 {} w3", "w5 {} w3"])
    rows = with_phrasings([r, request(1)], 2)
    assert [x.prompt for x in rows] == ["w1 {} w3", "w2 {} w3", "w4 {} w3", "w1 {} w3"]
    assert [x.case_id for x in rows] == [0, 0, 0, 1]
    lm_ = tiny()
    art = MEMITEditor({**TINY_HP, "edit_prompts": 2}, cache_dir=str(tmp_path / "cov"), progress=False).edit(lm_, [r])
    assert len(art.requests) == 3 and art.find([0]) == [0, 1, 2]
    left = art.rollback(lm_.model, art.find([0]))
    assert not left.requests and all(float(d.abs().max()) < 1e-5 for d in left.deltas.values())
    write_counterfact([r], tmp_path / "ok.json")
    assert read_counterfact(tmp_path / "ok.json")[0].edit_prompts == r.edit_prompts
    records = json.loads((tmp_path / "ok.json").read_text())
    records[0]["edit_prompts"] = ["w2 w3"]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(RecordError, match=r"record 0: field 'edit_prompts\[0\]'"):
        read_counterfact(tmp_path / "bad.json")


def test_stream_general_ability_perplexity_and_untouched_fact_recall():
    """The SmolLM2 stream's general ability: perplexity is exp of the mean token NLL over all texts (tokens, not
    sequences), it rises when the model's weights are damaged, and a dict of entries lands in the stream row; the
    untouched facts are those of the pool whose subjects no edit touches."""
    from lethe import lm
    from lethe.streams import perplexity, untouched_facts

    loaded = tiny()
    texts = TEXTS[:10]
    batch = lm.encode_texts(loaded.tokenizer, loaded.family, texts, 128)
    with torch.no_grad():
        logp, mask = lm.token_logprobs(lm.forward_logits(loaded.model, batch, loaded.family), batch["labels"],
                                       loaded.family)
    expect = float(torch.exp(-logp.sum() / mask.sum()))
    assert perplexity(loaded, texts, batch_size=3) == pytest.approx(expect, rel=1e-5)
    before = perplexity(loaded, texts)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert perplexity(loaded, texts) > before

    pool = [request(0), request(1), request(2, subject="w9 w44")]
    assert untouched_facts(pool, [request(0)]) == [(r.rewrite_prompt, "w11") for r in pool[1:]]
    row = stream_row(loaded, [request(0)], lambda m: {"general": 1.5, "fact_recall": 0.25})
    assert row["general"] == 1.5 and row["fact_recall"] == 0.25 and row["n_edits"] == 1


def test_a_threshold_above_every_eigenvalue_warns_and_the_artifact_records_the_null_space(tmp_path):
    """An absolute nullspace_threshold taken from another model can leave P = I (nothing preserved): that warns,
    naming the layer and the largest eigenvalue, and every artifact says how large the null space was."""
    lm_ = tiny()
    reqs = [request(0)]
    loose = AlphaEditEditor({**TINY_HP, "nullspace_threshold": 1e9}, cache_dir=str(tmp_path / "cov"),
                            progress=False)
    with pytest.warns(UserWarning, match=r"above every eigenvalue .* at layer 0 .*P is the identity"):
        art = loose.edit(lm_, reqs)
    art.revert(lm_.model)
    dims, width, largest = art.meta["null_space"]["0"]
    assert dims == width and 0 < largest < 1e9
    largest_1 = art.meta["null_space"]["1"][2]
    tight = AlphaEditEditor({**TINY_HP, "nullspace_threshold": 0.5 * min(largest, largest_1)},
                            cache_dir=str(tmp_path / "cov"), progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        art2 = tight.edit(lm_, reqs)
    art2.revert(lm_.model)
    assert all(0 < d < w for d, w, _ in art2.meta["null_space"].values())
    art2.save(tmp_path / "art")
    assert EditArtifact.load(tmp_path / "art").meta["null_space"] == art2.meta["null_space"]


@pytest.mark.filterwarnings("ignore:AlphaEdit. nullspace_threshold")
def test_preserve_gram_weight_keeps_preserved_keys_outputs_and_still_writes_the_edit(tmp_path):
    """preserve_gram_weight γ puts the preserved facts' keys in the update's soft term (γ‖ΔW P k‖² each): with
    P = I (a threshold above every eigenvalue), γ = 100 cuts what the update does to the preserved keys many
    times over, more than it cuts the write at the edit's own key."""
    write_counterfact([request(i) for i in range(2, 8)], tmp_path / "keep.json")

    def edit(gamma: float):
        lm_ = tiny("llama")
        hp = {**TINY_HP, "preserve_source": str(tmp_path / "keep.json"), "preserve_weight": 0.0,
              "preserve_gram_weight": gamma, "nullspace_threshold": 1e12, "l2_weight": 1e-2, "mom2_update_weight": 0.0}
        ed = AlphaEditEditor(hp, cache_dir=str(tmp_path / "cov"), progress=False)
        art = ed.edit(lm_, [request(0)])
        out = {}
        for layer, name in zip(hp["layers"], sorted(art.deltas)):
            d = art.deltas[name].to(torch.float64)  # (out, in)
            kept, own = ed.kept_preserved_keys(lm_, layer), art.factors[name]["k"].to(torch.float64)
            out[layer] = (float((kept @ d.T).norm()), float((own @ d.T).norm()))
        return out

    free, held = edit(0.0), edit(1e2)
    for layer in free:
        (kept_free, own_free), (kept_held, own_held) = free[layer], held[layer]
        assert kept_held < 0.1 * kept_free  # the preserved keys' outputs move far less (50-90x here)
        assert own_held / kept_held > 4 * own_free / kept_free  # the update is more selective (~8x here)
        assert own_held > 0.02 * own_free  # and the edit's key is still written


def test_corpus_term_is_memits_update_without_projection_and_spares_the_corpus_inside_the_null_space(tmp_path):
    """mom2_update_weight λ puts MEMIT's λ C in AlphaEdit's soft term: with P = I, no stream keys and l2 → 0 the
    update is MEMIT's; with a real null space, λ cuts what the update does to the corpus keys (tr ΔW C ΔWᵀ)
    and the batch's keys are still written."""
    lm_ = tiny("llama")
    g = torch.Generator().manual_seed(3)
    layer = TINY_HP["layers"][0]

    def editor(**kw):
        return AlphaEditEditor({**TINY_HP, "stream_keys": False, **kw}, cache_dir=str(tmp_path / "cov"),
                               progress=False)

    cov = editor().covariance(lm_, layer).to(torch.float64)
    keys = torch.randn(3, cov.shape[0], generator=g, dtype=torch.float64) * cov.diagonal().sqrt()
    resid = torch.randn(3, 8, generator=g, dtype=torch.float64)
    no_projection = editor(mom2_update_weight=3.0, nullspace_threshold=1e12, l2_weight=1e-12)
    with pytest.warns(UserWarning, match="above every eigenvalue"):  # P = I, as asked
        direct = no_projection.update_step(lm_, layer, keys, resid)
    memit = memit_directions(keys, cov, 3.0)
    assert float((direct - memit).abs().max()) < 1e-6 * float(memit.abs().max())

    evals = torch.linalg.eigvalsh(cov)
    threshold, c_bar = float(evals.quantile(0.75)), float(evals.mean())  # a null space of 3/4 of the directions

    def update(lam: float) -> torch.Tensor:
        ed = editor(mom2_update_weight=lam, nullspace_threshold=threshold, l2_weight=1e-3 * c_bar)
        return resid.T @ ed.update_step(lm_, layer, keys, resid)  # ΔW (out × in)

    free, held = update(0.0), update(30.0)
    corpus = [float((d @ cov @ d.T).trace()) for d in (free, held)]
    assert corpus[1] < 0.5 * corpus[0]  # 0.32 -> 0.11 here
    written = [float(torch.nn.functional.cosine_similarity((d @ keys.T).flatten(), resid.T.flatten(), dim=0))
               for d in (free, held)]
    assert min(written) > 0.99  # the batch's keys still get their values


def test_refresh_keys_reads_the_earlier_edits_and_preserved_keys_on_the_model_as_it_is_now(tmp_path):
    """refresh_keys: G and the preserved facts' keys are read on the model at each call and layer. An edit of
    layer 0 moves every later key at layer 1, so there the keys stored when edit 0 was written are stale and
    the fresh ones differ; layer 0's keys (nothing edited below) are the same either way."""
    write_counterfact([request(i) for i in range(2, 8)], tmp_path / "keep.json")
    lm_ = tiny("llama")
    hp = {**TINY_HP, "preserve_source": str(tmp_path / "keep.json"), "preserve_weight": 1.0,
          "preserve_gram_weight": 1.0, "nullspace_threshold": 1e12, "l2_weight": 1e-2, "mom2_update_weight": 0.0,
          "refresh_keys": True}
    ed = AlphaEditEditor(hp, cache_dir=str(tmp_path / "cov"), progress=False)
    with pytest.warns(UserWarning, match="above every eigenvalue"):
        first = ed.edit(lm_, [request(0)])
    stored = dict(ed.gram)  # Σ k kᵀ of edit 0's keys as it was written
    preserved_before = {layer: ed.kept_preserved_keys(lm_, layer).clone() for layer in (0, 1)}
    ed.edit(lm_, [request(1)])
    assert len(ed.stream_rows) == 2 and ed.stream_edits == 2
    names = sorted(first.deltas)  # layer 0, layer 1
    for layer, name in zip((0, 1), names):
        k0 = ed.keys_now(lm_, ed.stream_rows[:1], layer)
        fresh = ed.stream_gram(lm_, layer, name)
        assert torch.allclose(fresh, torch.cat([k0, ed.keys_now(lm_, ed.stream_rows[1:], layer)]).T
                              @ torch.cat([k0, ed.keys_now(lm_, ed.stream_rows[1:], layer)]))
        moved = float((k0.T @ k0 - stored[name]).norm()) / float(stored[name].norm())
        assert (moved < 1e-9) if layer == 0 else (moved > 1e-4), (layer, moved)
        now = ed.kept_preserved_keys(lm_, layer)  # request(1)'s subject is not among the preserved facts
        drift = float((now - preserved_before[layer]).norm()) / float(preserved_before[layer].norm())
        assert (drift < 1e-9) if layer == 0 else (drift > 1e-4), (layer, drift)
    ed.resume_stream(None)
    assert ed.stream_rows == []


@pytest.mark.slow
def test_reassert_edits_writes_a_lapsed_earlier_edit_again_and_rollback_takes_all_its_rows(world, tmp_path):
    """reassert_edits (world decoder preset): an earlier edit of the stream whose new object no longer wins its
    prompt is written again with the next call (its rows join that artifact under the same case id) and wins
    again; the edits that hold are not rewritten, and a rollback of the lapsed edit takes out all its rows."""
    loaded, reqs = world
    snapshot = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    ed = AlphaEditEditor("edit/alphaedit_decoder", cache_dir=str(tmp_path / "cov"), progress=False,
                         # anchor off: here its pull-back made the holding edits of this 8-edit stream lapse too
                         # (reassert rewrote them); this test is about one lapsed edit among holding ones
                         overrides={"mom2_n_samples": 1000, "reassert_edits": True, "refresh_keys": True,
                                    "anchor_preserved": 0.0})

    def wins(rs) -> list[float]:
        return ev.counterfact_scores(loaded.model, loaded.tokenizer, "decoder", rs)["efficacy_per_case"]

    try:
        first = ed.edit(loaded, reqs[:8])
        assert sum(wins(reqs[:8])) >= 7
        lapsed = reqs[2]
        left = first.rollback(loaded.model, first.find([lapsed.case_id]))  # edit 2 lapses, the others still hold
        assert wins([lapsed]) == [0.0]
        holding = [r.case_id for r, w in zip(reqs[:8], wins(reqs[:8])) if w == 1.0]
        second = ed.edit(loaded, reqs[8:16])
        assert lapsed.case_id in second.meta["reasserted"]
        assert not set(holding) & set(second.meta["reasserted"])
        assert wins([lapsed]) == [1.0] and sum(wins(reqs[8:16])) >= 6
        assert ed.stream_edits == 16
        assert second.meta["passes"] >= 1 and sum(r.case_id == lapsed.case_id for r in second.requests) >= 1
        total = EditArtifact.combine([left, second])
        total.rollback(loaded.model, total.find([lapsed.case_id]))  # every row the second call wrote for it
        assert wins([lapsed]) == [0.0]
    finally:
        with torch.no_grad():
            params = dict(loaded.model.named_parameters())
            for n, t in snapshot.items():
                params[n].copy_(t)


def test_reassert_edits_needs_refresh_keys():
    with pytest.raises(ValueError, match="reassert_edits needs refresh_keys"):
        AlphaEditEditor({**TINY_HP, "reassert_edits": True, "refresh_keys": False}, progress=False)


@pytest.mark.filterwarnings("ignore:AlphaEdit. nullspace_threshold")
def test_refresh_keys_with_every_preserved_fact_edited_keeps_nothing_and_still_edits(tmp_path):
    write_counterfact([request(0)], tmp_path / "keep.json")
    lm_ = tiny("llama")
    ed = AlphaEditEditor({**TINY_HP, "preserve_source": str(tmp_path / "keep.json"), "preserve_weight": 1.0,
                          "preserve_gram_weight": 1.0, "refresh_keys": True}, cache_dir=str(tmp_path / "cov"),
                         progress=False)
    art = ed.edit(lm_, [request(0)])  # the one preserved fact is the one edited
    assert ed.kept_preserved_keys(lm_, 0).shape[0] == 0 and float(art.deltas[min(art.deltas)].norm()) > 0


def anchored_editor(tmp_path, **kw) -> AlphaEditEditor:
    """An unprotected AlphaEdit (P = I, no soft terms) with anchor_preserved, preserving requests 2-7's facts."""
    write_counterfact([request(i) for i in range(2, 8)], tmp_path / "keep.json")
    hp = {**TINY_HP, "preserve_source": str(tmp_path / "keep.json"), "preserve_weight": 0.0,
          "preserve_gram_weight": 0.0, "nullspace_threshold": 1e12, "l2_weight": 1e-2, "mom2_update_weight": 0.0,
          "refresh_keys": True, "anchor_preserved": 100.0, **kw}
    return AlphaEditEditor(hp, cache_dir=str(tmp_path / "cov"), progress=False)


@pytest.mark.filterwarnings("ignore:AlphaEdit. nullspace_threshold")
def test_anchor_preserved_pulls_drifted_preserved_outputs_back_against_the_earlier_edits(tmp_path):
    """anchor_preserved α: an unprotected edit moves the preserved facts' MLP outputs; the anchor before the next
    call pulls them back to the unedited model's in least squares, weight α against the stream's edit keys
    (weight 1). Here every key shares the prompt's last token (cosine 0.91-0.97 to the edit's), so the two
    trade: α 1 leaves about half the drift and keeps about half of what the edit wrote at its key, α 100
    leaves ~1% of the drift and takes back more of the edit; neither takes it all."""

    def run(alpha: float, sub: str) -> dict:
        lm_ = tiny("llama")
        (tmp_path / sub).mkdir()
        ed = anchored_editor(tmp_path / sub, anchor_preserved=alpha)
        first = ed.edit(lm_, [request(0)])  # the first call has nothing to pull back
        assert "anchor" not in first.meta

        def state(layer: int) -> tuple[float, torch.Tensor]:
            w = ed._mlp_out(lm_, layer).detach().double()
            kp = ed.keys_now(lm_, ed.preserved_requests(), layer)
            return float((ed.anchor_targets(lm_, layer) - kp @ w.T).norm()), ed.keys_now(lm_, ed.stream_rows[:1],
                                                                                         layer) @ w.T

        before = {layer: state(layer) for layer in (0, 1)}
        with torch.no_grad():
            ed.anchor(lm_, [request(1)])
        out = {}
        for layer, name in zip((0, 1), sorted(first.deltas)):
            w = ed._mlp_out(lm_, layer)
            d = first.deltas[name].double()
            d = d.T if d.shape != w.shape else d  # the edit's share (out × in)
            k = ed.keys_now(lm_, ed.stream_rows[:1], layer)
            drift, written = state(layer)
            assert before[layer][0] > 0
            out[layer] = (drift / before[layer][0],
                          float((written - before[layer][1]).norm()) / float((k @ d.T).norm()))
        return out

    soft, hard = run(1.0, "soft"), run(100.0, "hard")
    for layer in (0, 1):
        (drift_soft, taken_soft), (drift_hard, taken_hard) = soft[layer], hard[layer]
        assert drift_soft < 0.6 and drift_hard < 0.05, (layer, soft, hard)  # 0.36-0.48 and 0.01-0.02 here
        assert taken_soft < taken_hard < 1.0, (layer, soft, hard)  # 0.40-0.56 and 0.84-0.92 here
        assert taken_soft < 0.75


@pytest.mark.filterwarnings("ignore:AlphaEdit. nullspace_threshold")
def test_anchor_joins_the_calls_deltas_outside_every_edits_factors(tmp_path):
    """The anchor is part of the call's artifact (its deltas are the weights after the call less those before
    it, the anchor included; revert restores the weights from before) but of no edit's factors, so rolling the
    call's edit back leaves the anchor. A bad request makes the call fail before the anchor changes anything."""
    lm_ = tiny("llama")
    ed = anchored_editor(tmp_path)
    ed.edit(lm_, [request(0)])
    params = dict(lm_.model.named_parameters())
    with pytest.raises(Exception, match="subject"):
        ed.edit(lm_, [request(1, prompt="w1 w2 w3")])  # the subject is not in its prompt
    snap = {n: params[n].detach().clone() for n in ed.gram}
    assert all(torch.equal(params[n], t) for n, t in snap.items())  # the failed call changed nothing
    second = ed.edit(lm_, [request(1)])
    assert set(second.meta["anchor"]) == {"0", "1"}
    anchor_share = {}
    for n, t in snap.items():
        assert torch.allclose(second.deltas[n], (params[n] - t).detach(), atol=1e-6)
        anchor_share[n] = second.deltas[n] - second.part(n, range(len(second.requests)))
        assert float(anchor_share[n].norm()) > 1e-3 * float(second.deltas[n].norm())
    second.rollback(lm_.model, second.find([1]))
    for n, t in snap.items():
        assert torch.allclose((params[n] - t).detach(), anchor_share[n], atol=1e-5)


def test_anchor_preserved_needs_a_preserved_set_and_refresh_keys():
    with pytest.raises(ValueError, match="anchor_preserved needs"):
        AlphaEditEditor({**TINY_HP, "anchor_preserved": 1.0, "refresh_keys": True}, progress=False)
    with pytest.raises(ValueError, match="anchor_preserved needs"):
        AlphaEditEditor({**TINY_HP, "anchor_preserved": 1.0, "preserve_source": "world:train"}, progress=False)


def test_preserve_prompts_reads_each_preserved_fact_at_its_further_phrasings(tmp_path):
    """preserve_prompts n: each preserved fact joins the preserved set at its rewrite prompt and at up to n of its
    edit_prompts phrasings (same subject, so an edit of the subject takes all of them out)."""
    keep = [request(i, edit_prompts=["w2 {} w4", "w6 {} w4", "w9 {} w4"]) for i in range(2, 5)]
    write_counterfact(keep, tmp_path / "keep.json")
    lm_ = tiny("llama")
    ed = AlphaEditEditor({**TINY_HP, "preserve_source": str(tmp_path / "keep.json"), "preserve_weight": 1.0,
                          "refresh_keys": True, "preserve_prompts": 2}, cache_dir=str(tmp_path / "cov"),
                         progress=False)
    reqs = ed.preserved_requests()
    assert [r.prompt for r in reqs[:3]] == ["w1 {} w3", "w2 {} w4", "w6 {} w4"] and len(reqs) == 9
    assert [r.subject for r in reqs] == [r.subject for r in keep for _ in range(3)]
    ed._batch_subjects = {keep[0].subject}
    assert ed.kept_preserved_keys(lm_, 0).shape[0] == 6  # the edited subject's three phrasings left out
