"""Task generators: exact token lengths, needles at the asked depth, answers that are right, seeds."""

import re
from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sparse_prefill.eval.archs import byte_tokenizer
from sparse_prefill.eval.haystack import prose_sentences
from sparse_prefill.eval.tasks import NIAH_TASKS, TASKS, TaskDoesNotFit, make_example, make_examples

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE trained on the prose haystack: multi-byte tokens, like real tokenizers."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(prose_sentences()[:800], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    return tok


@pytest.fixture(scope="module", params=["bytes", "bpe", "bpe+chat"])
def tokenizer(request, bpe_tokenizer):
    if request.param == "bytes":
        return byte_tokenizer()
    if request.param == "bpe":
        return bpe_tokenizer
    chat = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend_tokenizer, bos_token="<s>",
                                   eos_token="</s>")
    chat.chat_template = CHAT_TEMPLATE
    return chat


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [700, 1501])
def test_every_task_hits_the_exact_length(tokenizer, task, length):
    ex = make_example(task, tokenizer, length, depth=0.3, seed=2, haystack="prose")
    assert len(ex.input_ids) == length == ex.length
    start, end = ex.context_span
    assert 0 < start < end < length


@pytest.mark.parametrize("task", NIAH_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_asked_needle_sits_at_the_asked_depth_and_holds_the_answer(tokenizer, task, depth):
    ex = make_example(task, tokenizer, 3000, depth=depth, seed=1, haystack="noise")
    start, end = ex.context_span
    # Needles go between sentences: the error is at most one sentence of noise (< 10 tokens on bytes... 25).
    longest_sentence = 25 if tokenizer is byte_tokenizer() else 10
    assert abs(ex.needle_depth(0) - depth) <= longest_sentence / (end - start)
    s, e = ex.needle_spans[0]
    needle = tokenizer.decode(ex.input_ids[s:e])
    assert ex.answers[0] in needle and start <= s < e <= end


def test_depth_zero_and_one_put_the_needle_at_the_context_edges():
    tok = byte_tokenizer()
    first = make_example("passkey", tok, 1000, depth=0.0)
    last = make_example("passkey", tok, 1000, depth=1.0)
    assert first.needle_spans[0][0] == first.context_span[0]
    assert last.needle_spans[0][1] == last.context_span[1]


def test_multi_needle_tasks_hide_every_value_and_ask_for_the_right_ones():
    tok = byte_tokenizer()
    multikey = make_example("niah_multikey", tok, 2000, seed=3)
    multivalue = make_example("niah_multivalue", tok, 2000, seed=3)
    multiquery = make_example("niah_multiquery", tok, 2000, seed=3)
    assert len(multikey.needle_spans) == 4 and len(multikey.answers) == 1
    assert len(multivalue.needle_spans) == 4 and len(multivalue.answers) == 4
    assert len(multiquery.needle_spans) == 4 and len(multiquery.answers) == 4
    for ex in (multikey, multivalue, multiquery):
        needles = [tok.decode(ex.input_ids[s:e]) for s, e in ex.needle_spans]
        assert all(a in n for a, n in zip(ex.answers, needles, strict=False))
    keys = {re.search(r"for (\S+) is", tok.decode(multikey.input_ids[s:e])).group(1) for s, e in multikey.needle_spans}
    assert len(keys) == 4  # distractors have other keys
    prompt_tail = tok.decode(multiquery.input_ids[multiquery.context_span[1]:])
    for s, e in multiquery.needle_spans:  # every key is asked
        assert re.search(r"for (\S+) is", tok.decode(multiquery.input_ids[s:e])).group(1) in prompt_tail


def test_variable_tracking_chain_is_in_order_and_complete():
    tok = byte_tokenizer()
    ex = make_example("vt", tok, 2500, seed=5)
    text = tok.decode(ex.input_ids)
    names = ex.answers
    value = re.search(rf"VAR {names[0]} = (\d+)\.", text).group(1)
    for prev, name in zip(names, names[1:], strict=False):
        assert f"VAR {name} = VAR {prev}." in text
    assert text.index(f"VAR {names[0]} = {value}") < text.index(f"VAR {names[-1]} = VAR")
    assert f"assigned the value {value}" in text[ex.context_span[1]:] or value in tok.decode(
        ex.input_ids[ex.context_span[1]:])


def _context_words(tok, ex):
    s, e = ex.context_span
    return tok.decode(ex.input_ids[s:e])


def test_common_words_answers_are_the_most_common_words_of_the_list():
    tok = byte_tokenizer()
    ex = make_example("cwe", tok, 6000, seed=7)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", _context_words(tok, ex)))
    top = [w for w, _ in counts.most_common(len(ex.answers))]
    assert set(top) == set(ex.answers)
    assert min(counts[w] for w in ex.answers) > max(c for w, c in counts.items() if w not in ex.answers)


def test_frequent_words_answers_are_the_three_most_frequent_coded_words():
    tok = byte_tokenizer()
    ex = make_example("fwe", tok, 4000, seed=7)
    counts = Counter(_context_words(tok, ex).split())
    assert [w for w, _ in counts.most_common(3)] == list(ex.answers)


def test_examples_are_seeded():
    tok = byte_tokenizer()
    a = make_example("niah_single", tok, 900, depth=0.4, seed=11, haystack="prose")
    b = make_example("niah_single", tok, 900, depth=0.4, seed=11, haystack="prose")
    c = make_example("niah_single", tok, 900, depth=0.4, seed=12, haystack="prose")
    assert a == b
    assert a.answers != c.answers
    # the same seed hides the same needle at every length and depth
    assert make_example("niah_single", tok, 1800, depth=0.9, seed=11).answers == a.answers


def test_chat_template_frames_the_prompt_and_ends_with_the_answer_prefix(bpe_tokenizer):
    chat = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="</s>")
    chat.chat_template = CHAT_TEMPLATE
    ex = make_example("passkey", chat, 800)
    text = chat.decode(ex.input_ids)
    assert text.startswith("<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\nThe pass key is")
    plain = make_example("passkey", chat, 800, chat_template=False)
    assert "<|im_start|>" not in chat.decode(plain.input_ids)


