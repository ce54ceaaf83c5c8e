"""Text corpora for training transcoders: any directory of .txt/.jsonl files, or the default.

A corpus is a list of documents (strings). `load_corpus(None)` (or "default") returns the
default corpus; `load_corpus(path)` reads a directory (recursively) or a single file:
- `*.txt`: one document per file;
- `*.jsonl`: one document per line, from the field "text" (lines without it are skipped).

The default corpus, and why. It must exist offline on every machine and resemble what PIEscope
studies, so it mixes two sources:
1. English prose about code that ships with every Python: the language reference topics of
   `pydoc_data.topics` (~465k characters) and the docstrings of a fixed list of standard-library
   modules (modules, classes and functions). This is real, varied English with code in it, the
   closest thing to web text that is guaranteed to be installed.
2. Task-like narrative stories written by `story_documents`: short IOI-like scenes (two or three
   people, a place, an object, someone giving something to someone), in many templates, both
   name orders, with and without the final name. The demo circuits are found on IOI-like
   prompts, so the transcoder must reconstruct `mlp_out` well on this distribution; these
   stories put it into the training data without importing the tasks package (whose exact
   templates are *not* copied: the bench measures on prompts the stories only resemble).
By default stories make up ~35% of the characters (`story_share`); held-out documents are split
off deterministically by `split_heldout`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import warnings
from pathlib import Path

from backend.errors import NotFoundError, UserError

DEFAULT = "default"

# Standard-library modules whose docstrings join the default corpus (pure Python, importable
# everywhere, no side effects on import).
STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq",
    "hmac", "html", "http.client", "imaplib", "inspect", "ipaddress", "json", "logging",
    "mailbox", "mimetypes", "numbers", "operator", "optparse", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "zipfile",
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Emma", "Michael",
    "Laura", "Peter", "Kate", "Daniel", "Lisa", "Mark", "Alice", "Robert", "Julia", "Steven",
    "Rachel", "Kevin", "Amy", "Brian", "Jessica", "Richard", "Helen", "George", "Emily", "Jack",
    "Susan", "Frank", "Grace", "Henry", "Lucy", "Adam", "Claire", "Eric", "Nancy", "Victor",
)
PLACES: tuple[str, ...] = (
    "store", "park", "school", "hospital", "station", "garden", "office", "restaurant",
    "library", "beach", "market", "church", "museum", "house", "kitchen", "airport", "bank",
    "river", "farm", "theater",
)
OBJECTS: tuple[str, ...] = (
    "ring", "book", "bone", "basketball", "computer", "drink", "kiss", "necklace", "snack",
    "letter", "bottle", "apple", "hat", "ticket", "flower", "watch", "key", "cake", "pen",
    "bag", "gift", "coin", "phone", "shirt",
)
# {A} and {B} are introduced, {S} acts on {I}; the generator fills S/I with A/B in either order.
STORY_TEMPLATES: tuple[str, ...] = (
    "Then, {A} and {B} went to the {place}. {S} gave a {obj} to {I}.",
    "{A} and {B} spent the morning at the {place}. Later, {S} handed the {obj} to {I}.",
    "When {A} and {B} arrived at the {place}, {S} offered a {obj} to {I}.",
    "After {A} and {B} left the {place}, {S} gave the {obj} back to {I}.",
    "While {A} and {B} were walking to the {place}, {S} showed a {obj} to {I}.",
    "Yesterday {A} met {B} at the {place}. {S} brought a {obj} for {I}.",
    "At the {place}, {A} and {B} found a {obj}. {S} decided to give it to {I}.",
    "{A} and {B} had a long talk at the {place}, and then {S} said goodbye to {I}.",
    "The {place} was busy when {A} and {B} came in. {S} passed the {obj} to {I}.",
    "Later that day, {A} and {B} cleaned the {place}. {S} threw the {obj} to {I}.",
    "{A} called {B} from the {place}. {S} wanted to lend a {obj} to {I}.",
    "Once {A} and {B} reached the {place}, {S} sold the {obj} to {I}.",
)
FILLER: tuple[str, ...] = (
    "It was a quiet afternoon.", "Everyone was tired after the long week.",
    "The weather was cold and grey.", "Nobody expected what happened next.",
    "They had known each other for years.", "The {place} closed at six.",
    "{C} was waiting outside.", "{C} laughed at the whole story.",
    "It rained all day.", "The {obj} was old but still useful.",
)


# ------------------------------------------------------------------------------ stories


def story(rng: random.Random) -> str:
    """One IOI-like scene: a template filled with two (sometimes three) names, a place, an
    object; the giver is either the first- or the second-mentioned person."""
    a, b, c = rng.sample(NAMES, 3)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    s, i = (b, a) if rng.random() < 0.5 else (a, b)
    parts = [rng.choice(STORY_TEMPLATES).format(A=a, B=b, S=s, I=i, place=place, obj=obj)]
    if rng.random() < 0.4:
        filler = rng.choice(FILLER).format(C=c, place=place, obj=obj)
        parts.insert(rng.randrange(2), filler)
    return " ".join(parts)


def story_documents(n_chars: int, seed: int = 0, stories_per_doc: tuple[int, int] = (3, 7)) -> list[str]:
    """Documents of a few stories each (one per line), about `n_chars` characters in all."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < n_chars:
        doc = "\n".join(story(rng) for _ in range(rng.randint(*stories_per_doc)))
        docs.append(doc)
        total += len(doc)
    return docs


