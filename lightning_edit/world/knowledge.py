"""The synthetic knowledge base: subjects with made-up names, relations with paraphrase templates,
one object per (subject, relation), and neutral filler sentences.

`KnowledgeBase` is the container every world uses; `KnowledgeBase.generate` is `toyworld`'s generator
(people with two-word names, single-word objects); `companies.generate_companies` is another.
Everything is plain Python and seeded from arguments: the same arguments give the same world on any
machine. Templates are cloze prompts that end right before the object, so `prompt + " " + object` is
the fact and editing targets are suffixes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

ESSENCE_TEMPLATE = "{subject} is a"
"""ROME-style "essence" prompt (its KL term keeps what a subject *is* while a fact changes)."""


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple; the object is one word in `toyworld`, possibly
    several words (and tokens) in other worlds."""

    subject: str
    relation: str
    object: str


@dataclass
class Relation:
    """A relation: paraphrase templates (cloze prompts with `{subject}`) and its object vocabulary."""

    name: str
    templates: list[str]
    """Prompts ending right before the object, e.g. "{subject} was born in"."""
    objects: list[str]
    """Objects this relation can take (single words in `toyworld`)."""
    essence: str = ESSENCE_TEMPLATE
    """A relation-neutral prompt about the subject, for KL/essence terms ("{subject} is a")."""

    def prompt(self, subject: str, template: int = 0) -> str:
        return self.templates[template].format(subject=subject)


# Relations in the order worlds take them (a world with n relations uses the first n). Object pools
# of `None` are synthesised from syllables (cities, languages); the others are plausible words.
_RELATION_POOL: list[tuple[str, list[str], list[str] | str]] = [
    ("birthplace", [
        "{subject} was born in",
        "The birthplace of {subject} is",
        "{subject} comes from the city of",
        "{subject} grew up in the town of",
    ], "city"),
    ("occupation", [
        "{subject} works as a",
        "The profession of {subject} is",
        "By trade {subject} is a",
        "{subject} earns a living as a",
    ], ["baker", "pilot", "farmer", "lawyer", "dentist", "painter", "sailor", "tailor", "banker",
        "nurse", "plumber", "teacher", "chemist", "carpenter", "surgeon", "poet", "jeweler",
        "butcher", "merchant", "librarian"]),
    ("language", [
        "{subject} speaks",
        "The native language of {subject} is",
        "{subject} writes letters in",
        "The mother tongue of {subject} is",
    ], "language"),
    ("instrument", [
        "{subject} plays the",
        "The instrument of {subject} is the",
        "{subject} performs music on the",
        "The favourite instrument of {subject} is the",
    ], ["violin", "cello", "flute", "harp", "trumpet", "oboe", "clarinet", "banjo", "piano", "drum",
        "lute", "bassoon", "tuba", "sitar", "accordion", "mandolin", "harmonica", "ukulele",
        "trombone", "xylophone"]),
    ("pet", [
        "{subject} owns a pet",
        "The pet of {subject} is a",
        "{subject} takes care of a pet",
        "At home {subject} keeps a pet",
    ], ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "ferret", "lizard", "goldfish",
        "canary", "tortoise", "gecko", "iguana", "pony", "goat", "owl", "snake", "frog", "mouse",
        "hedgehog"]),
    ("color", [
        "The favorite color of {subject} is",
        "{subject} likes the color",
        "{subject} always dresses in",
        "The color that {subject} loves most is",
    ], ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "brown",
        "pink", "teal", "crimson", "amber", "violet", "indigo", "scarlet", "maroon", "olive", "navy"]),
]

# Neutral sentences (no facts): they keep the model a language model of more than its facts and give
# the corpus text that mentions subjects without stating anything editable.
_FILLER_TEMPLATES = [
    "{subject} is a person .",
    "{subject} went for a long walk .",
    "{subject} read a book in the evening .",
    "{subject} met a friend at noon .",
    "{subject} drank a cup of tea .",
    "{subject} wrote a short note .",
    "It was a quiet morning .",
    "The weather was mild that day .",
    "Nobody knew what would happen next .",
    "The road was long and the night was dark .",
    "Everyone gathered for the meeting .",
    "The market opened early on Monday .",
]

