"""The synthetic world: deterministic, the promised shape, and one token per object/word."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lethe.records import read_counterfact, read_text, read_tofu, read_zsre
from lethe.tokenizers import STYLES, build_world_tokenizer, world_words
from lethe.world import SPLITS, World, generate_world


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(seed=0)


@pytest.fixture(scope="module")
def tokenizers(world):
    return {style: build_world_tokenizer(world, style) for style in STYLES}


# --------------------------------------------------------------------------- generator


def test_deterministic_for_a_seed(world):
    again = generate_world(0)
    assert again.facts == world.facts
    assert again.subjects == world.subjects
    assert again.fingerprint() == world.fingerprint()
    other = World.generate(seed=1)
    assert other.facts != world.facts
    assert other.fingerprint() != world.fingerprint()


def test_sizes(world):
    assert 550 <= len(world.subjects) <= 650
    assert 1800 <= len(world.facts) <= 2200
    assert len(world.relations) >= 10
    unseen = len(world.unseen_facts) / len(world.facts)
    assert 0.08 <= unseen <= 0.12
    assert {f.split for f in world.facts} == set(SPLITS)
    assert {s.kind for s in world.subjects} == {"person", "city", "company"}
    for name, facts in world.facts_by_relation().items():
        assert len(facts) >= 50, name
        assert {f.split for f in facts} == set(SPLITS), name  # every relation has held-out facts
    assert sum(len(v) for v in world.facts_by_relation("unseen").values()) == len(world.unseen_facts)
    assert world.relation_facts("born_in", "train") == world.facts_by_relation("train")["born_in"]
    with pytest.raises(KeyError):
        world.relation_facts("nope")


def test_subject_names(world):
    names = [s.name for s in world.subjects]
    assert len(set(names)) == len(names)
    people = world.subjects_of("person")
    assert all(len(s.name.split()) == 2 for s in people)
    assert len({s.name.split()[1] for s in people}) == len(people)  # last names unique
    assert all(len(s.name.split()) == 1 for s in world.subjects if s.kind != "person")
    object_words = {o.lower() for r in world.relations.values() for o in r.objects}
    template_words = {
        w.lower() for r in world.relations.values() for t in (*r.templates, r.question) for w in t.split()
    }
    subject_words = {w.lower() for n in names for w in n.split()}
    assert not subject_words & object_words
    assert not subject_words & template_words
    # Objects of a relation are single words; every subject has one fact per relation at most.
    assert all(len(o.split()) == 1 and o.isalpha() for r in world.relations.values() for o in r.objects)
    assert max(Counter((f.subject, f.relation) for f in world.facts).values()) == 1
    assert all(world.relations[f.relation].subject_kind == kind_of(world, f.subject) for f in world.facts)


def kind_of(world: World, name: str) -> str:
    return next(s.kind for s in world.subjects if s.name == name)


def test_templates(world):
    for f in world.facts:
        train, held = world.train_templates(f), world.heldout_templates(f)
        assert train and held and not set(train) & set(held)
        assert set(train) | set(held) == set(world.relations[f.relation].templates)
    for r in world.relations.values():
        # every phrasing is trained for some subjects and held out for others
        facts = world.relation_facts(r.name, "train")
        for t in r.templates:
            assert any(t in world.train_templates(f) for f in facts)
            assert any(t in world.heldout_templates(f) for f in facts)
        for t in r.templates:
            assert t.count("{}") == 1 and not t.endswith("{}")  # the object comes last, after the subject
    f = world.train_facts[0]
    prompt = world.training_prompts(f)[0]
    assert world.training_corpus()[0] == f"{prompt} {f.object} ."


def test_unseen_facts_never_trained(world):
    train = world.training_corpus()
    unseen = world.unseen_corpus()
    assert len(train) == sum(len(world.training_prompts(f)) for f in world.train_facts)
    assert not set(train) & set(unseen)
    trained_prompts = {s.rsplit(" ", 2)[0] for s in train}
    for f in world.unseen_facts:
        assert not trained_prompts & set(world.training_prompts(f))
    # Held-out templates never reach training either.
    assert not set(world.paraphrase_corpus("train")) & set(train)


def test_counterfactual_and_neighbours(world):
    for f in world.facts:
        rel = world.relations[f.relation]
        assert f.counterfactual in rel.objects and f.counterfactual != f.object
        assert 1 <= len(f.neighbours) <= 5
        for subject, obj in f.neighbours:
            assert subject != f.subject
            assert obj not in (f.object, f.counterfactual)
            neighbour = world.fact(subject, f.relation)
            assert neighbour.object == obj and neighbour.split == "train"
        first = f.neighbours[0][0]
        assert world.neighbours_of(f)[0][0] == world.train_templates(world.fact(first, f.relation))[0].format(first)
        perturbed = world.perturbed_objects(f)
        assert len(set(perturbed)) == 3 and f.object not in perturbed
    assert sum(len(f.neighbours) == 5 for f in world.facts) == len(world.facts)


def test_record_sets(world):
    cf = world.to_counterfact("train")
    assert len(cf) == len(world.train_facts)
    r, f = cf[0], world.train_facts[0]
    assert (r.subject, r.target_true, r.target_new, r.relation) == (
        f.subject,
        f.object,
        f.counterfactual,
        f.relation,
    )
    assert r.rewrite_prompt == world.training_prompts(f)[0]
    assert r.paraphrase_prompts == world.paraphrase_prompts(f)
    assert list(zip(r.neighborhood_prompts, r.neighborhood_targets)) == world.neighbours_of(f)
    assert len({x.case_id for x in world.to_counterfact(None)}) == len(world.facts)
    z = world.to_zsre("unseen")[0]
    assert len(z.paraphrase_prompts) == len(z.loc_prompts) == len(z.loc_answers) == 1
    qa = world.to_tofu("train")[0]
    assert qa.question.endswith(" ?") and f.subject in qa.question
    assert qa.answer == f"{world.training_prompts(f)[0]} {f.object} ."
    assert f.object in qa.paraphrased_answer and len(qa.perturbed_answer) == 3
    assert all(f.object not in a.split() for a in qa.perturbed_answer)
    with pytest.raises(ValueError, match="unknown split"):
        world.to_tofu("validation")


def test_export_round_trips_through_readers(world, tmp_path):
    paths = world.export(tmp_path)
    assert {p.name for p in paths.values()} == {
        "counterfact.json", "zsre.json", "tofu.json", "train.txt", "unseen.txt", "world.json",
    }  # fmt: skip
    assert read_counterfact(paths["counterfact"]) == world.to_counterfact("train")
    z = read_zsre(paths["zsre"])
    assert [(r.rewrite_prompt, r.target_new, r.loc_answers) for r in z] == [
        (r.rewrite_prompt, r.target_new, r.loc_answers) for r in world.to_zsre("train")
    ]
    assert read_tofu(paths["tofu"]) == world.to_tofu("train")
    assert [r.text for r in read_text(paths["train"])] == world.training_corpus()
    assert [r.text for r in read_text(paths["unseen"])] == world.unseen_corpus()
    data = json.loads(paths["world"].read_text())
    assert data["fingerprint"] == world.fingerprint()
    assert World.from_dict(data).fingerprint() == world.fingerprint()


def test_generation_arguments():
    small = World.generate(seed=3, n_subjects=60, unseen_fraction=0.0)
    assert len(small.subjects) == 60 and not small.unseen_facts
    with pytest.raises(ValueError):
        World.generate(n_subjects=5)


# --------------------------------------------------------------------------- tokenizers


def all_world_texts(world: World) -> list[str]:
    texts = world.training_corpus() + world.unseen_corpus() + world.paraphrase_corpus(None)
    for qa in world.to_tofu(None):
        texts += [qa.question, qa.answer, qa.paraphrased_answer, *qa.perturbed_answer]
    return texts


@pytest.mark.parametrize("style", STYLES)
def test_every_object_and_word_is_one_known_token(world, tokenizers, style):
    tok = tokenizers[style]
    unk = tok.unk_token_id
    for r in world.relations.values():
        for o in r.objects:
            ids = tok(o, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != unk, (style, o)
            # The leading space callers add for BPE tokenizers changes nothing.
            assert tok(" " + o, add_special_tokens=False)["input_ids"] == ids
    texts = all_world_texts(world)
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    assert all(unk not in ids for ids in enc)
    assert all(len(ids) == len(t.split()) for ids, t in zip(enc, texts))
    # Words round-trip, separated by single spaces.
    for t, ids in zip(texts[::97], enc[::97]):
        assert tok.decode(ids) == t
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t


def test_special_tokens_per_style(tokenizers):
    gpt2, bert, t5 = (tokenizers[s] for s in STYLES)
    text = "The founder of"
    plain = gpt2(text)["input_ids"]
    assert len(plain) == 3 and gpt2.bos_token_id not in plain  # no BOS in target ids
    assert gpt2.bos_token == gpt2.eos_token == gpt2.pad_token == gpt2.unk_token == "<|endoftext|>"
    ids = bert(text + " [MASK] .")["input_ids"]
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id
    assert ids[-3] == bert.mask_token_id and len(ids) == 7
    assert (bert.pad_token_id, bert.pad_token) == (0, "[PAD]")
    ids = t5(text)["input_ids"]
    assert ids[-1] == t5.eos_token_id and len(ids) == 4
    assert (t5.pad_token_id, t5.pad_token) == (0, "<pad>")
    sentinel = t5("<extra_id_0> founder", add_special_tokens=False)["input_ids"]
    assert len(sentinel) == 2 and sentinel[0] == len(t5) - 1
    assert "token_type_ids" not in t5(text) and "token_type_ids" in bert(text)


def test_ids_deterministic_and_save_round_trip(world, tokenizers, tmp_path):
    from transformers import AutoTokenizer

    words = world_words(world)
    assert words == sorted(words) and "." in words and "?" in words
    for style, tok in tokenizers.items():
        again = build_world_tokenizer(generate_world(0), style)
        assert again.get_vocab() == tok.get_vocab()
        tok.save_pretrained(tmp_path / style)
        loaded = AutoTokenizer.from_pretrained(tmp_path / style)
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.special_tokens_map == tok.special_tokens_map
        sample = world.training_corpus()[:5]
        assert loaded(sample)["input_ids"] == tok(sample)["input_ids"]
    with pytest.raises(ValueError, match="style"):
        build_world_tokenizer(["a"], "llama")


def test_tokenizer_from_plain_words():
    tok = build_world_tokenizer(["alpha beta", "gamma ."], "gpt2")
    assert len(tok) == 1 + 4
    assert tok.decode(tok("beta gamma .")["input_ids"]) == "beta gamma ."


def test_fingerprint_stable_across_processes(world):
    """Cache keys must not depend on Python's per-process string hashing."""
    import os
    import subprocess
    import sys

    code = "from lethe.world import World; print(World.generate(0).fingerprint())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == world.fingerprint()
