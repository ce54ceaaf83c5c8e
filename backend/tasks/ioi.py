"""Indirect Object Identification (Wang et al. 2022): "... Mary and John ... John gave a drink to" -> " Mary".

Each template has three name slots: N1 and N2 (the first mention of the pair) and S2 (the second
subject mention). ABBA order puts IO first (N1=IO, N2=S), BABA puts S first (N1=S, N2=IO); S2 is
always S. The answer is " IO", the distractor " S", and the metric logit(IO) - logit(S) always
uses the clean IO and S.

Corruptions:
- "abc": N1, N2 and S2 are replaced by three distinct names C, D, E, all different from IO and S,
  so the corrupted prompt has no repeated name (Wang et al.'s ABC distribution).
- "s2": only S2 is replaced, by a third name C different from IO and S ("S2-swap"); the first
  mention pair is unchanged, so only the repetition that identifies S is broken.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from backend.errors import InvalidParameterError, UserError
from backend.tasks.base import PromptPair, Task, single_token_id

# Wang et al.'s BABA templates with the final IO removed; {N1} {N2} are the first mentions.
TEMPLATES: tuple[str, ...] = (
    "Then, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a lot of fun at the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} were working at the {PLACE}. {S2} decided to give a {OBJECT} to",
    "Then, {N1} and {N2} were thinking about going to the {PLACE}. {S2} wanted to give a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument, and afterwards {S2} said to",
    "After {N1} and {N2} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S2} decided to give the {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "While {N1} and {N2} were commuting to the {PLACE}, {S2} gave a {OBJECT} to",
    "After the lunch, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Afterwards, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument. Afterwards {S2} said to",
    "The {PLACE} {N1} and {N2} went to had a {OBJECT}. {S2} gave it to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S2} gave it to",
)

NAMES: tuple[str, ...] = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas",
    "Anthony", "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven",
    "Thomas", "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany",
    "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany",
    "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen",
    "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul",
    "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis",
    "Lisa", "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie",
    "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine", "Alicia", "Cody", "Allison",
    "Bradley", "Samuel", "George", "Peter",
)

PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)
OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
)

ORDERS: tuple[str, ...] = ("ABBA", "BABA")


class IOITask(Task):
    """IOI prompt pairs; metric logit(IO) - logit(S) at the last position."""

    name = "ioi"
    description = "Indirect object identification (Wang et al.): 15 templates x ABBA/BABA; ABC or S2-swap corruption"
    metric_kind = "logit_diff"

    def __init__(self, corruption: Literal["abc", "s2"] = "abc") -> None:
        if corruption not in ("abc", "s2"):
            raise InvalidParameterError(f"IOI corruption must be 'abc' or 's2', got {corruption!r}")
        self.corruption = corruption

    def names_for(self, tokenizer: Any = None) -> list[str]:
        """The names usable with `tokenizer`: one token with a leading space (all names without one)."""
        names = [n for n in NAMES if tokenizer is None or single_token_id(tokenizer, " " + n) is not None]
        # abc needs IO, S and three replacement names; s2 needs IO, S and one replacement.
        need = 5 if self.corruption == "abc" else 3
        if len(names) < need:
            raise UserError(
                f"IOI ({self.corruption}) needs at least {need} names that are one token for this "
                f"tokenizer; only {len(names)} of {len(NAMES)} are"
            )
        return names

    def generate(self, n: int, seed: int = 0, tokenizer: Any = None) -> list[PromptPair]:
        if n <= 0:
            raise InvalidParameterError(f"the number of prompts must be positive, got {n}")
        names = self.names_for(tokenizer)
        rng = random.Random(seed)
        pairs = []
        for i in range(n):
            t = rng.randrange(len(TEMPLATES))
            order = ORDERS[i % 2]  # alternate so both orders are balanced in any prefix
            io, s, *others = rng.sample(names, 5 if self.corruption == "abc" else 3)
            place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
            n1, n2 = (io, s) if order == "ABBA" else (s, io)
            clean = TEMPLATES[t].format(N1=n1, N2=n2, S2=s, PLACE=place, OBJECT=obj)
            if self.corruption == "abc":
                c, d, e = others
                corrupted = TEMPLATES[t].format(N1=c, N2=d, S2=e, PLACE=place, OBJECT=obj)
            else:
                corrupted = TEMPLATES[t].format(N1=n1, N2=n2, S2=others[0], PLACE=place, OBJECT=obj)
            pairs.append(PromptPair(
                clean=clean,
                corrupted=corrupted,
                answer=" " + io,
                distractors=(" " + s,),
                meta={"template": t, "order": order, "corruption": self.corruption, "io": io, "s": s},
            ))
        return pairs
