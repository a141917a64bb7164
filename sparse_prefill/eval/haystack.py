"""Haystack text that ships with Python, cut into sentences, and the word lists tasks draw from.

Two haystacks, as in RULER: `noise`, one short paragraph of filler sentences repeated (the model
cannot mistake it for content), and `prose`, the English of Python's own documentation
(`pydoc_data.topics`, about 120K tokens, in every CPython install). Nothing is downloaded.

Text is kept as sentences, each starting with a space, so that the token ids of sentences
tokenized one by one concatenate into what the tokenizer would produce for the joined text (for
byte-level BPE tokenizers, whose words carry their leading space), and a needle can be placed
between any two of them.
"""

from __future__ import annotations

import re
from functools import cache

HAYSTACKS = ("noise", "prose")

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
_MAX_WORDS = 48  # longer sentences are cut, so that a needle lands near the depth asked for


@cache
def prose_sentences() -> tuple[str, ...]:
    """Sentences of `pydoc_data.topics`, in a fixed order, cleaned of headings and code blocks."""
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = paragraph.splitlines()
            if not lines or lines[0].startswith((" ", "\t", ">>>")) or re.fullmatch(r"[*=\-]+", lines[-1].strip()):
                continue  # code samples and section headings
            text = " ".join(line.strip() for line in lines)
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                words = sentence.split()
                for i in range(0, len(words), _MAX_WORDS):
                    sentences.append(" ".join(words[i:i + _MAX_WORDS]))
    return tuple(s for s in sentences if s)


def haystack_sentences(kind: str) -> tuple[str, ...]:
    """The repeating unit of haystack `kind` ("noise" or "prose")."""
    if kind == "noise":
        return NOISE
    if kind == "prose":
        return prose_sentences()
    raise ValueError(f"Unknown haystack {kind!r}; choose one of: {', '.join(HAYSTACKS)}.")


@cache
def common_words() -> tuple[str, ...]:
    """Distinct lower-case English words (4-10 letters) from `pydoc_data.topics`, sorted.

    The word pool for needle keys and for the words-extraction tasks.
    """
    from pydoc_data.topics import topics

    words = set()
    for text in topics.values():
        words.update(w for w in re.findall(r"\b[a-z]{4,10}\b", text))
    return tuple(sorted(words))
