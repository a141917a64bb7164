"""Seeded long-context tasks (RULER's definitions) built to an exact token length for a given tokenizer.

Every prompt is assembled from token ids, not re-tokenized text:

    input_ids = head (chat template start, instruction) + context + tail (question, answer prefix)

so its length is exactly what was asked, and a needle's position is known to the token. The
context is haystack sentences with needles between them (NIAH, passkey, variable tracking) or a
generated list (common / frequent words extraction), cut or padded to the token budget left by
head and tail. Values, keys and the prose starting point depend only on (task, seed): the same
needle is hidden at every length and depth of a sweep.

Tasks (after RULER, arXiv 2404.06654): niah_single, niah_multikey (3 distractor keys),
niah_multivalue (4 values for one key), niah_multiquery (4 keys asked at once), passkey,
vt (variable tracking, one chain of 4 hops), cwe (10 most common words of a list), fwe (3 most
frequent coded words of a Zipf-distributed text).
"""

from __future__ import annotations

import math
import random
import string
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .haystack import common_words, haystack_sentences

_PLACEHOLDER = "\u2063CONTEXT\u2063"  # never produced by a tokenizer round trip of normal text
_NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the numbers afterwards.")


@dataclass(frozen=True)
class Example:
    """One prompt, ready to run: `input_ids` has exactly `length` tokens.

    needle_spans: [start, end) positions in `input_ids` of each inserted needle, the asked one first.
    context_span: [start, end) of the context (haystack + needles) in `input_ids`.
    depth: where the asked needle was meant to go, as a fraction of the context (None for tasks
        without a single asked needle).
    answers: strings the answer must contain (all of them for full marks).
    """

    task: str
    length: int
    depth: float | None
    seed: int
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    needle_spans: tuple[tuple[int, int], ...]
    context_span: tuple[int, int]
    max_new_tokens: int

    def needle_depth(self, i: int = 0) -> float:
        """Measured depth of needle i: haystack tokens before it over all haystack tokens (needles excluded)."""
        start, end = self.context_span
        at = self.needle_spans[i][0]
        needles_before = sum(e - s for s, e in self.needle_spans if e <= at)
        haystack = end - start - sum(e - s for s, e in self.needle_spans)
        return (at - start - needles_before) / max(haystack, 1)


@dataclass(frozen=True)
class _Spec:
    """What a task generator returns before framing: text around the context, and the context recipe."""

    instruction: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    needles: tuple[tuple[str, float], ...] = ()  # (text, depth)
    words: Callable[[object, int, random.Random], list[int]] | None = None  # list tasks build their own context
    max_new_tokens: int = 32


class ContextTooShort(ValueError):
    """The context left by instruction and question cannot hold what the task puts in it.

    `what` names it ("the needles", "the smallest list"); `needed` is how many context tokens it takes.
    """

    def __init__(self, message: str, what: str, needed: int):
        super().__init__(message)
        self.what, self.needed = what, needed


class TaskDoesNotFit(ValueError):
    """`task` does not fit in `length` tokens; `least_length` would do (for this tokenizer, seed and depth)."""

    def __init__(self, message: str, task: str, length: int, least_length: int):
        super().__init__(message)
        self.task, self.length, self.least_length = task, length, least_length


# ---------------------------------------------------------------- tokenization helpers

