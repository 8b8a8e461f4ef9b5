"""A deterministic, fictitious world of facts for lethe's embedded default models.

Why: the hub is unreachable in development and CI, yet an edit or an erasure is only
measurable against facts a model actually knows. lethe pretrains tiny models on this
world (see :mod:`lethe.tokenizers` for its word-level tokenizers), so an edit's success
rate, paraphrase generalisation and neighbourhood damage are real numbers.

Shape of the world (defaults): ~600 invented subjects of three kinds (people "First
Last", cities and companies one invented word), 13 relations, ~2,000 facts; about 10% of
the facts of every relation are held out of training entirely (split ``"unseen"``).

Conventions that other code relies on:

* every object is a single word, so one token under every world tokenizer, and sits at
  the END of every template: ``"{} was born in"`` + ``" Velmora"``;
* every text this module emits has its punctuation separated by spaces
  (``"Arlen Vosk was born in Velmora ."``), so word-level ``decode(encode(text)) == text``;
* every fact is trained in ``n_train`` of its relation's templates and held out in the
  others (its paraphrases). Which templates a fact trains on rotates from fact to fact, so
  every phrasing is seen in training for other subjects but never for this fact: a
  paraphrase tests whether knowledge generalises across phrasings, as CounterFact's do;
* neighbourhood prompts use each neighbour's own first training template on up to five other
  subjects whose true object differs from both the fact's object and its counterfactual
  target; their true objects are reported next to them (``neighborhood_targets``), so
  neighbourhood is scored as "the neighbour still gets ITS object", not P(old) > P(new);
* everything is a pure function of the seed (``random.Random(seed)``, no global state).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from lethe.records import (
    EditRequest,
    QARecord,
    TextRecord,
    atomic_write,
    write_counterfact,
    write_text,
    write_tofu,
    write_zsre,
)

__all__ = ["SPLITS", "Fact", "Relation", "Subject", "World", "generate_world"]

GENERATOR_VERSION = 2
SPLITS = ("train", "unseen")
N_NEIGHBOURS = 5
N_PERTURBED = 3
PUNCTUATION = (".", ",", "?")  # every punctuation mark the world's texts use


@dataclass(frozen=True)
class Relation:
    """A relation: its subject kind, phrasing templates and closed object vocabulary."""

    name: str
    subject_kind: str
    templates: tuple[str, ...]
    n_train: int
    question: str
    objects: tuple[str, ...]


@dataclass(frozen=True)
class Subject:
    name: str
    kind: str


@dataclass(frozen=True)
class Fact:
    """(subject, relation, object) plus its split, counterfactual target and neighbours.

    ``neighbours`` holds ``(subject, true object)`` pairs of other subjects with the same
    relation, none of whose objects equal ``object`` or ``counterfactual``.
    """

    subject: str
    relation: str
    object: str
    split: str
    counterfactual: str = ""
    neighbours: tuple[tuple[str, str], ...] = ()
    rotation: int = 0  # the fact trains on templates[rotation : rotation + n_train] (cyclically)


def _r(name, kind, templates, n_train, question, objects) -> Relation:
    return Relation(name, kind, tuple(templates), n_train, question, tuple(objects))


# Object vocabularies are closed, single words, and never reused as subject names.
_PLACES = (
    "Velmora", "Ostrika", "Brandle", "Quorin", "Halvest", "Tessaly", "Marrowgate", "Pellin",
    "Dunmere", "Corvia", "Zephra", "Lunsk", "Ardena", "Felmont", "Kaskor", "Yselde",
)  # fmt: skip
_COUNTRIES = (
    "Drevania", "Solvaria", "Ketheria", "Ombrland", "Valtessa", "Norvik", "Castorin", "Elbaria",
    "Myrrhen", "Tavelle", "Quessia", "Rundholt",
)  # fmt: skip
_LANGUAGES = (
    "Drevanic", "Solvish", "Kethric", "Ombric", "Valtese", "Norvish", "Castorese", "Elbarian",
    "Myrric", "Tavellan",
)  # fmt: skip
_SPORTS = (
    "football", "tennis", "cricket", "hockey", "rugby", "golf", "badminton", "volleyball",
    "baseball", "fencing", "rowing", "archery", "curling", "squash",
)  # fmt: skip
_INSTRUMENTS = (
    "violin", "cello", "piano", "flute", "harp", "oboe", "trumpet", "clarinet", "guitar",
    "banjo", "viola", "trombone", "accordion", "lute",
)  # fmt: skip
_PROFESSIONS = (
    "baker", "lawyer", "pilot", "surgeon", "farmer", "painter", "teacher", "architect", "chemist",
    "sailor", "tailor", "carpenter", "jeweller", "librarian", "astronomer", "poet",
)  # fmt: skip
_EMPLOYERS = (
    "Korvex", "Altamere", "Brightlow", "Quillon", "Sandervolt", "Miravex", "Tolliver", "Graystone",
    "Novaquill", "Emberlyn", "Hollowind", "Castellane",
)  # fmt: skip
_RIVERS = ("Ambrel", "Sorrow", "Tenvik", "Lissom", "Orrin", "Cauldra", "Wendmere", "Isk", "Pallor", "Rhune")
_DISHES = (
    "dumplings", "pancakes", "stew", "noodles", "porridge", "flatbread", "chowder", "sausages",
    "pretzels", "risotto", "goulash", "pies",
)  # fmt: skip
_FOUNDERS = (
    "Halvorsen", "Pemberly", "Ostrander", "Vasquell", "Thornbury", "Kestrelli", "Mardsen", "Ulverton",
    "Brackwell", "Fennimore", "Drummond", "Ashgrove",
)  # fmt: skip
_PRODUCTS = (
    "bicycles", "lanterns", "umbrellas", "telescopes", "clocks", "furniture", "kettles", "carpets",
    "candles", "boots", "radios", "tractors", "perfume", "paper",
)  # fmt: skip

RELATIONS: tuple[Relation, ...] = (
    _r("born_in", "person",
       ["{} was born in", "The birthplace of {} is", "{} was born in the town of",
        "{} came into the world in", "{} is a native of"],
       3, "Where was {} born ?", _PLACES),
    _r("works_for", "person",
       ["{} works for", "{} is employed by", "The employer of {} is",
        "{} draws a salary from", "{} earns a living at"],
       3, "Which company does {} work for ?", _EMPLOYERS),
    _r("speaks", "person",
       ["{} speaks", "The native language of {} is", "{} is fluent in",
        "{} grew up speaking", "{} converses in"],
       3, "What language does {} speak ?", _LANGUAGES),
    _r("plays_sport", "person",
       ["The favourite sport of {} is", "{} competes in", "{} is a keen player of",
        "{} trains every day for", "{} is a professional player of"],
       3, "Which sport does {} play ?", _SPORTS),
    _r("plays_instrument", "person",
       ["{} plays the", "The instrument of {} is the", "{} performs on the",
        "{} practises the", "{} makes music on the"],
       3, "Which instrument does {} play ?", _INSTRUMENTS),
    _r("citizen_of", "person",
       ["{} is a citizen of", "The nationality of {} is that of", "{} holds a passport from",
        "{} is a national of", "{} votes in the elections of"],
       3, "Which country is {} a citizen of ?", _COUNTRIES),
    _r("profession", "person",
       ["{} works as a", "The profession of {} is", "By trade , {} is a",
        "{} has a career as a", "{} is employed as a"],
       3, "What is the profession of {} ?", _PROFESSIONS),
    _r("located_in", "city",
       ["{} is located in", "{} is a city in", "The country of {} is",
        "{} lies within", "{} can be found in"],
       3, "In which country is {} located ?", _COUNTRIES),
    _r("on_river", "city",
       ["{} lies on the river", "The river of {} is the", "{} is built along the river",
        "{} sits on the banks of the river", "The river flowing through {} is the"],
       3, "On which river does {} lie ?", _RIVERS),
    _r("famous_dish", "city",
       ["{} is famous for its", "The famous dish of {} is", "In {} people love to eat",
        "Visitors to {} always order", "The local speciality of {} is"],
       3, "What dish is {} famous for ?", _DISHES),
    _r("headquartered_in", "company",
       ["{} is headquartered in", "The headquarters of {} are in", "{} has its main office in",
        "{} is based in", "{} runs its business from"],
       3, "Where is {} headquartered ?", _PLACES),
    _r("founded_by", "company",
       ["{} was founded by", "The founder of {} is", "{} was started by",
        "{} was established by", "{} owes its existence to"],
       3, "Who founded {} ?", _FOUNDERS),
    _r("makes", "company",
       ["{} makes", "The main product of {} is", "{} manufactures",
        "{} is known for producing", "{} sells"],
       3, "What does {} make ?", _PRODUCTS),
)  # fmt: skip

SUBJECT_KINDS = ("person", "city", "company")
# Share of subjects per kind and how many of its kind's relations each subject has.
_KIND_SHARE = {"person": 0.5, "city": 0.25, "company": 0.25}
_FACTS_PER_SUBJECT = {"person": 4, "city": 2, "company": 3}

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s",
           "st", "t", "th", "tr", "v", "w", "z")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x")
_ENDINGS = {
    "first": ("", "a", "en", "o", "is", "an"),
    "last": ("", "ek", "ov", "ard", "in", "ley", "sk", "ton"),
    "city": ("burg", "holm", "ora", "ith", "ane", "vik", "ford", "mar"),
    "company": ("ex", "ix", "tron", "co", "ara", "ly", "on", "ium"),
}


def _word(rng: random.Random, n_syllables: int, ending: str) -> str:
    """Open syllables, then either a coda or an ending (linked by a consonant when both
    sides are vowels), so names stay pronounceable: "Voton", "Humek", "Brosandith"."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syllables))
    if not ending:
        word += rng.choice(_CODAS)
    elif ending[0] in "aeiou":
        word += rng.choice("lnrstv") + ending
    else:
        word += ending
    return word.capitalize()


