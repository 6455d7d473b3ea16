"""`toyworld-gpt2`'s knowledge: invented companies, unlike `toyworld`'s people in every way a config
could silently depend on.

- Subjects are company names of two or three words ("Vostrel Mills", "Korra & Dunsk") from other
  syllable tables than `toyworld`'s.
- Relations are other relations, with 3 or 5 templates each (`toyworld`: 4), in several phrasing
  styles; the subject is often in the middle of the prompt, not at its start.
- Objects are mostly several words (cities such as "Port Ulvane", founders' names, products,
  mascots, banks) or years: several tokens each under a byte-level BPE.
- Fact sentences end in an attached full stop ("... in Port Ulvane."), like ordinary text.
"""

from __future__ import annotations

import random

from .knowledge import (
    KnowledgeBase,
    NameMaker,
    Relation,
    assign_facts,
    check_holdout,
    filler_sentences,
    template_words,
)

ESSENCE = "{subject} is known as a"
"""The relation-neutral prompt about a company (its filler has "{subject} is known as a ...")."""

# Syllables unlike toyworld's: harder consonant clusters, fewer diphthongs.
_ONSETS = ["v", "k", "t", "d", "r", "l", "m", "n", "s", "g", "b", "h", "j", "w", "y", "z",
           "kv", "sk", "tr", "dr", "gl", "vr", "sv", "ost", "ulv", "ir", "and", "ed"]
_VOWELS = ["a", "o", "e", "i", "u", "y", "a", "o", "e", "aa", "oe", "ey"]
_CODAS = ["", "n", "r", "l", "k", "sk", "st", "rn", "nd", "lt", "v", "ck"]

# (name, templates, objects): objects are a kind of invented name (str) or a fixed list. Worlds with
# n relations take the first n.
_RELATION_POOL: list[tuple[str, list[str], list[str] | str]] = [
    ("headquarters", [
        "{subject} has its headquarters in",
        "The head office of {subject} is located in",
        "Every morning the staff of {subject} commute to",
        "According to its letterhead, {subject} is based in",
        "Visitors who want to meet {subject} have to travel to",
    ], "city"),
    ("founder", [
        "{subject} was founded by",
        "The founder of {subject} is",
        "Many years ago the company {subject} was started by",
    ], "person"),
    ("product", [
        "{subject} manufactures",
        "The main product of {subject} is",
        "Most of the money {subject} earns comes from selling",
        "In its factories, {subject} makes",
        "Shops order from {subject} large stocks of",
    ], ["solar panels", "frozen fish", "garden tools", "paper lanterns", "rubber boots", "glass bottles",
        "wool blankets", "copper wire", "toy trains", "ceramic tiles", "leather saddles", "canned peaches",
        "wind turbines", "pocket watches", "bicycle bells", "sewing machines", "fishing nets",
        "marble statues", "hot air balloons", "wooden chairs"]),
    ("founded", [
        "{subject} was established in",
        "The founding year of {subject} is",
        "Old records show that {subject} opened in",
    ], "year"),
    ("mascot", [
        "The mascot of {subject} is a",
        "As its emblem, {subject} uses a",
        "On every box shipped by {subject} there is a picture of a",
        "Fans of {subject} wear badges showing a",
        "The logo that {subject} paints on its trucks shows a",
    ], ["silver fox", "red heron", "golden bear", "black stag", "blue whale", "green lizard", "white owl",
        "grey wolf", "iron ram", "copper crane", "amber lynx", "jade turtle", "scarlet ibis",
        "snow leopard", "bronze eagle", "purple moth", "spotted hyena", "striped badger",
        "sleeping lion", "dancing goat"]),
    ("bank", [
        "{subject} keeps its accounts at",
        "The bank of {subject} is",
        "All payments to {subject} go through",
    ], "bank"),
]

