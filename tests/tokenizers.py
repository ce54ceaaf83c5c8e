"""A tiny word-level tokenizer for tests (no downloads), covering every word the tasks use.

Special ids match `tests.tiny_models`: <pad>=0, <bos>=1, <eos>=2, <unk>=3. Text is split on
whitespace, every punctuation character is its own token, and numbers are split into two-digit
tokens ("1732" -> "17", "32"; digits="pairs") or single digits (digits="digits"). A <bos> is
prepended to every encoded text. Unknown words become <unk>. Use `len(tok)` (or
`vocab_size(...)`) as the vocab size of a tiny model that goes with it.
"""

from __future__ import annotations

from typing import Iterable, Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from backend.tasks import docstring, greater_than, ioi

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")


def _pre_tokenizer(digits: Literal["pairs", "digits"]) -> pre_tokenizers.PreTokenizer:
    number_split = (pre_tokenizers.Digits(individual_digits=True) if digits == "digits"
                    else pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"))
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(), number_split])


def task_corpus() -> list[str]:
    """Every template, name and word the built-in tasks can put in a prompt."""
    return [
        *ioi.TEMPLATES, *ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS,
        docstring.TEMPLATE, *docstring.WORDS, *docstring.DESCRIPTION_WORDS,
        greater_than.TEMPLATE, *greater_than.NOUNS,
    ]


def tiny_vocab(extra_words: Iterable[str] = (), digits: Literal["pairs", "digits"] = "pairs",
               include_task_words: bool = True) -> list[str]:
    """Specials, then the pre-tokenised words of the task corpus and `extra_words`, then numbers."""
    pre = _pre_tokenizer(digits)
    texts = [*(task_corpus() if include_task_words else []), *extra_words]
    numbers = [str(i) for i in range(10)]
    if digits == "pairs":
        numbers += [f"{i:02d}" for i in range(100)]
    vocab = dict.fromkeys(SPECIALS)
    for text in texts:
        vocab.update(dict.fromkeys(piece for piece, _ in pre.pre_tokenize_str(text)))
    vocab.update(dict.fromkeys(numbers))
    return list(vocab)


def vocab_size(extra_words: Iterable[str] = (), digits: Literal["pairs", "digits"] = "pairs",
               include_task_words: bool = True) -> int:
    return len(tiny_vocab(extra_words, digits, include_task_words))


def tiny_tokenizer(extra_words: Iterable[str] = (), digits: Literal["pairs", "digits"] = "pairs",
                   include_task_words: bool = True) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `tiny_vocab(...)` with <bos> prepended; see the module docstring."""
    words = tiny_vocab(extra_words, digits, include_task_words)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer(digits)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", words.index("<bos>"))])
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