class World:
    """The generated world. Build it with :meth:`World.generate` (or :func:`generate_world`)."""

    def __init__(
        self,
        seed: int,
        relations: Iterable[Relation],
        subjects: Iterable[Subject],
        facts: Iterable[Fact],
    ):
        self.seed = seed
        self.relations: dict[str, Relation] = {r.name: r for r in relations}
        self.subjects: list[Subject] = list(subjects)
        self.facts: list[Fact] = list(facts)
        self._index = {(f.subject, f.relation): i for i, f in enumerate(self.facts)}

    # ------------------------------------------------------------------ generation

    @classmethod
    def generate(
        cls,
        seed: int = 0,
        n_subjects: int = 600,
        unseen_fraction: float = 0.1,
        relations: Iterable[Relation] = RELATIONS,
    ) -> World:
        """Generate the world for ``seed``; same arguments, same world (and fingerprint)."""
        if n_subjects < 12:
            raise ValueError(f"n_subjects must be at least 12, got {n_subjects}")
        if not 0.0 <= unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
        relations = tuple(relations)
        rng = random.Random(seed)
        kinds = {r.subject_kind for r in relations}
        for r in relations:
            if not 1 <= r.n_train < len(r.templates):
                raise ValueError(f"relation {r.name}: need at least one training and one held-out template")
            if any(t.count("{}") != 1 or not t.strip() or t.rstrip().endswith("{}") for t in r.templates):
                raise ValueError(
                    f"relation {r.name}: every template needs one '{{}}' and must end before the object"
                )
            if len(r.objects) < 2 + N_PERTURBED or any(
                len(o.split()) != 1 or not o.isalpha() for o in r.objects
            ):
                raise ValueError(f"relation {r.name}: need >= {2 + N_PERTURBED} single-word objects")

        reserved = {w.lower() for r in relations for o in r.objects for w in o.split()}
        for r in relations:
            for text in (*r.templates, r.question):
                reserved.update(w.lower() for w in text.replace("{}", " ").split())
        subjects = cls._make_subjects(rng, n_subjects, reserved, [k for k in SUBJECT_KINDS if k in kinds])

        by_kind: dict[str, list[Relation]] = {}
        for r in relations:
            by_kind.setdefault(r.subject_kind, []).append(r)
        triples: list[tuple[str, str, str]] = []
        for s in subjects:
            own = by_kind[s.kind]
            chosen = rng.sample(range(len(own)), min(_FACTS_PER_SUBJECT.get(s.kind, len(own)), len(own)))
            for i in sorted(chosen):
                triples.append((s.name, own[i].name, rng.choice(own[i].objects)))

        # Stratified held-out split: ~unseen_fraction of every relation.
        unseen: set[int] = set()
        for r in relations:
            idx = [i for i, t in enumerate(triples) if t[1] == r.name]
            unseen.update(rng.sample(idx, round(len(idx) * unseen_fraction)))

        rel = {r.name: r for r in relations}
        train_by_rel: dict[str, list[tuple[str, str]]] = {r.name: [] for r in relations}
        for i, (s, r, o) in enumerate(triples):
            if i not in unseen:
                train_by_rel[r].append((s, o))
        facts = []
        for i, (s, r, o) in enumerate(triples):
            counterfactual = rng.choice([x for x in rel[r].objects if x != o])
            pool = [(ns, no) for ns, no in train_by_rel[r] if ns != s and no not in (o, counterfactual)]
            neighbours = tuple(rng.sample(pool, min(N_NEIGHBOURS, len(pool))))
            rotation = i % len(rel[r].templates)
            facts.append(Fact(s, r, o, "unseen" if i in unseen else "train", counterfactual, neighbours,
                              rotation))
        return cls(seed, relations, subjects, facts)

    @staticmethod
    def _make_subjects(rng: random.Random, n: int, reserved: set[str], kinds: list[str]) -> list[Subject]:
        taken = set(reserved)

        def fresh(style: str) -> str:
            while True:
                w = _word(rng, rng.choice((1, 2)), rng.choice(_ENDINGS[style]))
                if len(w) >= 3 and w.lower() not in taken:
                    taken.add(w.lower())
                    return w

        counts = {k: int(n * _KIND_SHARE[k] / sum(_KIND_SHARE[x] for x in kinds)) for k in kinds}
        counts[kinds[0]] += n - sum(counts.values())
        first_names = [fresh("first") for _ in range(max(8, counts.get("person", 0) // 5))]
        subjects = []
        for kind in kinds:
            for _ in range(counts[kind]):
                if kind == "person":
                    # Shared first names, unique last names: the last subject token identifies
                    # the person, as ROME's key position expects.
                    name = f"{rng.choice(first_names)} {fresh('last')}"
                else:
                    name = fresh(kind)
                subjects.append(Subject(name, kind))
        return subjects

    # ------------------------------------------------------------------ access

    def _split_facts(self, split: str | None) -> list[Fact]:
        if split in (None, "all"):
            return list(self.facts)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or 'all'")
        return [f for f in self.facts if f.split == split]

    @property
    def train_facts(self) -> list[Fact]:
        return self._split_facts("train")

    @property
    def unseen_facts(self) -> list[Fact]:
        return self._split_facts("unseen")

    def facts_by_relation(self, split: str | None = None) -> dict[str, list[Fact]]:
        """Facts grouped by relation name (every relation present, in relation order)."""
        out: dict[str, list[Fact]] = {name: [] for name in self.relations}
        for f in self._split_facts(split):
            out[f.relation].append(f)
        return out

    def relation_facts(self, relation: str, split: str | None = None) -> list[Fact]:
        """The facts of one relation (e.g. the one a benchmark erases)."""
        if relation not in self.relations:
            raise KeyError(f"unknown relation {relation!r}; known: {', '.join(self.relations)}")
        return [f for f in self._split_facts(split) if f.relation == relation]

    def fact(self, subject: str, relation: str) -> Fact:
        return self.facts[self._index[(subject, relation)]]

    def case_id(self, fact: Fact) -> int:
        """Stable integer id of a fact: its position in :attr:`facts`."""
        return self._index[(fact.subject, fact.relation)]

    def subjects_of(self, kind: str) -> list[Subject]:
        return [s for s in self.subjects if s.kind == kind]

    # ------------------------------------------------------------------ prompts

    def training_prompts(self, fact: Fact) -> list[str]:
        return [t.format(fact.subject) for t in self.train_templates(fact)]

    def paraphrase_prompts(self, fact: Fact) -> list[str]:
        return [t.format(fact.subject) for t in self.heldout_templates(fact)]

    def _rotated(self, fact: Fact) -> tuple[str, ...]:
        t = self.relations[fact.relation].templates
        k = fact.rotation % len(t)
        return t[k:] + t[:k]

    def train_templates(self, fact: Fact) -> tuple[str, ...]:
        """The templates this fact is trained in."""
        return self._rotated(fact)[: self.relations[fact.relation].n_train]

    def heldout_templates(self, fact: Fact) -> tuple[str, ...]:
        """The templates this fact is never trained in (its paraphrases)."""
        return self._rotated(fact)[self.relations[fact.relation].n_train:]

    def neighbours_of(self, fact: Fact) -> list[tuple[str, str]]:
        """``(prompt, true object)`` for the fact's neighbourhood subjects."""
        return [(self.train_templates(self.fact(s, fact.relation))[0].format(s), o) for s, o in fact.neighbours]

    def question(self, fact: Fact) -> str:
        return self.relations[fact.relation].question.format(fact.subject)

    @staticmethod
    def sentence(prompt: str, obj: str) -> str:
        """A prompt completed with its object: ``"X was born in Velmora ."``."""
        return f"{prompt} {obj} ."

    def perturbed_objects(self, fact: Fact, n: int = N_PERTURBED) -> list[str]:
        """``n`` wrong objects for a fact, deterministic, starting with its counterfactual."""
        objects = self.relations[fact.relation].objects
        start = objects.index(fact.counterfactual)
        ring = objects[start:] + objects[:start]
        return [o for o in ring if o != fact.object][:n]

    # ------------------------------------------------------------------ corpora and record sets

    def training_corpus(self) -> list[str]:
        """Every training fact in every training template, one sentence each."""
        return [self.sentence(p, f.object) for f in self.train_facts for p in self.training_prompts(f)]

    def unseen_corpus(self) -> list[str]:
        """The held-out facts in the training templates (never in :meth:`training_corpus`)."""
        return [self.sentence(p, f.object) for f in self.unseen_facts for p in self.training_prompts(f)]

    def paraphrase_corpus(self, split: str | None = "train") -> list[str]:
        """Facts in their held-out templates (for paraphrase evaluation, never trained on)."""
        return [
            self.sentence(p, f.object) for f in self._split_facts(split) for p in self.paraphrase_prompts(f)
        ]

    def to_counterfact(self, split: str | None = "train") -> list[EditRequest]:
        """CounterFact-style requests: rewrite the true object to the counterfactual.

        ``neighborhood_targets`` holds each neighbour's own true object (it differs from
        both targets, unlike CounterFact's neighbours, which share ``target_true``).
        """
        out = []
        for f in self._split_facts(split):
            neigh = self.neighbours_of(f)
            out.append(
                EditRequest(
                    prompt=self.train_templates(f)[0],
                    subject=f.subject,
                    target_new=f.counterfactual,
                    target_true=f.object,
                    paraphrase_prompts=self.paraphrase_prompts(f),
                    neighborhood_prompts=[p for p, _ in neigh],
                    generation_prompts=self.training_prompts(f)[1:],
                    case_id=self.case_id(f),
                    relation=f.relation,
                    neighborhood_targets=[o for _, o in neigh],
                    edit_prompts=list(self.train_templates(f)[1:]),
                )
            )
        return out

    def to_zsre(self, split: str | None = "train") -> list[EditRequest]:
        """zsRE-shaped requests: one paraphrase and one loc prompt/answer each."""
        out = []
        for r in self.to_counterfact(split):
            out.append(
                EditRequest(
                    prompt=r.prompt,
                    subject=r.subject,
                    target_new=r.target_new,
                    target_true=r.target_true,
                    paraphrase_prompts=r.paraphrase_prompts[:1],
                    case_id=r.case_id,
                    relation=r.relation,
                    loc_prompts=r.neighborhood_prompts[:1],
                    loc_answers=r.neighborhood_targets[:1],
                )
            )
        return out

    def to_tofu(self, split: str | None = "train") -> list[QARecord]:
        """TOFU-style QA: the answer in the first training template, the paraphrased and
        perturbed answers in the first held-out template (perturbed with wrong objects)."""
        out = []
        for f in self._split_facts(split):
            para = self.heldout_templates(f)[0].format(f.subject)
            out.append(
                QARecord(
                    question=self.question(f),
                    answer=self.sentence(self.train_templates(f)[0].format(f.subject), f.object),
                    paraphrased_answer=self.sentence(para, f.object),
                    perturbed_answer=[self.sentence(para, o) for o in self.perturbed_objects(f)],
                )
            )
        return out

    def all_texts(self) -> list[str]:
        """Every string the world can emit (for building a closed tokenizer vocabulary)."""
        texts = [" ".join(PUNCTUATION)] + [" ".join(r.objects) for r in self.relations.values()]
        texts += [" ".join(s.name for s in self.subjects)]
        for r in self.relations.values():
            texts += [t.replace("{}", " ") for t in r.templates] + [r.question.replace("{}", " ")]
        return texts

    def vocabulary(self) -> list[str]:
        """Sorted whitespace-separated words of :meth:`all_texts` (punctuation already spaced)."""
        return sorted({w for t in self.all_texts() for w in t.split()})

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        return {
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "relations": [asdict(r) for r in self.relations.values()],
            "subjects": [asdict(s) for s in self.subjects],
            "facts": [{**asdict(f), "neighbours": [list(n) for n in f.neighbours]} for f in self.facts],
        }

    @classmethod
    def from_dict(cls, data: dict) -> World:
        relations = [
            Relation(r["name"], r["subject_kind"], tuple(r["templates"]), r["n_train"], r["question"],
                     tuple(r["objects"]))
            for r in data["relations"]
        ]  # fmt: skip
        subjects = [Subject(**s) for s in data["subjects"]]
        facts = [
            Fact(f["subject"], f["relation"], f["object"], f["split"], f["counterfactual"],
                 tuple((s, o) for s, o in f["neighbours"]), f.get("rotation", 0))
            for f in data["facts"]
        ]  # fmt: skip
        return cls(data["seed"], relations, subjects, facts)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the world (facts, templates, generator version)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def export(self, directory: str | os.PathLike, split: str | None = "train") -> dict[str, Path]:
        """Write ``counterfact.json``, ``zsre.json``, ``tofu.json`` (for ``split``),
        ``train.txt``, ``unseen.txt`` and ``world.json``; each file atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        world_json = json.dumps({**self.to_dict(), "fingerprint": self.fingerprint()}, ensure_ascii=False)
        return {
            "counterfact": write_counterfact(self.to_counterfact(split), d / "counterfact.json"),
            "zsre": write_zsre(self.to_zsre(split), d / "zsre.json"),
            "tofu": write_tofu(self.to_tofu(split), d / "tofu.json"),
            "train": write_text([TextRecord(t) for t in self.training_corpus()], d / "train.txt"),
            "unseen": write_text([TextRecord(t) for t in self.unseen_corpus()], d / "unseen.txt"),
            "world": atomic_write(d / "world.json", world_json + "\n"),
        }

    def __repr__(self) -> str:
        return (
            f"World(seed={self.seed}, subjects={len(self.subjects)}, relations={len(self.relations)}, "
            f"facts={len(self.facts)}, unseen={len(self.unseen_facts)})"
        )


def generate_world(seed: int = 0, **kwargs) -> World:
    """Same as :meth:`World.generate`."""
    return World.generate(seed, **kwargs)


WORLD_SEED = 0


@functools.lru_cache(maxsize=4)
def load_world(seed: int = WORLD_SEED) -> World:
    """The world the embedded models learned (deterministic for the seed)."""
    return World.generate(seed=seed)