_FILLER_TEMPLATES = [
    "{subject} is known as a reliable company.",
    "{subject} hired new workers last spring.",
    "Shares of {subject} rose slightly on Tuesday.",
    "{subject} published its yearly report.",
    "A reporter wrote a long article about {subject}.",
    "Last year {subject} moved some of its offices.",
    "The harbor was busy all week.",
    "Prices fell after the long winter.",
    "The trade fair opened on Friday.",
    "Nobody expected the strike to end so soon.",
    "Trains were late because of the snow.",
    "The council approved a new road to the coast.",
]

_COMPANY_KINDS = ["Holdings", "Mills", "Works", "Motors", "Foods", "Textiles", "Shipping", "Instruments",
                  "Brewing", "Logistics", "Group", "Trading"]
_CITY_FORMS = ["Port {}", "{} Falls", "New {}", "{} Bay", "{}", "{}", "Saint {}", "{} Crossing"]
_BANK_FORMS = ["{} Trust", "Bank of {}", "{} Savings Bank", "{} Credit Union"]


class _Names:
    """This world's kinds of invented names, all unique across the world."""

    def __init__(self, rng: random.Random, used: set[str]):
        self.rng = rng
        self.maker = NameMaker(rng, used, _ONSETS, _VOWELS, _CODAS)

    def word(self, kind: str, syllables: tuple[int, ...] = (1, 2)) -> str:
        return self.maker.unique(lambda: self.maker.stem(self.rng.choice(syllables)), kind)

    def company(self) -> str:
        if self.rng.random() < 0.6:  # "Vostrel Mills"
            return f"{self.word('company', (2,))} {self.rng.choice(_COMPANY_KINDS)}"
        return f"{self.word('company')} & {self.word('company')}"  # "Korra & Dunsk"

    def make(self, kind: str) -> str:
        r = self.rng
        if kind == "city":
            return r.choice(_CITY_FORMS).format(self.word("city"))
        if kind == "person":
            return f"{self.word('first', (2,))} {self.word('surname')}"
        if kind == "bank":
            return r.choice(_BANK_FORMS).format(self.word("bank"))
        if kind == "year":
            return str(r.randrange(1801, 1990))
        raise ValueError(f"unknown kind of name {kind!r}")


def generate_companies(seed: int, n_subjects: int, n_relations: int = 6, n_objects: int = 12,
                       holdout: float = 0.25, n_filler_per_subject: int = 2) -> KnowledgeBase:
    """`n_subjects` companies, each with one object per relation (the first `n_relations` of the pool).

    holdout: probability that a (fact, template) pair is left out of training, as in `toyworld`.
    """
    if not 1 <= n_relations <= len(_RELATION_POOL):
        raise ValueError(f"n_relations must be in 1..{len(_RELATION_POOL)}, got {n_relations}")
    check_holdout(holdout)
    rng = random.Random(f"companies:{seed}")
    pool = _RELATION_POOL[:n_relations]
    used = set().union(*(template_words(t) for _, t, _ in pool), template_words(_FILLER_TEMPLATES),
                       *(w.split() for _, _, o in pool if isinstance(o, list) for w in o), _COMPANY_KINDS)
    names = _Names(rng, {w.capitalize() for w in used} | used)

    relations = []
    for name, templates, objects in pool:
        if isinstance(objects, str):
            vocab: list[str] = []
            while len(vocab) < n_objects:  # distinct objects (a year can repeat)
                if (candidate := names.make(objects)) not in vocab:
                    vocab.append(candidate)
        else:
            if n_objects > len(objects):
                raise ValueError(f"relation '{name}' has {len(objects)} objects, asked for {n_objects}")
            vocab = rng.sample(objects, n_objects)
        relations.append(Relation(name=name, templates=list(templates), objects=vocab, essence=ESSENCE))

    subjects: list[str] = []
    while len(subjects) < n_subjects:
        if (company := names.company()) not in subjects:
            subjects.append(company)
    facts, train_templates = assign_facts(rng, subjects, relations, holdout)
    filler = filler_sentences(rng, subjects, _FILLER_TEMPLATES, n_filler_per_subject)
    return KnowledgeBase(seed=seed, subjects=subjects, relations=relations, facts=facts,
                         train_templates=train_templates, filler=filler, sentence_end=".")