# ------------------------------------------------------------------------------ Python docs


def pydoc_topics() -> list[str]:
    """The language reference topics bundled with Python (`pydoc_data.topics`), one per doc."""
    from pydoc_data import topics

    return [text.strip() for _, text in sorted(topics.topics.items()) if text.strip()]


def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """One document per module: its docstring, then its public classes' and functions'."""
    docs = []
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # a module missing from this Python build: skip it
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                with warnings.catch_warnings():  # e.g. typing.io's deprecation on access
                    warnings.simplefilter("ignore")
                    doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if text:
            docs.append(text)
    return docs


def default_corpus(seed: int = 0, story_share: float = 0.35) -> list[str]:
    """Python docs (pydoc topics + stdlib docstrings) mixed with generated stories, shuffled.

    Stories are generated until they make up `story_share` of all characters.
    """
    if not 0.0 <= story_share < 1.0:
        raise UserError(f"story_share must be in [0, 1), got {story_share}")
    docs = pydoc_topics() + stdlib_docstrings()
    doc_chars = sum(len(d) for d in docs)
    story_chars = int(doc_chars * story_share / (1.0 - story_share))
    docs += story_documents(story_chars, seed=seed)
    random.Random(seed).shuffle(docs)
    return docs


# ------------------------------------------------------------------------------ reading


def read_corpus(path: str | Path) -> list[str]:
    """Documents from a .txt/.jsonl file or a directory of them (recursively, sorted by path)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise NotFoundError(f"corpus not found: {root}")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    docs: list[str] = []
    for file in files:
        if file.suffix == ".txt":
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                docs.append(text)
        elif file.suffix == ".jsonl":
            for n, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{file}:{n}: not valid JSON ({exc})") from exc
                text = row.get("text") if isinstance(row, dict) else None
                if isinstance(text, str) and text.strip():
                    docs.append(text.strip())
        else:
            raise UserError(f"corpus files must be .txt or .jsonl, not {file.name}")
    if not docs:
        raise UserError(f"corpus {root} holds no text (expected .txt files or .jsonl with a 'text' field)")
    return docs


def load_corpus(spec: str | Path | None = None, seed: int = 0) -> list[str]:
    """The default corpus (`None` or "default") or the documents under a path."""
    if spec is None or str(spec) == DEFAULT:
        return default_corpus(seed=seed)
    return read_corpus(spec)


def split_heldout(docs: list[str], every: int = 20) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th document (from the 0th) is held out.

    Deterministic, so a bench or a resumed run sees the same split. A corpus of one document
    is split in the middle instead.
    """
    if every < 2:
        raise UserError(f"held-out split needs every >= 2, got {every}")
    if len(docs) == 1:
        text = docs[0]
        cut = len(text) * (every - 1) // every
        return [text[:cut]], [text[cut:]]
    held = [d for i, d in enumerate(docs) if i % every == 0]
    train = [d for i, d in enumerate(docs) if i % every != 0]
    return train, held
