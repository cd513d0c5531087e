"""lyra.serve: the OpenAI-compatible server, tested as users meet it: a real `python -m lyra.serve`
subprocess on a free loopback port serving the smoke run, driven by the official `openai` client and by
raw httpx requests shaped like SillyTavern's; plus the pure request -> prompt/settings mapping."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lyra.errors import USER_ERROR_EXIT_CODE
from lyra.serve import APIError, StopCutter, generation_settings, prompt_messages

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789abcdef"
MAX_BODY_BYTES = 20_000
MAX_MESSAGE_CHARS = 4_000
BAD_TEXT = ("<think>", "</think>", "<|im_end|>", "<|im_start|>", "<|endoftext|>")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "LYRA_API_KEY"}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **extra)
    return env


class Server:
    """`python -m lyra.serve` in a subprocess; stderr goes to a file the tests read."""

    def __init__(self, run_dir: Path, log_path: Path, *overrides: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lyra.serve", f"run_dir={run_dir}", f"port={self.port}", *overrides],
            cwd=REPO_ROOT, env=env or server_env(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.log()}"
            try:
                if httpx.get(f"{self.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise AssertionError(f"server did not start in time: {self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


@pytest.fixture(scope="module")
def server(smoke_run, tmp_path_factory):
    # queue_size=1: one request generating, one waiting; a burst of more gets 429
    server = Server(smoke_run, tmp_path_factory.mktemp("serve") / "server.log", "queue_size=1", "retry_after_s=3",
                    f"max_body_bytes={MAX_BODY_BYTES}", f"max_message_chars={MAX_MESSAGE_CHARS}",
                    "max_tokens_limit=1024", "generation.max_new_tokens=32")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def persona(smoke_run):
    from lyra.runs import load_run_config, run_persona

    return run_persona(load_run_config(smoke_run), smoke_run)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def clean(text: str) -> None:
    assert not any(tag in text for tag in BAD_TEXT), text


# ---------------------------------------------------------------- the openai client

def test_models_lists_the_persona_and_its_base(client, persona):
    assert [model.id for model in client.models.list().data] == [persona.name, f"{persona.name}-base"]


def test_openai_non_stream_reply_with_usage_and_the_persona_prompt(client, persona, smoke_run):
    from transformers import AutoTokenizer

    from lyra.data.tokenization import chat_prompt_ids

    reply = client.chat.completions.create(model=persona.name, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=8, temperature=0)
    choice = reply.choices[0]
    clean(choice.message.content)
    assert choice.finish_reason in ("stop", "length") and reply.model == persona.name
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # system_prompt=run: the persona's prompt went in, since the client sent none
    tokenizer = AutoTokenizer.from_pretrained(smoke_run / "adapter")
    expected = chat_prompt_ids([{"role": "system", "content": persona.system_prompt},
                                {"role": "user", "content": "Hello!"}], tokenizer)
    assert reply.usage.prompt_tokens == len(expected)


def test_openai_stream_equals_non_stream_and_ends_with_usage(client, persona):
    messages = [{"role": "user", "content": "Tell me about tea."}]
    sampled = dict(model=persona.name, messages=messages, max_tokens=12, temperature=1, seed=7)
    whole = client.chat.completions.create(**sampled)
    chunks = list(client.chat.completions.create(**sampled, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    clean(text)
    assert text and text == whole.choices[0].message.content  # one seeded generation path, streamed or not
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_base_model_answers_with_the_adapter_off(client, persona):
    # seeded sampling, not greedy: the smoke run's greedy reply to this is blank lines, adapter on or off
    sampled = dict(messages=[{"role": "user", "content": "Hello!"}], max_tokens=16, temperature=1, seed=7)
    tuned = client.chat.completions.create(model=persona.name, **sampled)
    again = client.chat.completions.create(model=persona.name, **sampled)
    base = client.chat.completions.create(model=f"{persona.name}-base", **sampled)
    assert base.model == f"{persona.name}-base"
    assert tuned.choices[0].message.content == again.choices[0].message.content  # the seed is honoured
    assert base.choices[0].message.content != tuned.choices[0].message.content


def test_stop_string_cuts_the_reply(client, persona):
    messages = [{"role": "user", "content": "Count for me."}]
    full = client.chat.completions.create(model=persona.name, messages=messages, max_tokens=24, temperature=1, seed=3)
    text = full.choices[0].message.content
    assert len(text) > 8, text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    for stream in (False, True):
        kwargs = dict(model=persona.name, messages=messages, max_tokens=24, temperature=1, seed=3,
                      stop=[stop, "\nUser:"])
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            cut = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            reply = client.chat.completions.create(**kwargs)
            cut, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert cut == text[:text.find(stop)] and finish == "stop", (stream, stop, cut)


def test_openai_shaped_refusals(client, persona):
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=persona.name, messages=[{"role": "user", "content": "x"}], n=2)
    assert error.value.body["param"] == "n" and "n=1" in error.value.body["message"]
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=persona.name, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5000)
    assert error.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as error:  # before any tokenization
        client.chat.completions.create(model=persona.name,
                                       messages=[{"role": "user", "content": "y" * (MAX_MESSAGE_CHARS + 1)}])
    assert error.value.body["code"] == "message_too_long"


# ---------------------------------------------------------------- SillyTavern's request

def sillytavern_body(stream: bool) -> dict:
    """The body SillyTavern's Chat Completion source "Custom" sends with a card (its defaults: both
    penalties, top_p 1, explicit stream, stop strings, an empty logit_bias), as in /work/shared/design.md."""
    return {
        "messages": [
            {"role": "system", "content": "Write Lyra's next reply in a fictional chat between Lyra and Master."},
            {"role": "system", "content": "Lyra is a gentle, cheerful maid who serves tea."},
            {"role": "system", "content": "Lyra's personality: kind, polite, a little shy."},
            {"role": "system", "content": "Circumstances and context of the dialogue: a quiet morning."},
            {"role": "system", "content": "[Example Chat]"},
            {"role": "system", "name": "example_user", "content": "Good morning!"},
            {"role": "system", "name": "example_assistant", "content": "Good morning, Master! Tea is ready."},
            {"role": "system", "content": "[Start a new Chat]"},
            {"role": "assistant", "content": "Welcome home, Master! Shall I bring you some tea?"},
            {"role": "user", "content": "Yes please, Lyra."},
        ],
        "model": "ignored-by-the-test",
        "temperature": 1, "max_tokens": 20, "stream": stream, "presence_penalty": 0.7, "frequency_penalty": 0.7,
        "top_p": 1, "stop": ["\nMaster:", "\nUser:"], "logit_bias": {}, "include_reasoning": False,
    }


@pytest.mark.parametrize("stream", [True, False])
def test_sillytavern_shaped_request_is_answered_and_stops(server, persona, stream):
    body = sillytavern_body(stream) | {"model": persona.name}
    headers = {"Authorization": "Bearer undefined", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(body), headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    if not stream:
        choice = response.json()["choices"][0]
        clean(choice["message"]["content"])
        assert choice["finish_reason"] in ("stop", "length") and response.json()["usage"]["completion_tokens"] <= 20
        return
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]" and all(line.startswith("data: ") for line in response.text.split("\n\n") if line)
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(isinstance(chunk["choices"], list) for chunk in chunks)  # SillyTavern reads choices of every chunk
    clean("".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]["total_tokens"] > 0
    assert "ignoring request field 'include_reasoning'" in server.log()


def test_sillytavern_messages_become_one_system_message_with_the_example_dialogue():
    messages = sillytavern_body(False)["messages"]
    prompt = prompt_messages(messages, "run", "PERSONA", "You: ", "Lyra: ")
    assert prompt.system == "\n\n".join([
        "Write Lyra's next reply in a fictional chat between Lyra and Master.",
        "Lyra is a gentle, cheerful maid who serves tea.", "Lyra's personality: kind, polite, a little shy.",
        "Circumstances and context of the dialogue: a quiet morning.", "[Example Chat]",
        "Example dialogue:\nYou: Good morning!\nLyra: Good morning, Master! Tea is ready.", "[Start a new Chat]"])
    assert prompt.history == [{"role": "assistant", "content": "Welcome home, Master! Shall I bring you some tea?"}]
    assert prompt.prompt_text == "Yes please, Lyra."
    assert prompt.notes["example_messages"] == 2 and prompt.notes["persona_prompt_inserted"] == 0


def test_system_prompt_modes_and_message_placement():
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "system", "content": "note 1"}, {"role": "system", "content": "note 2"},
            {"role": "user", "content": "c"}, {"role": "system", "content": "post-history"}]
    run = prompt_messages(chat, "run", "PERSONA")
    assert run.system == "PERSONA" and run.notes["persona_prompt_inserted"] == 1
    # the post-history instruction moves before the user's last message, next to the notes: one system turn
    assert run.history == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "system", "content": "note 1\n\nnote 2\n\npost-history"}]
    assert run.prompt_text == "c" and run.notes["trailing_system_moved"] == 1
    card = [{"role": "system", "content": "CARD"}, {"role": "user", "content": "hi"}]
    assert prompt_messages(card, "run", "PERSONA").system == "CARD"
    assert prompt_messages(card, "client", "PERSONA").system == "CARD"
    assert prompt_messages(card, "merge", "PERSONA").system == "PERSONA\n\nCARD"
    assert prompt_messages(card[1:], "client", "PERSONA").system is None
    with pytest.raises(APIError, match="prefill"):
        prompt_messages([*card, {"role": "assistant", "content": "Sure"}], "run", "PERSONA")


def test_request_settings_map_to_generation_config():
    defaults = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256}
    greedy = generation_settings({"temperature": 0, "max_completion_tokens": 9, "max_tokens": 50}, defaults, 100)
    assert greedy["do_sample"] is False and greedy["max_new_tokens"] == 9
    assert generation_settings({"top_k": 5, "repetition_penalty": 1.2}, defaults, 100)["top_k"] == 5
    for bad in ({"temperature": 3}, {"top_p": 0}, {"max_tokens": 0}, {"temperature": "hot"}):
        with pytest.raises(APIError):
            generation_settings(bad, defaults, 100)


def test_stop_cutter_holds_back_a_possible_stop_string():
    cutter = StopCutter(["\nUser:"])
    assert cutter.feed("Hello") == "Hello"
    assert cutter.feed(" there\nUs") == " there"  # "\nUs" may begin the stop string
    assert cutter.feed("ually") == "\nUsually"
    assert cutter.feed("!\nUser: hi") == "!" and cutter.stopped and cutter.feed("more") == ""


def test_openai_penalties_lower_the_repeated_tokens():
    import torch

    from lyra.engines import openai_penalties

    scores = torch.zeros(1, 5)
    penalised = openai_penalties(0.5, 1.0, prompt_length=2)(torch.tensor([[3, 3, 1, 1, 2]]), scores)
    # the prompt's two 3s are not counted; in the reply, token 1 twice and token 2 once
    assert penalised.tolist() == [[0.0, -2.5, -1.5, 0.0, 0.0]]


# ---------------------------------------------------------------- limits, queue, disconnect

def test_oversized_body_is_refused_with_413(server):
    url = f"{server.url}/v1/chat/completions"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]})
    response = httpx.post(url, content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the cap applies as the body arrives
        for _ in range(MAX_BODY_BYTES // 1000 + 2):
            yield b"x" * 1000

    response = httpx.post(url, content=chunked(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_burst_past_the_queue_gets_429_and_the_server_stays_up(server, persona):
    results: list[httpx.Response] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()
        results.append(httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": persona.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}))

    threads = [threading.Thread(target=one) for _ in range(8)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert time.monotonic() - start < 180
    statuses = sorted(response.status_code for response in results)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1 and set(statuses) <= {200, 429}, statuses
    refused = next(response for response in results if response.status_code == 429)
    assert refused.headers["Retry-After"] == "3" and refused.json()["error"]["code"] == "queue_full"
    assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_client_disconnect_frees_the_model(server, persona):
    body = {"model": persona.name, "messages": [{"role": "user", "content": "Talk."}], "max_tokens": 1024,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: generation has its turn
        next(lines)
    start = time.monotonic()  # hung up after the first chunks of a 1024-token reply
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": persona.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    waited = time.monotonic() - start
    log = server.log()
    assert "client disconnected: generation stopped" in log and "generation stopped early" in log, log
    assert waited < 60, waited


# ---------------------------------------------------------------- keys

def test_non_loopback_bind_without_a_key_exits_2_in_one_line(smoke_run):
    result = subprocess.run([sys.executable, "-m", "lyra.serve", f"run_dir={smoke_run}", "host=0.0.0.0"],
                            cwd=REPO_ROOT, env=server_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("lyra: error: host: 0.0.0.0") and "LYRA_API_KEY" in result.stderr


def test_api_key_is_required_and_never_logged(smoke_run, tmp_path, persona):
    from openai import AuthenticationError, OpenAI

    server = Server(smoke_run, tmp_path / "server.log", "generation.max_new_tokens=4", env=server_env(LYRA_API_KEY=KEY))
    try:
        for headers in ({}, {"Authorization": "Bearer undefined"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": KEY}):
            response = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-123", max_retries=0).models.list()
        good = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        reply = good.chat.completions.create(model=persona.name, messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens <= 4
    finally:
        server.stop()
    assert "API key required" in server.log() and KEY not in server.log()


def test_a_registered_key_is_scrubbed_from_logs():
    from lyra import secrets

    key = "cli-given-key-0123456789"
    secrets.register_secret(key)
    try:
        assert secrets.scrub_text(f"api_key={key}") == "api_key=***"
    finally:
        secrets._registered.discard(key)


# ---------------------------------------------------------------- load

def test_bounded_load_keeps_memory_flat(server):
    """20 concurrent clients, 60 requests, each client pausing 1 s after a 429 (scripts/load_test.py does
    100 / 500 by hand): every request is served or refused with 429, none fails, and the server's RSS
    grows less than 32 MiB. Why 32 MiB: a served reply's logits are 151,936 floats (0.6 MB) per token on
    the tiny Qwen3, so a reply state kept per request (8 tokens: ~5 MB) crosses it within the ~8 replies
    this run serves, while a refused request costs no model memory and allocator warm-up stays a few MB."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "load_test.py"), "--url", server.url,
                             "--clients", "20", "--requests", "60", "--max-tokens", "8", "--time-cap", "240", "--pause", "1",
                             "--pid", str(server.process.pid)], capture_output=True, text=True, timeout=300,
                            env=server_env())
    report = json.loads(result.stdout)
    print("load test:", json.dumps({key: value for key, value in report.items() if key != "failures"}))
    assert report["failed"] == 0, report["failures"]
    assert report["served"] + report["refused"] + report["not_sent"] == 60 and report["served"] >= 4
    assert report["rss_growth_bytes"] < 32 * 2**20
