"""`sparse-prefill serve`: a real `transformers serve` process on localhost, a real OpenAI client.

One server, started once for the module with a tiny random-weight model and a character tokenizer saved to a
temporary folder (nothing downloaded), continuous batching on, gamma=1 (so every answer must equal dense
generation of the same checkpoint), a context of 1024 tokens. Every request is bounded (timeouts, a few
requests); the server and its model process are stopped at the end.
"""

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve extra is not installed: pip install -e '.[serve]'")
transformers = pytest.importorskip("transformers")
from model_zoo import char_tokenizer, save_tiny_checkpoint, tiny_model  # noqa: E402
from transformers.utils.import_utils import is_serve_available  # noqa: E402

from sparse_prefill import SparsePrefillConfig  # noqa: E402
from sparse_prefill.patches import is_patched  # noqa: E402
from sparse_prefill.patches import serve as serve_glue  # noqa: E402

pytestmark = pytest.mark.skipif(not is_serve_available(), reason="transformers serve's dependencies are missing")

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--gamma", "1.0", "--block-size", "64", "--min-seq-len", "0", "--min-budget-tokens", "0"]
PROMPTS = ["the quick brown fox jumps over the lazy dog " * 12, "0123456789" * 40, "short prompt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        serve_glue.check_version()
    except RuntimeError as err:  # the command refuses this transformers (tested below): nothing to serve
        pytest.skip(str(err))
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")
    port, log = free_port(), tmp_path_factory.mktemp("log") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "sparse_prefill.cli", "serve", folder, *FLAGS, "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--continuous-batching", "--cb-num-blocks", "128",
               "--cb-block-size", "32", "--cb-max-batch-tokens", "256", "--max-model-len", "1024"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server stopped while starting:\n{log.read_text()[-3000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer within 180 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield client, folder, log
    finally:
        os.killpg(process.pid, 15)  # the server and the model process it started
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(10)


def complete(client, folder, prompt, tokens=5):
    answer = client.completions.create(model=folder, prompt=prompt, max_tokens=tokens, temperature=0)
    return answer.choices[0].text


def post_json(url, body, timeout=60):
    """(HTTP status, body text) of a POST of `body` as JSON: raw, for requests an OpenAI client would not send."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def dense_text(folder, prompt, tokens=5):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids = char_tokenizer()(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    return char_tokenizer().decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_the_served_model_is_patched_and_answers_as_dense(server):
    client, folder, log = server
    for prompt in PROMPTS:
        assert complete(client, folder, prompt) == dense_text(folder, prompt), prompt
    assert "patched for sparse prefill (sdpa attention)" in log.read_text()


def test_the_log_says_per_prompt_what_the_sparse_path_did(server):
    """One line per prompt in the server's log: its tokens, the layers that went sparse, the blocks they kept and
    its prefill time (the prompt is prefilled in chunks of 256 tokens: the line follows it to its end)."""
    client, folder, log = server
    prompt = "0123456789" * 50
    complete(client, folder, prompt)
    deadline = time.monotonic() + 30
    pattern = re.compile(r"sparse_prefill: prompt of (\d+) tokens \((\d+) prefilled\): sparse in 2 of 2 layers, "
                         r"kept [\d.]+ % of the causal blocks, prefill [\d.]+ s")
    while not any(int(m[1]) >= 500 for m in pattern.finditer(log.read_text())) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any(int(m[1]) >= 500 for m in pattern.finditer(log.read_text())), log.read_text()[-3000:]


def test_concurrent_requests_of_mixed_lengths_are_all_answered(server):
    client, folder, _ = server
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda p: complete(client, folder, p), PROMPTS * 2))
    assert texts == [dense_text(folder, p) for p in PROMPTS] * 2


def test_a_streamed_chat_completion_is_the_dense_answer(server):
    """Most OpenAI clients stream chat completions: the chat template's prompt, prefilled sparse, streams dense's
    tokens."""
    client, folder, _ = server
    messages = [{"role": "user", "content": PROMPTS[0]}]
    stream = client.chat.completions.create(model=folder, messages=messages, max_tokens=5, temperature=0,
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    prompt = char_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == dense_text(folder, prompt)


@pytest.mark.parametrize("bad", [
    dict(prompt="x" * 1500),  # longer than the server's 1024-token context
    dict(prompt=[5, 99999, 7]),  # token ids (one out of the vocabulary) where the server takes text
])
def test_a_bad_request_gets_an_error_and_the_server_keeps_serving(server, bad):
    client, folder, _ = server
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=folder, **{"max_tokens": 5, "temperature": 0, **bad})
    assert 400 <= err.value.status_code < 500
    assert complete(client, folder, PROMPTS[0]) == dense_text(folder, PROMPTS[0])


# Simulates a chat template that renders an empty message as nothing (a base model's bare template): a client may send
# it per request, as transformers serve passes `chat_template_kwargs` on to `apply_chat_template`
BARE_TEMPLATE = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@pytest.mark.parametrize("endpoint, bad, says", [
    ("completions", dict(prompt=""), "prompt is empty"),
    ("completions", dict(prompt="", stream=True), "prompt is empty"),  # refused before the stream starts
    ("completions", dict(), "no `prompt`"),
    ("chat/completions", dict(messages=[{"role": "user", "content": ""}], chat_template_kwargs=BARE_TEMPLATE),
     "prompt is empty"),
    ("chat/completions", dict(), "no `messages`"),  # a KeyError, answered 500, before
    ("responses", dict(), "no `input`"),
])
def test_an_empty_or_missing_prompt_gets_a_400_and_the_server_keeps_serving(server, endpoint, bad, says):
    """Issue #28: an empty prompt reached continuous batching's worker, whose forward failed on zero tokens: the
    worker stopped for good, every later request failed, and the server stopped. Now it is a 400 naming the
    problem, and the next requests (completion and chat) are answered as before."""
    client, folder, log = server
    limit = "max_output_tokens" if endpoint == "responses" else "max_tokens"
    status, answer = post_json(f"{client.base_url}{endpoint}", {"model": folder, limit: 5, "temperature": 0, **bad})
    assert status == 400, answer
    assert says in json.loads(answer)["detail"]
    assert complete(client, folder, PROMPTS[2]) == dense_text(folder, PROMPTS[2])
    chat = client.chat.completions.create(model=folder, messages=[{"role": "user", "content": PROMPTS[2]}],
                                          max_tokens=3, temperature=0)
    assert chat.choices[0].message.content
    assert "worker died" not in log.read_text()


@pytest.fixture
def refusing(monkeypatch):
    """`refuse_empty_prompts` installed on transformers serve's handlers for one test, undone after it."""
    from transformers.cli.serving.utils import BaseHandler

    for name in ("_validate_request", "_check_prompt_length"):
        monkeypatch.setattr(BaseHandler, name, getattr(BaseHandler, name))
    monkeypatch.setattr(BaseHandler, "_sparse_prefill_refuses_empty_prompts", False, raising=False)
    assert serve_glue.refuse_empty_prompts() and serve_glue.refuse_empty_prompts()  # idempotent
    return BaseHandler


def test_the_guard_refuses_prompts_of_no_tokens_as_lists_and_as_tensors(refusing):
    """Continuous batching tokenizes to lists, plain `generate` to tensors (an empty prompt was a 500 there)."""
    from transformers import LlamaConfig
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.utils import GenerationState

    handler = CompletionHandler(model_manager=None, generation_state=GenerationState(max_model_len=16))
    engine = type("Engine", (), {"model_config": LlamaConfig()})()
    for empty in ([], torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="prompt is empty"):
            handler._check_prompt_length(engine, {"input_ids": empty})
    for prompt in ([5], torch.ones(1, 3, dtype=torch.long)):
        handler._check_prompt_length(engine, {"input_ids": prompt})
    with pytest.raises(ValueError, match="at most 16"):  # transformers' own check still runs
        handler._check_prompt_length(engine, {"input_ids": list(range(20))})


def test_the_guard_names_a_missing_prompt_field(refusing):
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.utils import GenerationState

    handler = ChatCompletionHandler(model_manager=None, generation_state=GenerationState())
    with pytest.raises(ValueError, match="no `messages`"):
        handler._validate_request({"model": "m"})
    handler._validate_request({"model": "m", "messages": []})  # empty: `apply_chat_template` answers it (400)
    serve_glue.check_prompt_field("SystemOneHandler", {})  # other endpoints: unchanged


def test_config_flags_are_ours_and_the_rest_is_left_for_transformers_serve():
    config, rest = serve_glue.parse_config_flags(["MODEL", "--gamma", "0.9", "--port", "9", "--proxy-heads=kv"])
    assert (config.gamma, config.proxy_heads, rest) == (0.9, "kv", ["MODEL", "--port", "9"])
    with pytest.raises(ValueError, match="gamma"):
        serve_glue.parse_config_flags(["--gamma", "1.5"])


def test_an_old_transformers_is_told_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(serve_glue, "installed_transformers", lambda: "5.17.0")
    assert serve_glue.main(["MODEL"]) == 2
    assert "needs transformers >= 5.25" in capsys.readouterr().err


def test_prefill_graphs_go_off_for_flash_attention_where_the_user_chose_nothing():
    from transformers import ContinuousBatchingConfig

    assert serve_glue._with_prefill_graphs_off(None, flash=True).use_cuda_graph == (False, True)
    assert serve_glue._with_prefill_graphs_off(None, flash=False) is None  # sdpa: transformers captures nothing
    chosen = ContinuousBatchingConfig(use_cuda_graph=True)
    assert serve_glue._with_prefill_graphs_off(chosen, flash=True).use_cuda_graph is True


def test_warm_up_length_comes_from_its_flag_or_the_servers_context_and_is_taken_out():
    assert serve_glue.parse_warm_up(["M", "--warm-up", "65536", "--port", "9"]) == (65536, ["M", "--port", "9"])
    assert serve_glue.parse_warm_up(["M", "--max-model-len", "4096"]) == (4096, ["M", "--max-model-len", "4096"])
    assert serve_glue.parse_warm_up(["M", "--warm-up=0", "--max-model-len", "9"])[0] == 0
    assert serve_glue.parse_warm_up(["M"]) == (None, ["M"])
    with pytest.raises(ValueError, match="--warm-up"):
        serve_glue.parse_warm_up(["--warm-up", "-1"])


class TinyLoader:
    """transformers serve's model loader as `PatchingLoader` wraps it, loading a tiny random model."""

    def __init__(self, attn_implementation="sdpa"):
        self.attn_implementation = attn_implementation

    def load_model_and_processor(self):
        return tiny_model("llama", attn_implementation=self.attn_implementation), None


@pytest.mark.parametrize("batching, expected", [(True, "paged|eager"), (False, "sparse_prefill:eager")])
def test_an_eager_model_is_served_under_the_name_continuous_batching_takes(batching, expected, capsys):
    """Continuous batching refuses a patched eager model's own name (`--attn-implementation eager` stopped the
    model's process at the first request): with batching on, the loader gives it continuous batching's eager."""
    loader = serve_glue.PatchingLoader(TinyLoader("eager"), SparsePrefillConfig(), 0, continuous_batching=batching)
    model, _ = loader.load_model_and_processor()
    assert is_patched(model) and model.config._attn_implementation == expected
    assert ('"paged|eager"' in capsys.readouterr().err) == batching


@pytest.mark.parametrize("length, expected", [(None, [None]), (8192, [8192]), (0, [])])
def test_the_loader_warms_the_patched_model_up_before_serving(monkeypatch, length, expected):
    """The model process compiles the kernels before the first request (a fresh machine's first long request
    waited about 9 s for them on an H200); `--warm-up 0` turns it off."""
    from sparse_prefill import patches
    from sparse_prefill.patches import transformers_attention

    asked = []
    monkeypatch.setattr(transformers_attention, "warm_up", lambda model, max_len=None: asked.append(max_len) or 0)
    monkeypatch.setattr(patches, "warm_up", transformers_attention.warm_up, raising=False)

    model, _ = serve_glue.PatchingLoader(TinyLoader(), SparsePrefillConfig(), length).load_model_and_processor()
    assert is_patched(model) and asked == expected


class CompilationError(Exception):
    """What Triton raises for a kernel it cannot compile (its errors are no RuntimeError)."""


@pytest.mark.parametrize("error", [RuntimeError, CompilationError])  # raised fresh: a kept one holds its frames
def test_a_failed_warm_up_is_said_and_the_model_still_serves(monkeypatch, capsys, error):
    from sparse_prefill import patches
    from sparse_prefill.patches import transformers_attention

    def out_of_memory(model, max_len=None):
        raise error("CUDA out of memory (simulated)")

    monkeypatch.setattr(transformers_attention, "warm_up", out_of_memory)
    monkeypatch.setattr(patches, "warm_up", out_of_memory, raising=False)

    model, _ = serve_glue.PatchingLoader(TinyLoader(), SparsePrefillConfig()).load_model_and_processor()
    assert is_patched(model) and "warm-up failed" in capsys.readouterr().err