def test_make_examples_covers_the_grid_and_depth_only_for_needle_tasks():
    tok = byte_tokenizer()
    examples = make_examples(["passkey", "cwe"], tok, [600, 900], depths=(0.1, 0.9), seeds=(0, 1))
    assert len(examples) == 2 * 2 * 2 + 2 * 1 * 2
    assert {ex.depth for ex in examples if ex.task == "cwe"} == {None}


def test_bad_requests_raise_value_errors_that_say_why():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="niah_single does not fit in length=50 .* instruction and question take"):
        make_example("niah_single", tok, 50)
    with pytest.raises(ValueError, match="cwe does not fit in length=420 .* the smallest list"):
        make_example("cwe", tok, 420)
    with pytest.raises(ValueError, match="vt does not fit in length=400 .* the needles"):
        make_example("vt", tok, 400)
    with pytest.raises(ValueError, match="Unknown task"):
        make_example("needle", tok, 500)
    with pytest.raises(ValueError, match="depth"):
        make_example("passkey", tok, 500, depth=1.5)
    with pytest.raises(ValueError, match="haystack"):
        make_example("passkey", tok, 500, haystack="essays")


@pytest.mark.parametrize("task, length", [("niah_multikey", 512), ("niah_multiquery", 600), ("cwe", 300),
                                          ("vt", 350), ("fwe", 100), ("passkey", 10)])
def test_a_task_that_does_not_fit_names_itself_its_length_and_the_least_length_that_fits(task, length):
    tok = byte_tokenizer()
    with pytest.raises(TaskDoesNotFit) as err:
        make_example(task, tok, length)
    least = err.value.least_length
    assert (err.value.task, err.value.length) == (task, length) and least > length
    assert f"Task {task} does not fit in length={length} tokens" in str(err.value)
    assert f"needs at least {least} tokens" in str(err.value)
    assert len(make_example(task, tok, least).input_ids) == least  # the least length is exact: it fits
    with pytest.raises(TaskDoesNotFit):
        make_example(task, tok, least - 1)