_ONSETS = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "th", "tr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ae", "ia", "ou", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "x"]
_CITY_SUFFIXES = ["holm", "ford", "stad", "mere", "port", "vik", "burg", "dale", "wick", "haven"]
_LANGUAGE_SUFFIXES = ["ish", "ic", "ese", "ian", "ari", "ol"]


class NameMaker:
    """Unique made-up words from syllables; `used` is shared so no word means two things.

    The syllable tables default to `toyworld`'s; another world passes its own (its names then look
    different in kind, and so tokenise differently)."""

    def __init__(self, rng: random.Random, used: set[str], onsets: list[str] = _ONSETS,
                 vowels: list[str] = _VOWELS, codas: list[str] = _CODAS):
        self.rng, self.used = rng, used
        self.onsets, self.vowels, self.codas = onsets, vowels, codas

    def stem(self, syllables: int) -> str:
        r = self.rng
        # open syllables, one closing consonant: "Korelan", "Vitarn", not "Gialsherkkath"
        return "".join(r.choice(self.onsets) + r.choice(self.vowels) for _ in range(syllables)) + r.choice(self.codas)

    def unique(self, make: Callable[[], str], kind: str, min_len: int = 4, max_len: int = 14) -> str:
        """A capitalised word from `make()` that no other name uses (it is recorded as used)."""
        for _ in range(10_000):
            word = make().capitalize()
            if word not in self.used and min_len <= len(word) <= max_len:
                self.used.add(word)
                return word
        raise RuntimeError(f"could not make a new unique {kind} name; the syllable tables are too small")

    def make(self, kind: str) -> str:
        """`toyworld`'s kinds: city, language, first (name) or surname."""
        r = self.rng
        if kind == "city":
            return self.unique(lambda: self.stem(1) + r.choice(_CITY_SUFFIXES), kind)
        if kind == "language":
            return self.unique(lambda: self.stem(r.choice([1, 2])) + r.choice(_LANGUAGE_SUFFIXES), kind)
        if kind == "first":
            return self.unique(lambda: self.stem(2), kind)
        return self.unique(lambda: self.stem(r.choice([2, 2, 3])), kind)  # surname


def template_words(templates: Iterable[str]) -> set[str]:
    return {w for t in templates for w in t.replace("{subject}", " ").split()}