_SENTENCE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sentence_ids(tokenizer, haystack: str) -> list[list[int]]:
    """Token ids of every haystack sentence, each tokenized with its leading space (cached)."""
    per_tokenizer = _SENTENCE_IDS.setdefault(tokenizer, {})
    if haystack not in per_tokenizer:
        sentences = [" " + s for s in haystack_sentences(haystack)]
        per_tokenizer[haystack] = [list(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    return per_tokenizer[haystack]


def _filler_id(tokenizer) -> int:
    """A token to pad list contexts with (a space, or a newline if a space encodes to nothing)."""
    ids = _encode(tokenizer, " ") or _encode(tokenizer, "\n")
    return ids[-1]


def frame_ids(tokenizer, instruction: str, question: str, answer_prefix: str, chat_template: bool | None = None,
              special_prefix: bool = True) -> tuple[list[int], list[int]]:
    """(head ids, tail ids) around the context.

    With a chat template (used by default when the tokenizer has one) the instruction, context and
    question form one user turn and the answer prefix opens the assistant turn. Without one, the
    head starts with the special tokens the tokenizer adds on its own (e.g. BOS) unless
    `special_prefix` is False (for harnesses that add them themselves).
    """
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template:
        messages = [{"role": "user", "content": f"{instruction}\n{_PLACEHOLDER}\n{question}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, tail = text.split(_PLACEHOLDER)
        return _encode(tokenizer, head), _encode(tokenizer, tail + answer_prefix)
    prefix = list(tokenizer("")["input_ids"]) if special_prefix else []
    return prefix + _encode(tokenizer, instruction + "\n"), _encode(tokenizer, f"\n{question} {answer_prefix}")


# ---------------------------------------------------------------- context builders

def haystack_context(tokenizer, haystack: str, budget: int, needles: list[tuple[list[int], float]],
                     rng: random.Random) -> tuple[list[int], list[tuple[int, int]]]:
    """Exactly `budget` tokens of haystack with needles inserted between sentences.

    Each needle goes to the sentence boundary nearest `depth` of the haystack tokens. Returns the
    ids and each needle's [start, end) within them, in the order of `needles`.
    """
    hay_budget = budget - sum(len(ids) for ids, _ in needles)
    if hay_budget < 0:
        raise ContextTooShort(f"The needles need {budget - hay_budget} tokens but the context has only "
                              f"{max(budget, 0)}; ask for a longer prompt.", "the needles", budget - hay_budget)
    sentences = _sentence_ids(tokenizer, haystack)
    i = rng.randrange(len(sentences)) if haystack != "noise" else 0
    units, filled = [], 0
    while filled < hay_budget:
        ids = sentences[i % len(sentences)][: hay_budget - filled]
        units.append(ids)
        filled += len(ids)
        i += 1
    boundaries = [0]
    for ids in units:
        boundaries.append(boundaries[-1] + len(ids))
    slots: dict[int, list[int]] = {}
    for n, (_, depth) in enumerate(needles):
        target = depth * hay_budget
        slot = min(range(len(boundaries)), key=lambda b: (abs(boundaries[b] - target), b))
        slots.setdefault(slot, []).append(n)
    out: list[int] = []
    spans: list[tuple[int, int] | None] = [None] * len(needles)
    for slot in range(len(units) + 1):
        for n in slots.get(slot, []):
            spans[n] = (len(out), len(out) + len(needles[n][0]))
            out.extend(needles[n][0])
        if slot < len(units):
            out.extend(units[slot])
    return out, spans


def _pad(tokenizer, ids: list[int], budget: int) -> list[int]:
    return ids + [_filler_id(tokenizer)] * (budget - len(ids))


def _fit_list(tokenizer, budget: int, build: Callable[[int], list[str]], guess: int) -> list[int]:
    """The longest list `build(n)` whose entries (tokenized one by one) fit `budget`, padded to it."""
    def ids_for(n: int) -> list[int]:
        entries = build(n)
        return [t for ids in tokenizer(entries, add_special_tokens=False)["input_ids"] for t in ids] if entries else []

    smallest = len(ids_for(0))
    if smallest > budget:
        raise ContextTooShort(f"A context of {max(budget, 0)} tokens cannot hold the smallest list of this task "
                              f"({smallest} tokens); ask for a longer prompt.", "the smallest list", smallest)
    lo, hi = 0, max(1, guess)
    while len(ids_for(hi)) <= budget:  # grow until too long
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(ids_for(mid)) <= budget else (lo, mid)
    return _pad(tokenizer, ids_for(lo), budget)


def _random_key(rng: random.Random) -> str:
    words = common_words()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def _magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _magic_needles(keys, values, depths) -> tuple[tuple[str, float], ...]:
    return tuple((f" One of the special magic numbers for {k} is: {v}.", d)
                 for k, v, d in zip(keys, values, depths, strict=True))


def _other_depths(rng: random.Random, n: int) -> list[float]:
    return [rng.random() for _ in range(n)]


# ---------------------------------------------------------------- the tasks

def _niah_single(rng, depth):
    key, value = _random_key(rng), _magic_number(rng)
    return _Spec(_NIAH_INSTRUCTION, f"What is the special magic number for {key} mentioned in the provided text?",
                 f"The special magic number for {key} mentioned in the provided text is", (value,),
                 ((f" One of the special magic numbers for {key} is: {value}.", depth),), max_new_tokens=16)


def _niah_multikey(rng, depth):
    keys = [_random_key(rng) for _ in range(4)]
    values = [_magic_number(rng) for _ in keys]
    depths = [depth, *_other_depths(rng, 3)]
    needles = _magic_needles(keys, values, depths)
    return _Spec(_NIAH_INSTRUCTION, f"What is the special magic number for {keys[0]} mentioned in the provided text?",
                 f"The special magic number for {keys[0]} mentioned in the provided text is", (values[0],),
                 needles, max_new_tokens=16)


def _niah_multivalue(rng, depth):
    key = _random_key(rng)
    values = [_magic_number(rng) for _ in range(4)]
    depths = [depth, *_other_depths(rng, 3)]
    needles = _magic_needles([key] * 4, values, depths)
    return _Spec(_NIAH_INSTRUCTION,
                 f"What are all the special magic numbers for {key} mentioned in the provided text?",
                 f"The special magic numbers for {key} mentioned in the provided text are", tuple(values),
                 needles, max_new_tokens=48)


def _niah_multiquery(rng, depth):
    keys = [_random_key(rng) for _ in range(4)]
    values = [_magic_number(rng) for _ in keys]
    depths = [depth, *_other_depths(rng, 3)]
    needles = _magic_needles(keys, values, depths)
    asked = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    return _Spec(_NIAH_INSTRUCTION,
                 f"What are all the special magic numbers for {asked} mentioned in the provided text?",
                 f"The special magic numbers for {asked} mentioned in the provided text are", tuple(values),
                 needles, max_new_tokens=48)


def _passkey(rng, depth):
    key = str(rng.randint(10_000, 99_999))
    return _Spec("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.",
                 "What is the pass key?", "The pass key is", (key,),
                 ((f" The pass key is {key}. Remember it. {key} is the pass key.", depth),), max_new_tokens=12)


def _variable_tracking(rng, depth, hops: int = 4):
    names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(hops + 1)]
    value = str(rng.randint(10_000, 99_999))
    chain = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    needles = tuple((text, (i + 0.5) / len(chain)) for i, text in enumerate(chain))
    return _Spec("Memorize and track the chain(s) of variable assignment hidden in the following text.",
                 f"Question: Find all variables that are assigned the value {value} in the text above.",
                 f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
                 f"are assigned the value {value}, they are:", tuple(names), needles, max_new_tokens=40)


def _common_words(rng, depth, num_common: int = 10):
    pool = list(common_words())
    rng.shuffle(pool)
    common, rare = pool[:num_common], pool[num_common:]
    shuffle_seed = rng.random()

    def build(budget_entries: int) -> Callable[[int], list[str]]:
        # RULER: each common word 30 times, each rare word 3 times; short lists scale both down, long
        # ones (more entries than the pool has words) repeat rare words more, keeping common >= 2x rare.
        if budget_entries >= 600:
            freq_rare = max(3, math.ceil(budget_entries / len(rare)))
            freq_common = max(30, 2 * freq_rare)
        else:
            freq_rare, freq_common = 1, max(2, budget_entries // (2 * num_common))

        def entries(n_rare: int) -> list[str]:
            words = common * freq_common + rare[:n_rare] * freq_rare
            random.Random(shuffle_seed + n_rare).shuffle(words)
            return [f" {i}. {w}" for i, w in enumerate(words, 1)]
        return entries

    def context(tokenizer, budget, _rng):
        per_entry = len(_encode(tokenizer, " 123. example"))
        make = build(budget // per_entry)
        return _fit_list(tokenizer, budget, make, guess=max(1, budget // per_entry // 4))

    return _Spec("Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.",
                 f"Question: What are the {num_common} most common words in the above list?",
                 f"Answer: The top {num_common} words that appear most often in the list are:", tuple(common),
                 words=context, max_new_tokens=96)


def _frequent_words(rng, depth, alpha: float = 2.0, top: int = 3):
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6))) for _ in range(400)]
    vocab = list(dict.fromkeys(vocab))  # distinct, in draw order: rank 1 first
    weights = [r ** -alpha for r in range(1, len(vocab) + 1)]
    total_weight = sum(weights)
    shuffle_seed = rng.random()

    def entries(n: int) -> list[str]:
        counts = [int(n * w / total_weight) for w in weights]
        words = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
        random.Random(shuffle_seed + n).shuffle(words)
        return [f" {w}" for w in words]

    def context(tokenizer, budget, _rng):
        return _fit_list(tokenizer, budget, entries, guess=max(1, budget // 8))

    return _Spec("Read the following coded text and track the frequency of each coded word. Find the three most "
                 "frequently appeared coded words.",
                 "Question: Do not provide any explanation. What are the three most frequently appeared words in the "
                 "above coded text?",
                 "Answer: According to the coded text above, the three most frequently appeared words are:",
                 tuple(vocab[:top]), words=context, max_new_tokens=24)


TASKS: dict[str, Callable[[random.Random, float], _Spec]] = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "niah_multiquery": _niah_multiquery,
    "passkey": _passkey,
    "vt": _variable_tracking,
    "cwe": _common_words,
    "fwe": _frequent_words,
}
NIAH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey")
_DEPTH_TASKS = NIAH_TASKS


def make_example(task: str, tokenizer, length: int, depth: float = 0.5, seed: int = 0, haystack: str = "noise",
                 chat_template: bool | None = None, special_prefix: bool = True) -> Example:
    """Build one prompt of exactly `length` tokens; the asked needle sits at `depth` (0 = start, 1 = end).

    Raises TaskDoesNotFit (a ValueError), naming the task, the length and the least length that fits,
    when the task does not fit in `length` tokens with this tokenizer.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1] (0 = start of the context, 1 = end).")
    rng = random.Random(f"{task}:{seed}")
    spec = TASKS[task](rng, depth)
    head, tail = frame_ids(tokenizer, spec.instruction, spec.question, spec.answer_prefix, chat_template,
                           special_prefix)
    framing = len(head) + len(tail)
    budget = length - framing
    try:
        if spec.words is not None:
            context, spans = spec.words(tokenizer, budget, rng), []
        else:
            needles = [(_encode(tokenizer, text), d) for text, d in spec.needles]
            context, spans = haystack_context(tokenizer, haystack, budget, needles, rng)
    except ContextTooShort as err:
        least = framing + err.needed
        raise TaskDoesNotFit(
            f"Task {task} does not fit in length={length} tokens: its instruction and question take {framing} tokens "
            f"with this tokenizer and {err.what} {err.needed} more, so this prompt needs at least {least} tokens.",
            task, length, least) from None
    offset = len(head)
    ids = tuple(head + context + tail)
    assert len(ids) == length, (len(ids), length)  # construction invariant, not a user error
    return Example(task=task, length=length, depth=depth if task in _DEPTH_TASKS else None, seed=seed,
                   input_ids=ids, answers=spec.answers,
                   needle_spans=tuple((offset + s, offset + e) for s, e in spans),
                   context_span=(offset, offset + len(context)), max_new_tokens=spec.max_new_tokens)


def make_examples(tasks, tokenizer, lengths, depths=(0.5,), seeds=(0,), haystack: str = "noise",
                  chat_template: bool | None = None) -> list[Example]:
    """Every (task, length, depth, seed) combination; depth only varies for needle tasks."""
    out = []
    for task in tasks:
        task_depths = depths if task in _DEPTH_TASKS else (0.5,)
        for length in lengths:
            for depth in task_depths:
                for seed in seeds:
                    out.append(make_example(task, tokenizer, length, depth, seed, haystack, chat_template))
    return out
