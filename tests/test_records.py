"""Readers accept the real formats, reject every bad record precisely, writers are atomic."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from lethe import records as R
from lethe.io import tofu_dir
from lethe.records import (
    EditRequest,
    QARecord,
    RecordError,
    TextRecord,
    read_counterfact,
    read_records,
    read_text,
    read_tofu,
    read_zsre,
    write_counterfact,
    write_records,
    write_text,
    write_tofu,
    write_zsre,
)

TOFU = tofu_dir()


def cf_record(i: int = 0, **rewrite) -> dict:
    """One record in ROME's exact CounterFact layout."""
    rr = {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    }
    rr.update(rewrite)
    return {
        "case_id": i,
        "pararel_idx": 2796,
        "requested_rewrite": rr,
        "paraphrase_prompts": [
            "Shayna does this and Yossel goes still. Danielle Darrieux is a native speaker of"
        ],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Robert Schuman, a native"],
        "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


def zsre_record(**over) -> dict:
    rec = {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "pred": "Trinity College",
        "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
    }
    rec.update(over)
    return rec


def dump_list(path: Path, objs: list) -> Path:
    path.write_text(json.dumps(objs, indent=2))
    return path


def dump_lines(path: Path, objs: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(o) for o in objs]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- good files


def test_counterfact_real_layout(tmp_path):
    path = dump_list(tmp_path / "cf.json", [cf_record(0), cf_record(1, target_new={"str": " German"})])
    reqs = read_counterfact(path)
    assert len(reqs) == 2
    r = reqs[0]
    assert r.prompt == "The mother tongue of {} is"
    assert r.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert (r.subject, r.target_new, r.target_true, r.relation, r.case_id) == (
        "Danielle Darrieux",
        "English",
        "French",
        "P103",
        0,
    )
    assert r.neighborhood_prompts[0] == "Michel Rocard is a native speaker of"
    assert r.generation_prompts == ["Danielle Darrieux's mother tongue is"]
    assert reqs[1].target_new == "German"  # stored without the leading space


def test_counterfact_jsonl_and_optional_lists(tmp_path):
    rec = cf_record(7)
    del rec["generation_prompts"], rec["paraphrase_prompts"]
    reqs = read_counterfact(dump_lines(tmp_path / "cf.jsonl", [rec, cf_record(8)]))
    assert reqs[0].generation_prompts == [] and reqs[0].paraphrase_prompts == []
    assert reqs[1].case_id == 8


def test_zsre_with_and_without_subject(tmp_path):
    no_subject = zsre_record()
    del no_subject["subject"]
    reqs = read_zsre(dump_list(tmp_path / "z.json", [zsre_record(case_id="a1"), no_subject]))
    a, b = reqs
    assert a.prompt == "What university did {} attend?"
    assert a.rewrite_prompt == zsre_record()["src"]
    assert (a.target_new, a.target_true, a.case_id) == (
        "University of Michigan",
        "Illinois Institute of Technology",
        "a1",
    )
    assert a.paraphrase_prompts == [zsre_record()["rephrase"]]
    assert (a.loc_prompts, a.loc_answers) == ([zsre_record()["loc"]], ["Hugo Weaving"])
    # Without a subject, the whole question is the subject and the prompt is "{}".
    assert (b.prompt, b.subject) == ("{}", zsre_record()["src"])
    assert b.rewrite_prompt == zsre_record()["src"]


def test_text_formats(tmp_path):
    docs = ["first document", "second, with a comma", "12345"]
    (tmp_path / "t.txt").write_text("\n".join(docs) + "\n")
    dump_lines(tmp_path / "t.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    dump_list(tmp_path / "t.json", [{"body": d} for d in docs])
    with open(tmp_path / "t.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        w.writerows([i, d] for i, d in enumerate(docs))
    for name, kw in [("t.txt", {}), ("t.jsonl", {}), ("t.json", {"field": "body"}), ("t.csv", {})]:
        assert [r.text for r in read_text(tmp_path / name, **kw)] == docs, name


def test_real_tofu_files():
    forget = read_tofu(TOFU / "forget10.json")
    perturbed = read_tofu(TOFU / "forget10_perturbed.json")
    assert len(forget) == len(perturbed) == 400
    assert all(isinstance(r, QARecord) and r.question and r.answer for r in forget)
    assert forget[0].perturbed_answer is None
    assert [r.question for r in forget] == [r.question for r in perturbed]
    assert all(len(r.perturbed_answer) == 5 and r.paraphrased_answer for r in perturbed)
    assert perturbed[0].paraphrased_question


def test_read_records_dispatch(tmp_path):
    path = dump_list(tmp_path / "cf.json", [cf_record()])
    assert read_records(path, "counterfact") == read_counterfact(path)
    with pytest.raises(ValueError, match="unknown record kind"):
        read_records(path, "wikitext")


# --------------------------------------------------------------------------- bad records


def _expect(path: Path, reader, where: str, field: str | None, problem: str):
    with pytest.raises(RecordError) as info:
        reader(path)
    msg = str(info.value)
    assert msg.startswith(str(path) + ": "), msg
    assert f": {where}: " in msg, msg
    if field is not None:
        assert f"field {field!r}" in msg, msg
    assert problem in msg, msg
    return info.value


def _without(d: dict, dotted: str) -> dict:
    d = json.loads(json.dumps(d))
    *head, last = dotted.split(".")
    obj = d
    for part in head:
        obj = obj[part]
    del obj[last]
    return d


CF_BAD = [
    ("missing subject", _without(cf_record(), "requested_rewrite.subject"), "requested_rewrite.subject", "missing field"),
    ("missing target", _without(cf_record(), "requested_rewrite.target_true"), "requested_rewrite.target_true.str",
     "missing field"),
    ("missing rewrite", _without(cf_record(), "requested_rewrite"), "requested_rewrite", "missing field"),
    ("no placeholder", cf_record(prompt="The mother tongue of Danielle Darrieux is"), "requested_rewrite.prompt",
     "prompt has no '{}' placeholder for the subject"),
    ("empty subject", cf_record(subject=" "), "requested_rewrite.subject", "empty string"),
    ("empty target", cf_record(target_new={"str": ""}), "requested_rewrite.target_new.str", "empty string"),
    ("target type", cf_record(target_new={"str": 42}), "requested_rewrite.target_new.str", "expected a string, got int"),
    ("target not object", cf_record(target_new="English"), "requested_rewrite.target_new", "expected an object"),
    ("prompt type", cf_record(prompt=["{} is"]), "requested_rewrite.prompt", "expected a string, got list"),
    ("neighbour targets", {**cf_record(), "neighborhood_targets": ["French"]}, "neighborhood_targets",
     "1 targets for 2 neighborhood_prompts"),
]  # fmt: skip


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize(("case", "bad", "field", "problem"), CF_BAD, ids=[c[0] for c in CF_BAD])
def test_counterfact_bad_records(tmp_path, fmt, case, bad, field, problem):
    good = [cf_record(i) for i in range(4)]
    objs = [*good[:3], bad, good[3]]
    if fmt == "json":
        path, where = dump_list(tmp_path / "cf.json", objs), "record 3"
    else:  # a blank line before the bad record: numbering must still be the editor's line
        path, where = dump_lines(tmp_path / "cf.jsonl", objs, blank_after=1), "line 5"
    _expect(path, read_counterfact, where, field, problem)


def test_counterfact_wrong_list_type(tmp_path):
    bad = cf_record(1)
    bad["paraphrase_prompts"] = "not a list"
    path = dump_list(tmp_path / "cf.json", [cf_record(0), bad])
    _expect(path, read_counterfact, "record 1", "paraphrase_prompts", "expected a list of strings, got str")
    bad["paraphrase_prompts"] = ["ok", 3]
    path = dump_list(tmp_path / "cf2.json", [cf_record(0), bad])
    _expect(path, read_counterfact, "record 1", "paraphrase_prompts[1]", "expected a string, got int")


def test_counterfact_error_message_exact(tmp_path):
    objs = [cf_record(i) for i in range(3)] + [cf_record(3, prompt="no placeholder")]
    path = dump_list(tmp_path / "cf.json", objs)
    err = _expect(path, read_counterfact, "record 3", "requested_rewrite.prompt", "placeholder")
    assert str(err) == (
        f"{path}: record 3: field 'requested_rewrite.prompt': prompt has no '{{}}' placeholder for the subject"
    )
    assert (err.path, err.where, err.field) == (str(path), "record 3", "requested_rewrite.prompt")


ZSRE_BAD = [
    ("subject not in src", zsre_record(subject="Someone Else"), "subject", "does not occur in src"),
    ("missing loc", _without(zsre_record(), "loc"), "loc", "missing field"),
    ("missing alt", _without(zsre_record(), "alt"), "alt", "missing field"),
    ("empty alt", zsre_record(alt=""), "alt", "empty string"),
    ("answers not list", zsre_record(answers="Trinity"), "answers", "expected a list of strings"),
    ("answers empty", zsre_record(answers=[]), "answers", "empty list"),
    ("empty subject", zsre_record(subject=""), "subject", "empty string"),
]


@pytest.mark.parametrize(("case", "bad", "field", "problem"), ZSRE_BAD, ids=[c[0] for c in ZSRE_BAD])
def test_zsre_bad_records(tmp_path, case, bad, field, problem):
    path = dump_lines(tmp_path / "z.jsonl", [zsre_record(), zsre_record(), bad])
    _expect(path, read_zsre, "line 3", field, problem)


def test_text_bad_records(tmp_path):
    (tmp_path / "t.txt").write_text("one\ntwo\n\nfour\n")
    _expect(tmp_path / "t.txt", read_text, "line 3", "text", "empty text")
    dump_lines(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "  "}], blank_after=1)
    _expect(tmp_path / "t.jsonl", read_text, "line 4", "text", "empty text")
    dump_lines(tmp_path / "n.jsonl", [{"text": "a"}, {"content": "b"}])
    _expect(tmp_path / "n.jsonl", read_text, "line 2", "text", "missing field")
    dump_lines(tmp_path / "w.jsonl", [{"text": "a"}, {"text": 5}])
    _expect(tmp_path / "w.jsonl", read_text, "line 2", "text", "expected a string, got int")
    # CSV: a quoted line break inside row 2; row 3 (empty) starts on line 5.
    (tmp_path / "t.csv").write_text('text,n\nhello,1\n"two\nlines",2\n,3\n')
    _expect(tmp_path / "t.csv", read_text, "line 5", "text", "empty text")
    (tmp_path / "cols.csv").write_text("text,n\nhello,1\nbad,2,3\n")
    _expect(tmp_path / "cols.csv", read_text, "line 3", None, "expected 2 columns")


def test_invalid_json_and_non_objects(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q", \n')
    _expect(tmp_path / "bad.jsonl", read_tofu, "line 2", None, "invalid JSON")
    (tmp_path / "arr.jsonl").write_text('{"question": "q", "answer": "a"}\n[1, 2]\n')
    _expect(tmp_path / "arr.jsonl", read_tofu, "line 2", None, "expected a JSON object")
    with pytest.raises(RecordError, match="unsupported file type"):
        read_tofu(_touch(tmp_path / "x.yaml"))
    with pytest.raises(RecordError, match="no such file"):
        read_tofu(tmp_path / "missing.json")


def _touch(p: Path) -> Path:
    p.write_text("")
    return p


def test_tofu_bad_records(tmp_path):
    good = {"question": "Who?", "answer": "Someone.", "perturbed_answer": ["A.", "B."]}
    path = dump_lines(tmp_path / "t.json", [good, good, {**good, "perturbed_answer": "A."}])
    _expect(path, read_tofu, "line 3", "perturbed_answer", "expected a list of strings, got str")
    path = dump_lines(tmp_path / "u.json", [good, {"question": "Who?"}])
    _expect(path, read_tofu, "line 2", "answer", "missing field")


# --------------------------------------------------------------------------- writers


def _edit(i: int) -> EditRequest:
    return EditRequest(
        prompt="{} was born in",
        subject=f"Arlen Vosk{i}",
        target_new="Velmora",
        target_true="Ostrika",
        paraphrase_prompts=[f"Arlen Vosk{i} is a native of"],
        neighborhood_prompts=["Bera Lun was born in"],
        generation_prompts=["The birthplace of Arlen Vosk is"],
        case_id=i,
        relation="born_in",
        loc_prompts=["Bera Lun was born in"],
        loc_answers=["Pellin"],
        neighborhood_targets=["Pellin"],
    )


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_writers_round_trip(tmp_path, ext):
    edits = [_edit(i) for i in range(3)]
    assert read_counterfact(write_counterfact(edits, tmp_path / f"cf.{ext}")) == edits
    z = read_zsre(write_zsre(edits, tmp_path / f"z.{ext}"))
    assert [(r.prompt, r.subject, r.target_new, r.target_true, r.case_id) for r in z] == [
        (e.prompt, e.subject, e.target_new, e.target_true, e.case_id) for e in edits
    ]
    assert z[0].paraphrase_prompts == edits[0].paraphrase_prompts and z[0].loc_answers == ["Pellin"]
    qa = [QARecord("Who?", "A.", "B.", ["C.", "D."]), QARecord("Where?", "Here .")]
    assert read_tofu(write_tofu(qa, tmp_path / f"q.{ext}")) == qa
    docs = [TextRecord("alpha beta ."), TextRecord('quote " and, comma')]
    assert read_text(write_text(docs, tmp_path / f"t.{ext}")) == docs
    assert read_records(write_records(docs, tmp_path / f"r.{ext}", "text"), "text") == docs


def test_text_writer_txt_and_csv(tmp_path):
    docs = [TextRecord("one line"), TextRecord('with, comma and "quotes"')]
    assert read_text(write_text(docs, tmp_path / "t.txt")) == docs
    assert read_text(write_text(docs, tmp_path / "t.csv")) == docs
    with pytest.raises(RecordError, match="line break"):
        write_text([TextRecord("a\nb")], tmp_path / "x.txt")


def test_failed_write_leaves_file_untouched(tmp_path, monkeypatch):
    path = write_counterfact([_edit(0)], tmp_path / "cf.json")
    before = path.read_bytes()
    bad = _edit(1)
    bad.prompt = "no placeholder"
    with pytest.raises(RecordError, match="record 1: field 'prompt'"):
        write_counterfact([_edit(0), bad], path)
    assert path.read_bytes() == before

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(R.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_counterfact([_edit(0), _edit(1), _edit(2)], path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cf.json"]  # no temporary file left behind


def test_writer_rejects_unusable_records(tmp_path):
    e = _edit(0)
    e.paraphrase_prompts = []
    with pytest.raises(RecordError, match="paraphrase_prompts"):
        write_zsre([e], tmp_path / "z.json")
    with pytest.raises(ValueError, match="write .json"):
        write_tofu([QARecord("q", "a")], tmp_path / "q.yaml")
    assert not (tmp_path / "z.json").exists()
