"""A generator of fictional editing cases: a small invented world, fully deterministic for a seed.

No model knows these facts, so the cases exercise every part of an editing / evaluation pipeline (rewrite,
paraphrase, neighbourhood, attribute, other-attribution, generation and two-hop probes) without depending on
what a particular model memorised, and without any data file.

The world (built from ``seed``):

* countries (``Kamoria``), each with a capital and other cities (``Telobburg``) and an official language
  (``Kamorese``); companies (``Ravido Labs``) each headquartered in a city; instruments (``velophone``);
* people (``Sumi Tokaveru``): each has a country of citizenship, an employer, a birthplace and an instrument.
  Names are built from consonant-vowel syllables with a fixed number of syllables per word and are unique, so
  no person's name occurs inside another's.

Each case edits one fact of one person (``relation`` among ``citizenship``, ``employer``, ``birthplace``,
``instrument``); ``target_true`` is the person's current (fictional) object and ``target_new`` another object of
the same type. Probes:

* ``rewrite``: the edit prompt (one of the relation's templates, chosen at random);
* ``paraphrase``: other templates of the relation, target ``target_new``, foil ``target_true``;
* ``neighborhood``: the rewrite template filled with *bystanders* (people never edited by any case) of the
  same relation whose object differs from ``target_new``: target = their own object, foil = ``target_new``;
* ``attribute``: bystanders whose object already is ``target_new`` (target ``target_new``, foil
  ``target_true``), when the world has some;
* ``other_attribution``: the edited person's other relations (must not change);
* ``generation``: two open prompts about the subject (no target);
* ``multihop`` and ``portability`` (``meta["subtype"] = "one_hop"``): two-hop questions through the edited
  fact and a second fact defined in the world (citizenship -> that country's capital and language, employer
  -> its headquarters city, birthplace -> the city's country). Target = the answer through ``target_new``,
  foil = the answer through ``target_true``. Multihop probes (a question and a cloze phrasing) share
  ``meta["group"]``. The second-hop facts are listed in ``case.meta["hop_facts"]``.

Cases never edit a bystander, a country, a city or a company, so all cases of one call can be applied together
(batch editing) without one edit changing another case's expected answers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from editlens.data.schema import EditCase, Probe, ProbeKind, Rewrite, fill_template, make_case

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]

#: Relation name -> templates (paraphrases of one another), each with ``{}`` for the subject.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "citizenship": ("{} is a citizen of", "{} holds the citizenship of", "The country of citizenship of {} is",
                    "{} carries a passport issued by"),
    "employer": ("{} works for", "{} is employed by", "The employer of {} is", "{} draws a salary from"),
    "birthplace": ("{} was born in", "The birthplace of {} is", "{} was born in the city of",
                   "{} spent early childhood in the city of"),
    "instrument": ("{} plays the", "The instrument played by {} is the", "{} performs on the",
                   "On stage, {} plays the"),
}

#: Relation -> two-hop chains: (chain name, cloze template, question template).
CHAINS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "citizenship": (
        ("capital", "The capital of the country of citizenship of {} is",
         "What is the capital of the country that {} is a citizen of?"),
        ("language", "The official language of the country of citizenship of {} is",
         "What is the official language of the country that {} is a citizen of?"),
    ),
    "employer": (
        ("headquarters", "The company that employs {} is headquartered in the city of",
         "In which city is the employer of {} headquartered?"),
    ),
    "birthplace": (
        ("country", "The city where {} was born lies in the country of",
         "In which country is the city where {} was born?"),
    ),
    "instrument": (),
}

RELATIONS: tuple[str, ...] = tuple(TEMPLATES)
_GENERATION = ("{} is best known for", "The life of {} has been")


@dataclass
class _World:
    rng: random.Random
    used: set[str] = field(default_factory=set)
    countries: list[str] = field(default_factory=list)
    capital: dict[str, str] = field(default_factory=dict)
    language: dict[str, str] = field(default_factory=dict)
    cities: list[str] = field(default_factory=list)
    city_country: dict[str, str] = field(default_factory=dict)
    companies: list[str] = field(default_factory=list)
    hq: dict[str, str] = field(default_factory=dict)
    instruments: list[str] = field(default_factory=list)

    def word(self, n: int) -> str:
        return "".join(self.rng.choice(_SYLLABLES) for _ in range(n))

    def unique(self, make) -> str:
        for _ in range(10000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("synthetic world: name space exhausted")  # pragma: no cover

    def objects(self, relation: str) -> list[str]:
        return {"citizenship": self.countries, "employer": self.companies, "birthplace": self.cities,
                "instrument": self.instruments}[relation]

    def second_hop(self, chain: str, obj: str) -> tuple[str, str]:
        """(statement prompt, answer) of the second-hop fact of ``chain`` about ``obj``."""
        if chain == "capital":
            return f"The capital of {obj} is", self.capital[obj]
        if chain == "language":
            return f"The official language of {obj} is", self.language[obj]
        if chain == "headquarters":
            return f"{obj} is headquartered in the city of", self.hq[obj]
        if chain == "country":
            return f"The city of {obj} lies in the country of", self.city_country[obj]
        raise KeyError(chain)  # pragma: no cover


def _build_world(rng: random.Random, n_people: int) -> tuple[_World, list[dict[str, Any]]]:
    w = _World(rng)
    n_countries = max(6, min(60, n_people // 8 + 4))
    for _ in range(n_countries):
        stem = w.unique(lambda: w.word(2).capitalize())
        country = stem + rng.choice(("ria", "via", "nia", "dor"))
        w.used.add(country)
        w.countries.append(country)
        w.language[country] = stem + "ese"
        w.used.add(stem + "ese")
        own = [w.unique(lambda: w.word(2).capitalize() + rng.choice(("burg", "holm", "ton", "grad")))
               for _ in range(3)]
        w.capital[country] = own[0]
        for c in own:
            w.city_country[c] = country
        w.cities.extend(own)
    for _ in range(max(6, min(60, n_people // 8 + 4))):
        company = w.unique(lambda: w.word(2).capitalize() + " " + rng.choice(("Labs", "Works", "Systems", "Foundry")))
        w.companies.append(company)
        w.hq[company] = rng.choice(w.cities)
    for _ in range(8):
        w.instruments.append(w.unique(lambda: w.word(2) + rng.choice(("phone", "lute", "horn", "drum"))))
    people = []
    for _ in range(n_people):
        name = w.unique(lambda: w.word(2).capitalize() + " " + w.word(3).capitalize())
        people.append({"name": name, **{r: rng.choice(w.objects(r)) for r in RELATIONS}})
    return w, people


def synthetic_cases(n: int, seed: int = 0, *, relations: Sequence[str] | None = None, n_paraphrases: int = 2,
                    n_neighbors: int = 3, n_attribute: int = 2) -> list[EditCase]:
    """``n`` fictional edit cases (see the module docstring), identical for identical arguments.

    Args:
        n: number of cases.
        seed: seed of the world and of the cases.
        relations: relations to edit (default: all of :data:`RELATIONS`).
        n_paraphrases: paraphrase probes per case (at most 3).
        n_neighbors: neighbourhood probes per case.
        n_attribute: attribute probes per case (fewer when the world has fewer matching bystanders).

    Case ids are ``"syn<seed>-<i>"``; every case edits a different person.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rels = tuple(relations) if relations is not None else RELATIONS
    bad = [r for r in rels if r not in TEMPLATES]
    if bad or not rels:
        raise ValueError(f"unknown relation(s) {bad}; known: {', '.join(RELATIONS)}")
    rng = random.Random(seed)
    n_bystanders = max(40, n, 4 * n_neighbors)
    world, people = _build_world(rng, n + n_bystanders)
    edited, bystanders = people[:n], people[n:]

    cases = []
    for i, person in enumerate(edited):
        rel = rng.choice(rels)
        subject, old = person["name"], person[rel]
        new = rng.choice([o for o in world.objects(rel) if o != old])
        templates = TEMPLATES[rel]
        t_idx = rng.randrange(len(templates))
        template = templates[t_idx]
        rw = Rewrite(template, subject, new, old)
        others = [t for j, t in enumerate(templates) if j != t_idx]
        paraphrase = [Probe(fill_template(t, subject), new, old)
                      for t in rng.sample(others, min(n_paraphrases, len(others)))]
        pool = [b for b in bystanders if b[rel] != new]
        neighborhood = [Probe(fill_template(template, b["name"]), b[rel], new)
                        for b in rng.sample(pool, min(n_neighbors, len(pool)))]
        same = [b for b in bystanders if b[rel] == new]
        attribute = [Probe(fill_template(template, b["name"]), new, old)
                     for b in rng.sample(same, min(n_attribute, len(same)))]
        other_attr = [Probe(fill_template(TEMPLATES[r][0], subject), person[r], meta={"relation": r})
                      for r in RELATIONS if r != rel]
        generation = [Probe(fill_template(t, subject)) for t in _GENERATION]
        multihop, portability, hop_facts = [], [], []
        for chain, cloze, question in CHAINS[rel]:
            p_new, a_new = world.second_hop(chain, new)
            p_old, a_old = world.second_hop(chain, old)
            hop_facts += [{"prompt": p_new, "target": a_new}, {"prompt": p_old, "target": a_old}]
            foil = a_old if a_old != a_new else None
            group = f"syn{seed}-{i}:{chain}"
            multihop += [Probe(fill_template(question, subject), a_new, foil, meta={"group": group, "phrasing": 0}),
                         Probe(fill_template(cloze, subject), a_new, foil, meta={"group": group, "phrasing": 1})]
            portability.append(Probe(fill_template(cloze, subject), a_new, foil,
                                     meta={"subtype": "one_hop", "chain": chain}))
        probes = {ProbeKind.PARAPHRASE: paraphrase, ProbeKind.NEIGHBORHOOD: neighborhood,
                  ProbeKind.ATTRIBUTE: attribute, ProbeKind.OTHER_ATTRIBUTION: other_attr,
                  ProbeKind.GENERATION: generation, ProbeKind.MULTIHOP: multihop,
                  ProbeKind.PORTABILITY: portability}
        meta: dict[str, Any] = {"source": "synthetic", "seed": seed, "relation": rel}
        if hop_facts:
            meta["hop_facts"] = hop_facts
        cases.append(make_case(f"syn{seed}-{i}", rw, probes, meta=meta))
    return cases


__all__ = ["synthetic_cases", "TEMPLATES", "CHAINS", "RELATIONS"]