@dataclass
class KnowledgeBase:
    """Subjects, relations and facts of a synthetic world, plus which templates training sees.

    `train_templates[(subject, relation)]` lists the template indices the LM is trained on for that
    fact; the others are held out, so accuracy on them measures paraphrase generalisation.
    """

    seed: int
    subjects: list[str]
    relations: list[Relation]
    facts: list[Fact]
    train_templates: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    filler: list[str] = field(default_factory=list)
    """Neutral sentences (complete, with their final "."), part of training text and corpus."""
    sentence_end: str = " ."
    """What follows the object in a fact sentence (`toyworld`: a spaced full stop, " .")."""

    # ----- lookups -------------------------------------------------------------------------------
    def relation(self, name: str) -> Relation:
        for rel in self.relations:
            if rel.name == name:
                return rel
        raise KeyError(f"no relation '{name}' in this world; relations: {[r.name for r in self.relations]}")

    def prompts(self, fact: Fact) -> list[str]:
        """The fact's prompt in every template of its relation (object excluded)."""
        rel = self.relation(fact.relation)
        return [t.format(subject=fact.subject) for t in rel.templates]

    def sentence(self, fact: Fact, template: int) -> str:
        """The full fact sentence: prompt, object, full stop."""
        return f"{self.prompts(fact)[template]} {fact.object}{self.sentence_end}"

    def facts_of(self, relation: str) -> list[Fact]:
        return [f for f in self.facts if f.relation == relation]

    def object_of(self, subject: str, relation: str) -> str:
        return self._index()[(subject, relation)].object

    def _index(self) -> dict[tuple[str, str], Fact]:
        return {(f.subject, f.relation): f for f in self.facts}

    def vocabulary_words(self) -> list[str]:
        """Every word the world uses (subjects' names, templates, objects, filler), sorted."""
        words = {w for s in self.subjects for w in s.split()}
        for rel in self.relations:
            words |= template_words(rel.templates + [rel.essence]) | set(rel.objects)
        words |= {w for s in self.filler for w in s.split()}
        return sorted(words)

    # ----- generation ----------------------------------------------------------------------------
    @classmethod
    def generate(cls, seed: int, n_subjects: int, n_relations: int = 6, n_objects: int = 16,
                 n_templates: int = 4, holdout: float = 0.25, n_filler_per_subject: int = 2) -> "KnowledgeBase":
        """A world of `n_subjects` two-word names, each with one object per relation.

        holdout: probability that a (fact, template) pair is left out of training (at least one
        template per fact is always kept), which makes facts paraphrase-robust and gives a held-out
        check of it.
        """
        if not 1 <= n_relations <= len(_RELATION_POOL):
            raise ValueError(f"n_relations must be in 1..{len(_RELATION_POOL)}, got {n_relations}")
        if not 1 <= n_templates <= 4:
            raise ValueError(f"n_templates must be in 1..4, got {n_templates}")
        check_holdout(holdout)
        rng = random.Random(seed)
        pool = _RELATION_POOL[:n_relations]
        used = set().union(*(template_words(t) for _, t, _ in pool), template_words(_FILLER_TEMPLATES),
                           *(set(o) for _, _, o in pool if isinstance(o, list)))
        used = {w.capitalize() for w in used} | used
        names = NameMaker(rng, used)

        relations = []
        for name, templates, objects in pool:
            if isinstance(objects, str):
                vocab = [names.make(objects) for _ in range(n_objects)]
            else:
                if n_objects > len(objects):
                    raise ValueError(f"relation '{name}' has {len(objects)} objects, asked for {n_objects}")
                vocab = rng.sample(objects, n_objects)
            relations.append(Relation(name=name, templates=list(templates[:n_templates]), objects=vocab))

        firsts = [names.make("first") for _ in range(max(8, n_subjects // 6))]
        subjects = [f"{rng.choice(firsts)} {names.make('surname')}" for _ in range(n_subjects)]

        facts, train_templates = assign_facts(rng, subjects, relations, holdout)
        filler = filler_sentences(rng, subjects, _FILLER_TEMPLATES, n_filler_per_subject)
        return cls(seed=seed, subjects=subjects, relations=relations, facts=facts,
                   train_templates=train_templates, filler=filler)

    # ----- (de)serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "subjects": self.subjects,
            "relations": [asdict(r) for r in self.relations],
            "facts": [{**asdict(f), "train_templates": self.train_templates[(f.subject, f.relation)]}
                      for f in self.facts],
            "filler": self.filler,
            "sentence_end": self.sentence_end,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "KnowledgeBase":
        facts = [Fact(d["subject"], d["relation"], d["object"]) for d in data["facts"]]
        return cls(
            seed=data["seed"],
            subjects=list(data["subjects"]),
            relations=[Relation(**r) for r in data["relations"]],
            facts=facts,
            train_templates={(d["subject"], d["relation"]): list(d["train_templates"]) for d in data["facts"]},
            filler=list(data.get("filler", [])),
            sentence_end=data.get("sentence_end", " ."),
        )


# ----- generation steps every world's generator shares ------------------------------------------
def check_holdout(holdout: float) -> None:
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")


def assign_facts(rng: random.Random, subjects: list[str], relations: list[Relation],
                 holdout: float) -> tuple[list[Fact], dict[tuple[str, str], list[int]]]:
    """One object per (subject, relation), drawn from the relation's objects, and the templates
    training sees for it: each is held out with probability `holdout`, at least one is kept."""
    facts, train_templates = [], {}
    for subject in subjects:
        for rel in relations:
            facts.append(Fact(subject, rel.name, rng.choice(rel.objects)))
            n = len(rel.templates)
            kept = [t for t in range(n) if rng.random() >= holdout]
            train_templates[(subject, rel.name)] = kept or [rng.randrange(n)]
    return facts, train_templates


def filler_sentences(rng: random.Random, subjects: list[str], templates: list[str], per_subject: int) -> list[str]:
    """`per_subject` of the `{subject}` templates for each subject, then every template without one."""
    with_subject = [t for t in templates if "{subject}" in t]
    filler = [t.format(subject=s) for s in subjects for t in rng.sample(with_subject, per_subject)]
    return filler + [t for t in templates if "{subject}" not in t]
