"""Typed records for edit and forget sets, and the readers/writers that move them to and from disk.

Every reader goes through ``datasets`` (so large files stream into Arrow the same way a
user's own hub dataset would), then validates *every* row before returning anything: a
file either loads completely or raises the first :class:`RecordError`, which names the
file, the record and the field. Writers are atomic: they validate, write a temporary file
in the target directory and ``os.replace`` it, so a crash or a bad record never leaves a
half-written file behind.

Record numbering in errors:

* JSONL, CSV and ``.txt``: ``line N`` (1-based, as an editor shows it; for CSV the line a
  row starts on, the header being line 1);
* a JSON file holding one top-level list: ``record N`` (0-based index into the list).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "RECORD_KINDS",
    "EditRequest",
    "QARecord",
    "RecordError",
    "TextRecord",
    "atomic_write",
    "read_counterfact",
    "read_records",
    "read_text",
    "read_tofu",
    "read_zsre",
    "write_counterfact",
    "write_records",
    "write_text",
    "write_tofu",
    "write_zsre",
]


class RecordError(ValueError):
    """A record on disk is malformed. The message names the file, the record and the field."""

    def __init__(self, path: str | os.PathLike | None, where: str | None, field: str | None, problem: str):
        self.path = None if path is None else str(path)
        self.where = where
        self.field = field
        self.problem = problem
        parts = [p for p in (self.path, where, None if field is None else f"field {field!r}") if p]
        super().__init__(": ".join([*parts, problem]))


# --------------------------------------------------------------------------- records


@dataclass
class EditRequest:
    """One fact to rewrite. ``prompt`` holds exactly one ``{}`` where the subject goes.

    Targets are stored without a leading space; callers add it for BPE tokenizers.
    ``loc_prompts``/``loc_answers`` are unrelated prompts with the answers the edit must
    not change (zsRE's ``loc``/``loc_ans``). ``neighborhood_targets``, when not empty,
    gives each neighbourhood prompt its own true object; when empty, the neighbours share
    ``target_true`` as in CounterFact. The synthetic world's neighbours have objects that
    differ from both targets, so it always fills ``neighborhood_targets``.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    case_id: int | str | None = None
    relation: str | None = None
    loc_prompts: list[str] = field(default_factory=list)
    loc_answers: list[str] = field(default_factory=list)
    neighborhood_targets: list[str] = field(default_factory=list)
    # further phrasings (templates with "{}") the edit may ALSO be written at (MEMIT / AlphaEdit ``edit_prompts``);
    # never the paraphrases it is scored on
    edit_prompts: list[str] = field(default_factory=list)

    @property
    def rewrite_prompt(self) -> str:
        """The prompt with the subject filled in (``replace``, so other braces are safe)."""
        return self.prompt.replace("{}", self.subject, 1)

    def validate(self) -> None:
        """Raise :class:`RecordError` (without a location) when the request is unusable."""
        _check_edit(self, None, None)


@dataclass
class TextRecord:
    """One document of a forget/retain corpus."""

    text: str


@dataclass
class QARecord:
    """One TOFU-style question/answer pair (with TOFU's optional evaluation fields)."""

    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answer: list[str] | None = None
    paraphrased_question: str | None = None


RECORD_KINDS = ("counterfact", "zsre", "text", "tofu")


# --------------------------------------------------------------------------- raw rows


@dataclass
class _Row:
    where: str
    data: dict[str, Any]


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl", ".ndjson"):
        return "json"
    if suffix == ".csv":
        return "csv"
    if suffix == ".txt":
        return "txt"
    raise RecordError(path, None, None, f"unsupported file type {suffix!r} (use .json, .jsonl, .csv or .txt)")


def _is_json_list(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        while True:
            chunk = fh.read(4096)
            if not chunk:
                return False
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0] == "["


def _json_locations(path: Path, n: int, is_list: bool) -> list[str]:
    if is_list:
        return [f"record {i}" for i in range(n)]
    with open(path, encoding="utf-8") as fh:
        return [f"line {i}" for i, line in enumerate(fh, 1) if line.strip()]


def _csv_header_and_locations(path: Path) -> tuple[list[str], list[str]]:
    """Header and the line each data row starts on, skipping blank lines as pandas does."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        locations = []
        start = 1
        for row in reader:
            if row:
                if header is None:
                    header = row
                else:
                    locations.append(f"line {start}")
            start = reader.line_num + 1
    if header is None:
        raise RecordError(path, None, None, "empty CSV file (no header)")
    return header, locations


def _load_with_datasets(path: Path, fmt: str, is_list: bool) -> list[dict[str, Any]]:
    import datasets

    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        header, _ = _csv_header_and_locations(path)
        # Everything is a string in CSV; stop pandas turning "1" into 1 and "" into NaN.
        kwargs = {
            "features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False,
        }
    builder = {"json": "json", "csv": "csv", "txt": "text"}[fmt]
    if fmt == "txt":
        kwargs["keep_linebreaks"] = False
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        # A private, throw-away cache: reading a file must not leave Arrow copies in the
        # user's HF cache, nor ever serve a stale copy of a file rewritten in place.
        with tempfile.TemporaryDirectory(prefix="lethe-records-") as cache_dir:
            ds = datasets.load_dataset(
                builder,
                data_files=str(path),
                split="train",
                cache_dir=cache_dir,
                keep_in_memory=True,
                **kwargs,
            )
            return ds.to_list()
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _load_with_stdlib(path: Path, fmt: str, is_list: bool) -> list[_Row]:
    """Slow path after ``datasets`` refused the file: find exactly where the problem is."""
    rows: list[_Row] = []
    if fmt == "json" and is_list:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise RecordError(path, f"line {e.lineno}", None, f"invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise RecordError(path, None, None, "expected a JSON list of records")
        return [_Row(f"record {i}", obj) for i, obj in enumerate(data)]
    if fmt == "json":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(_Row(f"line {lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RecordError(path, f"line {lineno}", None, f"invalid JSON: {e.msg}") from None
        return rows
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            header = None
            start = 1
            for row in reader:
                if row:
                    if header is None:
                        header = row
                    elif len(row) != len(header):
                        raise RecordError(
                            path, f"line {start}", None, f"expected {len(header)} columns, found {len(row)}"
                        )
                    else:
                        rows.append(_Row(f"line {start}", dict(zip(header, row))))
                start = reader.line_num + 1
        return rows
    with open(path, encoding="utf-8") as fh:
        return [_Row(f"line {i}", {"text": line.rstrip("\r\n")}) for i, line in enumerate(fh, 1)]


def _load_rows(path: str | os.PathLike) -> tuple[Path, list[_Row]]:
    p = Path(path)
    if not p.is_file():
        raise RecordError(p, None, None, "no such file")
    fmt = _format_of(p)
    is_list = fmt == "json" and _is_json_list(p)
    try:
        data = _load_with_datasets(p, fmt, is_list)
    except RecordError:
        raise
    except Exception:  # noqa: BLE001 - datasets raises many types; find the real cause ourselves
        rows = _load_with_stdlib(p, fmt, is_list)
        for row in rows:
            if not isinstance(row.data, dict):
                raise RecordError(
                    p, row.where, None, f"expected a JSON object, got {_tname(row.data)}"
                ) from None
        # The stdlib pass either located the problem (raised) or parsed the file.
        return p, rows
    if fmt == "json":
        locations = _json_locations(p, len(data), is_list)
    elif fmt == "csv":
        locations = _csv_header_and_locations(p)[1]
    else:
        locations = [f"line {i}" for i in range(1, len(data) + 1)]
    if len(locations) != len(data):  # should not happen; never mislabel a record
        locations = [f"record {i}" for i in range(len(data))]
    return p, [_Row(where, obj) for where, obj in zip(locations, data)]


# --------------------------------------------------------------------------- validation helpers


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Checker:
    """Field accessors bound to one row, raising RecordError with the full location."""

    def __init__(self, path: Path | None, where: str | None, data: dict[str, Any]):
        self.path, self.where, self.data = path, where, data

    def fail(self, name: str | None, problem: str) -> RecordError:
        return RecordError(self.path, self.where, name, problem)

    def get(self, name: str, required: bool = True) -> Any:
        obj: Any = self.data
        parts = name.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(obj, dict):
                raise self.fail(".".join(parts[:depth]), f"expected an object, got {_tname(obj)}")
            obj = obj.get(part)
            if obj is None:
                if required:
                    raise self.fail(name, "missing field")
                return None
        return obj

    def string(self, name: str, required: bool = True, allow_empty: bool = False) -> str | None:
        value = self.get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(name, f"expected a string, got {_tname(value)}")
        if not allow_empty and not value.strip():
            raise self.fail(name, "empty string")
        return value

    def strings(self, name: str, required: bool = True) -> list[str] | None:
        value = self.get(name, required)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.fail(name, f"expected a list of strings, got {_tname(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{name}[{i}]", f"expected a string, got {_tname(item)}")
            if not item.strip():
                raise self.fail(f"{name}[{i}]", "empty string")
        return list(value)

    def case_id(self, name: str = "case_id") -> int | str | None:
        value = self.get(name, required=False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.fail(name, f"expected an integer or a string, got {_tname(value)}")
        return value


def _check_prompt(c: _Checker, name: str, prompt: str) -> None:
    count = prompt.count("{}")
    if count == 0:
        raise c.fail(name, "prompt has no '{}' placeholder for the subject")
    if count > 1:
        raise c.fail(name, f"prompt has {count} '{{}}' placeholders; expected exactly one")


def _check_edit(req: EditRequest, path: Path | None, where: str | None) -> None:
    c = _Checker(path, where, {})
    if not isinstance(req.prompt, str):
        raise c.fail("prompt", f"expected a string, got {_tname(req.prompt)}")
    _check_prompt(c, "prompt", req.prompt)
    for name in ("subject", "target_new"):
        value = getattr(req, name)
        if not isinstance(value, str):
            raise c.fail(name, f"expected a string, got {_tname(value)}")
        if not value.strip():
            raise c.fail(name, "empty string")
    if req.target_true is not None and (not isinstance(req.target_true, str) or not req.target_true.strip()):
        raise c.fail("target_true", "expected a non-empty string or None")
    for name in (
        "paraphrase_prompts",
        "neighborhood_prompts",
        "generation_prompts",
        "loc_prompts",
        "loc_answers",
        "edit_prompts",
    ):
        value = getattr(req, name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise c.fail(name, "expected a list of strings")
    for i, template in enumerate(req.edit_prompts):
        if template.count("{}") != 1:
            raise c.fail(f"edit_prompts[{i}]", "an edit prompt is a template with one '{}' for the subject")
    if len(req.loc_prompts) != len(req.loc_answers):
        raise c.fail("loc_answers", f"{len(req.loc_answers)} answers for {len(req.loc_prompts)} loc_prompts")
    if not isinstance(req.neighborhood_targets, list) or not all(
        isinstance(v, str) for v in req.neighborhood_targets
    ):
        raise c.fail("neighborhood_targets", "expected a list of strings")
    if req.neighborhood_targets and len(req.neighborhood_targets) != len(req.neighborhood_prompts):
        raise c.fail(
            "neighborhood_targets",
            f"{len(req.neighborhood_targets)} targets for {len(req.neighborhood_prompts)} neighborhood_prompts",
        )


def _target(value: str) -> str:
    return value.strip()


# --------------------------------------------------------------------------- readers


def _read(path: str | os.PathLike, convert: Callable[[_Checker], Any]) -> list:
    p, rows = _load_rows(path)
    out = []
    for row in rows:
        if not isinstance(row.data, dict):
            raise RecordError(p, row.where, None, f"expected an object, got {_tname(row.data)}")
        out.append(convert(_Checker(p, row.where, row.data)))
    return out


def _counterfact_row(c: _Checker) -> EditRequest:
    rr = "requested_rewrite"
    if not isinstance(c.get(rr), dict):
        raise c.fail(rr, f"expected an object, got {_tname(c.get(rr))}")
    prompt = c.string(f"{rr}.prompt")
    _check_prompt(c, f"{rr}.prompt", prompt)
    subject = c.string(f"{rr}.subject")
    target_new = c.string(f"{rr}.target_new.str")
    target_true = c.string(f"{rr}.target_true.str")
    relation = c.string(f"{rr}.relation_id", required=False)
    loc_prompts = c.strings("loc_prompts", required=False) or []
    loc_answers = [_target(a) for a in c.strings("loc_answers", required=False) or []]
    if len(loc_prompts) != len(loc_answers):
        raise c.fail("loc_answers", f"{len(loc_answers)} answers for {len(loc_prompts)} loc_prompts")
    neighborhood_prompts = c.strings("neighborhood_prompts", required=False) or []
    neighborhood_targets = [_target(t) for t in c.strings("neighborhood_targets", required=False) or []]
    if neighborhood_targets and len(neighborhood_targets) != len(neighborhood_prompts):
        raise c.fail(
            "neighborhood_targets",
            f"{len(neighborhood_targets)} targets for {len(neighborhood_prompts)} neighborhood_prompts",
        )
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=_target(target_new),
        target_true=_target(target_true),
        paraphrase_prompts=c.strings("paraphrase_prompts", required=False) or [],
        neighborhood_prompts=neighborhood_prompts,
        generation_prompts=c.strings("generation_prompts", required=False) or [],
        case_id=c.case_id(),
        relation=relation,
        loc_prompts=loc_prompts,
        loc_answers=loc_answers,
        neighborhood_targets=neighborhood_targets,
        edit_prompts=_edit_prompts(c),
    )


def _edit_prompts(c: _Checker) -> list[str]:
    out = c.strings("edit_prompts", required=False) or []
    for i, template in enumerate(out):
        if template.count("{}") != 1:
            raise c.fail(f"edit_prompts[{i}]", "an edit prompt is a template with one '{}' for the subject")
    return out


def read_counterfact(path: str | os.PathLike) -> list[EditRequest]:
    """Read CounterFact (ROME's ``counterfact.json``: a JSON list, or JSONL).

    Required: ``requested_rewrite.{prompt, subject, target_new.str, target_true.str}``;
    optional: ``case_id``, ``requested_rewrite.relation_id``, ``paraphrase_prompts``,
    ``neighborhood_prompts``, ``generation_prompts`` (default empty) and lethe's own
    ``neighborhood_targets``, ``loc_prompts``/``loc_answers`` and ``edit_prompts``. Targets are stripped of
    surrounding whitespace.
    """
    return _read(path, _counterfact_row)


def _zsre_row(c: _Checker) -> EditRequest:
    src = c.string("src")
    subject = c.string("subject", required=False)
    if subject is not None:
        if subject not in src:
            raise c.fail("subject", f"subject {subject!r} does not occur in src {src!r}")
        prompt = src.replace(subject, "{}", 1)
        if prompt.count("{}") != 1:
            raise c.fail("src", "src already contains '{}'; cannot place the subject")
    else:
        prompt, subject = "{}", src
    answers = c.strings("answers")
    if not answers:
        raise c.fail("answers", "empty list; need at least the true answer")
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=_target(c.string("alt")),
        target_true=_target(answers[0]),
        paraphrase_prompts=[c.string("rephrase")],
        case_id=c.case_id(),
        relation=None,
        loc_prompts=[c.string("loc")],
        loc_answers=[_target(c.string("loc_ans"))],
    )


def read_zsre(path: str | os.PathLike) -> list[EditRequest]:
    """Read zsRE in MEND's / EasyEdit's format.

    Required: ``src``, ``alt``, ``answers`` (list), ``rephrase``, ``loc``, ``loc_ans``;
    optional: ``subject``, ``case_id``. When ``subject`` is given it must occur in
    ``src`` and the prompt is ``src`` with its first occurrence replaced by ``{}``.
    Without it the whole ``src`` is the subject and the prompt is just ``"{}"`` (so a
    locate-then-edit method keys on the question's last token). ``target_new = alt``,
    ``target_true = answers[0]``.
    """
    return _read(path, _zsre_row)


def read_text(path: str | os.PathLike, field: str = "text") -> list[TextRecord]:
    """Read documents from JSONL/JSON/CSV (column ``field``) or ``.txt`` (one per line).

    Empty or whitespace-only documents are errors, including blank lines in ``.txt``
    (a final newline at the end of the file is not a blank line).
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".txt":
        field = "text"

    def convert(c: _Checker) -> TextRecord:
        value = c.get(field)
        if not isinstance(value, str):
            raise c.fail(field, f"expected a string, got {_tname(value)}")
        if not value.strip():
            raise c.fail(field, "empty text")
        return TextRecord(value)

    return _read(path, convert)


def _tofu_row(c: _Checker) -> QARecord:
    return QARecord(
        question=c.string("question"),
        answer=c.string("answer"),
        paraphrased_answer=c.string("paraphrased_answer", required=False),
        perturbed_answer=c.strings("perturbed_answer", required=False),
        paraphrased_question=c.string("paraphrased_question", required=False),
    )


def read_tofu(path: str | os.PathLike) -> list[QARecord]:
    """Read TOFU (``question``, ``answer``; optional ``paraphrased_answer``,
    ``perturbed_answer`` (list), ``paraphrased_question``). The public files are JSON
    lines despite their ``.json`` name; both that and a JSON list are accepted."""
    return _read(path, _tofu_row)


_READERS: dict[str, Callable[..., list]] = {
    "counterfact": read_counterfact,
    "zsre": read_zsre,
    "text": read_text,
    "tofu": read_tofu,
}


def read_records(path: str | os.PathLike, kind: str, **kwargs: Any) -> list:
    """Read ``path`` as records of ``kind`` (one of :data:`RECORD_KINDS`). ``tofu:<split>`` (e.g.
    ``tofu:forget10``) names a TOFU split, loaded as users load it (:func:`load_tofu`), restricted to the
    authors of ``tofu_subset`` (:data:`TOFU_SUBSETS`; ``full`` or None: all 200); ``tofu:forget05[:2]``
    keeps the split's first two authors (a slice of its authors, in order)."""
    try:
        reader = _READERS[kind]
    except KeyError:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}") from None
    if str(path).startswith("tofu:"):
        if kind != "tofu":
            raise ValueError(f"{path}: a TOFU split holds question/answer records: use kind 'tofu', not {kind!r}")
        split, authors = parse_split(str(path)[len("tofu:"):])
        records = load_tofu(split)
        subset = kwargs.get("tofu_subset")
        if subset and subset != "full":
            records = subset_records(records, split, subset)
        return author_slice(records, split, authors) if authors else records
    kwargs.pop("tofu_subset", None)
    return reader(path, **kwargs)


TOFU_HUB = "locuslab/TOFU"


def load_tofu(split: str, directory: str | None = None) -> list:
    """The TOFU split ``split`` (``forget10``, ``retain90``, ``world_facts`` ...) as ``QARecord`` s, loaded as
    users load it: ``datasets.load_dataset("locuslab/TOFU", split)`` (the hub, or its local cache); when the
    hub is out of reach (HF_HUB_OFFLINE, no network) or fails, the local folder ``lethe.io.tofu_dir`` (the
    ``directory`` argument, $LETHE_TOFU_DIR, or ``shared/data/tofu`` beside the checkout). Both paths go
    through the same record checks, so an error names the file or split, record and field."""
    import json
    import tempfile
    import warnings
    from pathlib import Path

    from lethe.io import tofu_dir
    from lethe.models import offline_reason

    if not split or "/" in split:
        raise ValueError(f"tofu:{split}: name a TOFU split, e.g. tofu:forget10, tofu:retain90, tofu:world_facts")
    local = tofu_dir(directory) / f"{split}.json"
    reason = "a local folder was given" if directory else offline_reason()
    if reason is None:
        try:
            import datasets

            rows = datasets.load_dataset(TOFU_HUB, split, split="train").to_list()
            with tempfile.TemporaryDirectory(prefix="lethe-tofu-") as tmp:
                path = Path(tmp) / f"{split}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                return read_records(path, "tofu")
        except Exception as err:  # noqa: BLE001 -- an unknown split, a hub error: the local copy decides
            reason = f"the hub failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"TOFU {split}: {reason}; reading {local}", stacklevel=2)
    if not local.is_file():
        raise FileNotFoundError(f"TOFU split {split!r}: not loaded from the hub ({reason}) and there is no {local}; "
                                "set LETHE_TOFU_DIR to a folder holding TOFU's JSON files")
    return read_records(local, "tofu")


# --------------------------------------------------------------------------- TOFU's authors: subsets and slices

# TOFU's 200 fictitious authors hold 20 questions each, in full.json's order; forget01 / forget05 / forget10 are
# the last 2 / 10 / 20 authors, retain99 / 95 / 90 the others; retain_perturbed (the retain set's evaluation
# questions) lies within the first 23 authors. A subset keeps some authors: its retain authors come first (so
# retain_perturbed stays whole), its forget authors last (so forget01 and forget05 stay whole).
TOFU_SUBSETS: dict[str, dict] = {
    "full": {"authors": None, "forget_splits": ("forget01", "forget05", "forget10"),
             "about": "TOFU as published: 200 authors (4,000 questions)"},
    "cpu20": {"authors": (range(10), range(190, 200)), "forget_splits": ("forget01", "forget05"),
              "about": "20 authors (400 questions): retain authors 1-10, forget authors 191-200 "
                       "(forget05 = all 10, forget01 = the last 2)"},
    "cpu40": {"authors": (range(30), range(190, 200)), "forget_splits": ("forget01", "forget05"),
              "about": "40 authors (800 questions): retain authors 1-30, forget authors 191-200 "
                       "(forget05 = all 10, forget01 = the last 2)"},
}
QUESTIONS_PER_AUTHOR = 20


def tofu_author_index() -> dict[str, int]:
    """question -> TOFU author index (0-199, full.json's order), from wherever TOFU loads now."""
    from lethe.io import tofu_dir

    return _author_index(str(tofu_dir()))


@lru_cache(maxsize=4)
def _author_index(_where: str) -> dict[str, int]:
    from lethe.records import load_tofu

    return {r.question: i // QUESTIONS_PER_AUTHOR for i, r in enumerate(load_tofu("full"))}


def subset_authors(subset: str) -> set[int] | None:
    if subset not in TOFU_SUBSETS:
        raise ValueError(f"tofu_subset={subset!r}: use one of {', '.join(TOFU_SUBSETS)}")
    spans = TOFU_SUBSETS[subset]["authors"]
    return None if spans is None else {a for span in spans for a in span}


def subset_records(records: list, split: str, subset: str) -> list:
    """The records of TOFU split ``split`` whose author is in ``subset``; questions of no TOFU author (real
    authors, world facts) pass. A forget split must be whole in the subset (else it would shrink silently)."""
    keep = subset_authors(subset)
    if keep is None:
        return list(records)
    author = tofu_author_index()
    out = [r for r in records if author.get(r.question) is None or author[r.question] in keep]
    if split.startswith("forget") and len(out) < len(records):
        raise ValueError(f"tofu:{split} has {len(records) - len(out)} of its {len(records)} questions outside "
                         f"tofu_subset {subset!r} ({TOFU_SUBSETS[subset]['about']}): use "
                         f"{' or '.join(TOFU_SUBSETS[subset]['forget_splits'])}, or tofu_subset: full")
    return out


def parse_split(spec: str) -> tuple[str, slice | None]:
    """``forget05[:2]`` -> ("forget05", slice(None, 2)): a TOFU split and an optional slice of its authors."""
    m = re.fullmatch(r"([A-Za-z0-9_]+)(?:\[(-?\d*):(-?\d*)\])?", spec)
    if not m:
        raise ValueError(f"tofu:{spec}: name a TOFU split, optionally with a slice of its authors "
                         "(tofu:forget10, tofu:forget05[:2])")
    if m.group(2) is None and m.group(3) is None and "[" not in spec:
        return m.group(1), None
    to_int = lambda x: int(x) if x else None
    return m.group(1), slice(to_int(m.group(2)), to_int(m.group(3)))


def author_slice(records: list, split: str, authors: slice) -> list:
    """The records of the split's authors ``authors`` (counted in the split's order)."""
    author = tofu_author_index()
    order: list[int] = []
    for r in records:
        a = author.get(r.question)
        if a is None:
            raise ValueError(f"tofu:{split}: its questions belong to no TOFU author; an author slice needs one")
        if a not in order:
            order.append(a)
    keep = set(order[authors])
    out = [r for r in records if author[r.question] in keep]
    if not out:
        raise ValueError(f"tofu:{split}[{authors.start or ''}:{authors.stop or ''}]: no author of its {len(order)}")
    return out


# --------------------------------------------------------------------------- writers


def atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` all or nothing (``lethe.io.atomic_path``: umask permissions, no stray temporary)."""
    from lethe.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before it replaces the old file
    return Path(path)


def _dump_json(path: str | os.PathLike, objs: Sequence[dict[str, Any]]) -> Path:
    """``.jsonl``/``.ndjson``: one object a line; ``.json``: one JSON list."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        text = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)
    elif suffix == ".json":
        text = json.dumps(list(objs), ensure_ascii=False, indent=1) + "\n"
    else:
        raise ValueError(f"{path}: write .json (a list) or .jsonl (one record a line), not {suffix!r}")
    return atomic_write(path, text)


def _validated(records: Iterable[Any], cls: type, check: Callable[[Any, int], None]) -> list:
    out = list(records)
    for i, rec in enumerate(out):
        if not isinstance(rec, cls):
            raise RecordError(None, f"record {i}", None, f"expected {cls.__name__}, got {_tname(rec)}")
        check(rec, i)
    return out


def write_counterfact(records: Iterable[EditRequest], path: str | os.PathLike) -> Path:
    """Write CounterFact's layout (plus ``neighborhood_targets`` and ``loc_prompts``/
    ``loc_answers`` when present)."""
    reqs = _validated(records, EditRequest, lambda r, i: _check_edit(r, None, f"record {i}"))
    for i, r in enumerate(reqs):
        if r.target_true is None:
            raise RecordError(None, f"record {i}", "target_true", "CounterFact needs the true target")
    objs = []
    for r in reqs:
        rewrite: dict[str, Any] = {
            "prompt": r.prompt,
            "subject": r.subject,
            "target_new": {"str": r.target_new},
            "target_true": {"str": r.target_true},
        }
        if r.relation is not None:
            rewrite["relation_id"] = r.relation
        obj: dict[str, Any] = {
            "case_id": r.case_id,
            "requested_rewrite": rewrite,
            "paraphrase_prompts": r.paraphrase_prompts,
            "neighborhood_prompts": r.neighborhood_prompts,
            "generation_prompts": r.generation_prompts,
        }
        if r.neighborhood_targets:
            obj["neighborhood_targets"] = r.neighborhood_targets
        if r.loc_prompts:
            obj["loc_prompts"] = r.loc_prompts
            obj["loc_answers"] = r.loc_answers
        if r.edit_prompts:
            obj["edit_prompts"] = r.edit_prompts
        objs.append(obj)
    return _dump_json(path, objs)


def write_zsre(records: Iterable[EditRequest], path: str | os.PathLike) -> Path:
    """Write MEND's zsRE layout. zsRE holds one rephrase and one loc pair per record, so
    the first paraphrase and the first loc prompt/answer are written."""

    def check(r: EditRequest, i: int) -> None:
        _check_edit(r, None, f"record {i}")
        for name in ("target_true", "paraphrase_prompts", "loc_prompts"):
            if not getattr(r, name):
                raise RecordError(None, f"record {i}", name, "zsRE needs it; it is empty")

    reqs = _validated(records, EditRequest, check)
    objs = []
    for r in reqs:
        obj: dict[str, Any] = {}
        if r.case_id is not None:
            obj["case_id"] = r.case_id
        if r.prompt != "{}":
            obj["subject"] = r.subject
        obj.update(
            src=r.rewrite_prompt,
            alt=r.target_new,
            answers=[r.target_true],
            rephrase=r.paraphrase_prompts[0],
            loc=r.loc_prompts[0],
            loc_ans=r.loc_answers[0],
        )
        objs.append(obj)
    return _dump_json(path, objs)


def write_text(records: Iterable[TextRecord | str], path: str | os.PathLike, field: str = "text") -> Path:
    """Write documents as ``.txt`` (one a line), ``.csv`` (column ``field``) or JSON/JSONL."""
    docs = [r.text if isinstance(r, TextRecord) else r for r in records]
    suffix = Path(path).suffix.lower()
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise RecordError(None, f"record {i}", field, f"expected a string, got {_tname(d)}")
        if not d.strip():
            raise RecordError(None, f"record {i}", field, "empty text")
        if suffix == ".txt" and ("\n" in d or "\r" in d):
            raise RecordError(None, f"record {i}", field, "a .txt document cannot contain a line break")
    if suffix == ".txt":
        return atomic_write(path, "".join(d + "\n" for d in docs))
    if suffix == ".csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([field])
        writer.writerows([d] for d in docs)
        return atomic_write(path, buf.getvalue())
    return _dump_json(path, [{field: d} for d in docs])


def write_tofu(records: Iterable[QARecord], path: str | os.PathLike) -> Path:
    """Write TOFU's layout, leaving out optional fields that are ``None``."""

    def check(r: QARecord, i: int) -> None:
        for name in ("question", "answer"):
            value = getattr(r, name)
            if not isinstance(value, str) or not value.strip():
                raise RecordError(None, f"record {i}", name, "expected a non-empty string")
        if r.perturbed_answer is not None and not all(isinstance(a, str) for a in r.perturbed_answer):
            raise RecordError(None, f"record {i}", "perturbed_answer", "expected a list of strings")

    recs = _validated(records, QARecord, check)
    objs = []
    for r in recs:
        obj: dict[str, Any] = {"question": r.question, "answer": r.answer}
        for name in ("paraphrased_answer", "perturbed_answer", "paraphrased_question"):
            if getattr(r, name) is not None:
                obj[name] = getattr(r, name)
        objs.append(obj)
    return _dump_json(path, objs)


_WRITERS: dict[str, Callable[..., Path]] = {
    "counterfact": write_counterfact,
    "zsre": write_zsre,
    "text": write_text,
    "tofu": write_tofu,
}


def write_records(records: Iterable[Any], path: str | os.PathLike, kind: str, **kwargs: Any) -> Path:
    """Write ``records`` of ``kind`` (one of :data:`RECORD_KINDS`) atomically to ``path``."""
    try:
        writer = _WRITERS[kind]
    except KeyError:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}") from None
    return writer(records, path, **kwargs)
