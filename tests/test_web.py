"""The web chat page: config checks, the shared model under concurrency, the /chat API of a real
server subprocess (gradio_client), and a real headless Chromium typing into the page.

    python -m pytest tests/test_web.py -q
    python -m pytest tests/test_web.py -m browser      # only the browser test (needs Debian's chromium)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT, compose

pytest.importorskip("gradio", reason="the web extra is not installed: pip install -e '.[web]'")

MAX_NEW_TOKENS = 12  # short replies keep the tiny model's CPU generation fast
# Greedy for repeatable replies; the random tiny model greedily repeats "\n\n" (an empty reply) unless
# repetition is penalised hard.
GREEDY = {"do_sample": False, "repetition_penalty": 3.0, "max_new_tokens": MAX_NEW_TOKENS}
THINK_TAGS = ("<think>", "</think>")


# The module's server runs with a login on loopback, so the form, the refusal and the API with
# credentials are all tested on 127.0.0.1.
USER, PASSWORD = "ana", "correct-horse-battery"
AUTH = (USER, PASSWORD)


def web_cfg(run_dir, *extra: str):
    return compose([f"run_dir={run_dir}", *extra], config_name="web")


# ---------------------------------------------------------------- without a model

def test_without_gradio_names_the_install_command(monkeypatch, capsys, tmp_path):
    from lyra.errors import exit_on_user_error
    from lyra.web import serve

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        serve(web_cfg(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "lyra: error: the web page needs Gradio: pip install -e '.[web]'\n"


@pytest.mark.parametrize(("override", "line"), [
    ("max_input_chars=0", "max_input_chars: must be an integer >= 1, got 0"),
    ("server_port=70000", "server_port: must be a TCP port (1-65535) or null, got 70000"),
    ("generation.max_new_tokens=2000", "generation.max_new_tokens: 2000 is above max_new_tokens_limit (1024); "
                                       "raise the limit or lower it"),
    ("generation.top_p=1.5", "generation.top_p: must be in (0, 1], got 1.5"),
])
def test_bad_config_is_one_line_before_loading(override, line, tmp_path):
    from lyra.errors import UserError
    from lyra.web import check_web_config

    with pytest.raises(UserError) as error:
        check_web_config(web_cfg(tmp_path / "never-read", override))
    assert str(error.value) == line


def test_busy_port_is_one_line_before_loading(tmp_path):
    from lyra.errors import UserError
    from lyra.web import check_web_config

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(UserError, match=rf"^server_port: cannot listen on 127.0.0.1:{port} \(Address already in use\)"):
            check_web_config(web_cfg(tmp_path, f"server_port={port}"))


def test_page_title_and_gradio_messages():
    from omegaconf import OmegaConf

    from lyra.web import EMPTY_REPLY, page_title, plain_history

    persona = OmegaConf.create({"name": "Nova", "system_prompt": "You are someone else entirely."})
    assert page_title(persona) == "Nova"  # the persona's name, never parsed out of the prompt
    assert page_title(persona, title="Nova v2") == "Nova v2"
    gradio6 = [{"role": "user", "metadata": None, "content": [{"text": "你好", "type": "text"}], "options": None},
               {"role": "assistant", "content": [{"text": "主人", "type": "text"}, {"text": "好", "type": "text"}]},
               {"role": "assistant", "content": "plain"}, {"role": "assistant", "content": EMPTY_REPLY}]
    assert plain_history(gradio6) == [{"role": "user", "content": "你好"},
                                      {"role": "assistant", "content": "主人好"},
                                      {"role": "assistant", "content": "plain"},
                                      {"role": "assistant", "content": ""}]  # the placeholder is not her words


# ---------------------------------------------------------------- the login rule

EXPOSED_LINE = ("auth: server_name=0.0.0.0 serves the page beyond this machine, so it needs a login: set "
                "LYRA_WEB_AUTH=user:password, or give auth_file=FILE (user:password lines) or auth=user:password")


@pytest.mark.parametrize(("overrides", "env", "expected"), [
    (["server_name=0.0.0.0"], {}, EXPOSED_LINE),
    (["share=true"], {}, "auth: share=true puts the page on a public gradio.live link, so it needs a login: set "
                         "LYRA_WEB_AUTH=user:password, or give auth_file=FILE (user:password lines) or auth=user:password"),
    (["server_name=::"], {}, "auth: server_name=:: serves the page beyond this machine"),
    (["auth=ana:short"], {}, "auth: the password of 'ana' is shorter than 8 characters"),
    (["auth=ana"], {}, "auth: must be user:password"),
    (["auth=ana:long-enough-1", "auth_file=users.txt"], {}, "auth: give auth=user:password or auth_file=FILE, not both"),
    (["server_name=0.0.0.0"], {"LYRA_WEB_AUTH": "ana:long-enough-1\nana:long-enough-2"},
     "LYRA_WEB_AUTH line 2: user 'ana' is given twice"),
    (["server_name=0.0.0.0", "auth_file=missing.txt"], {}, "auth_file: no such file: "),
])
def test_an_exposed_page_without_a_valid_login_is_refused(tmp_path, overrides, env, expected):
    from lyra.errors import UserError
    from lyra.web import web_auth

    with pytest.raises(UserError) as error:
        web_auth(web_cfg(tmp_path, *overrides), environ=env)
    assert str(error.value).startswith(expected)
    assert "long-enough" not in str(error.value)  # an error never quotes a password


def test_logins_come_from_the_override_the_file_or_the_environment(tmp_path, monkeypatch):
    from lyra.web import web_auth

    monkeypatch.chdir(tmp_path)  # auth_file resolves against the launch dir
    (tmp_path / "users.txt").write_text("# page users\nana:pass word:with colon\n\nbo:second-password\n")
    (tmp_path / "users.txt").chmod(0o600)
    for loopback in ("127.0.0.1", "localhost", "::1"):  # loopback: a login is optional
        assert web_auth(web_cfg(tmp_path, f"server_name={loopback}"), environ={}) is None
    assert web_auth(web_cfg(tmp_path, "server_name=0.0.0.0", "auth=ana:override-pass"), environ={}) == \
        [("ana", "override-pass")]
    assert web_auth(web_cfg(tmp_path, "share=true", "auth_file=users.txt"), environ={}) == \
        [("ana", "pass word:with colon"), ("bo", "second-password")]
    assert web_auth(web_cfg(tmp_path, "server_name=0.0.0.0"), environ={"LYRA_WEB_AUTH": "cy:env-password"}) == \
        [("cy", "env-password")]


def test_cli_refuses_an_exposed_page_in_one_line_before_loading(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LYRA_WEB_AUTH", None)
    result = subprocess.run([sys.executable, "-m", "lyra.web", f"run_dir={tmp_path / 'never-read'}",
                             "server_name=0.0.0.0", "server_port=null"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"lyra: error: {EXPOSED_LINE}\n"


# ---------------------------------------------------------------- a server subprocess, and the model in process

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path


@pytest.fixture(scope="module")
def server_process(smoke_run, tmp_path_factory):
    """`python -m lyra.web` on a free port, from an empty cwd. It boots while the in-process tests
    run (web_chat asks for it first), so its ~10 s of imports and loading overlap theirs."""
    cwd = tmp_path_factory.mktemp("web-cwd")
    port = free_port()
    log_path = cwd.parent / "web-server.log"
    users = cwd.parent / "web-users.txt"
    users.write_text(f"{USER}:{PASSWORD}\n")
    users.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lyra.web", f"run_dir={smoke_run}", f"server_port={port}", f"auth_file={users}",
             *(f"generation.{key}={value}" for key, value in GREEDY.items())],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Server(process, f"http://127.0.0.1:{port}/", log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert list(cwd.iterdir()) == []  # Hydra and Gradio wrote nothing into the launch dir
    assert PASSWORD not in log_path.read_text()


@pytest.fixture(scope="module")
def web_server(server_process) -> str:
    """The server's URL, once it answers."""
    import urllib.request

    deadline = time.monotonic() + 180
    while True:
        if server_process.process.poll() is not None:
            pytest.fail(f"lyra.web exited with {server_process.process.returncode}:\n{server_process.log.read_text()}")
        try:
            with urllib.request.urlopen(server_process.url, timeout=2) as response:
                if response.status == 200:
                    return server_process.url
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"lyra.web did not serve {server_process.url} within 180 s:\n{server_process.log.read_text()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def web_chat(smoke_run, server_process):
    from lyra.runs import load_run
    from lyra.web import WebChat, check_web_config

    cfg = web_cfg(smoke_run, "server_port=null")
    run = load_run(smoke_run, adapter="adapter", device="cpu")
    return WebChat(run, GREEDY, check_web_config(cfg))


def test_stream_is_the_chat_reply_and_adapter_off_is_the_base(web_chat):
    """Greedy: adapter on = lyra.generation's reply; adapter off = the same model with its LoRA disabled."""
    from lyra.generation import generate_response

    run = web_chat.run
    history = [{"role": "user", "content": "你是誰？"}, {"role": "assistant", "content": "我是萊拉。"}]
    question = "今天天氣如何？"
    steps = list(web_chat.stream(question, history))
    expected = generate_response(question, run.model, run.tokenizer, history, run.system_prompt, **GREEDY)
    assert steps[-1] == expected and expected
    assert all(later.startswith(earlier) for earlier, later in zip(steps, steps[1:]))  # it grows, never rewrites
    assert not any(tag in step for step in steps for tag in THINK_TAGS)

    with run.model.disable_adapter():
        base_reply = generate_response(question, run.model, run.tokenizer, history, run.system_prompt, **GREEDY)
    assert web_chat.reply(question, history, adapter=False) == base_reply
    assert base_reply != expected  # the comparison shows something: the adapter changes the reply
    assert web_chat.reply(question, history) == expected  # the adapter is back on afterwards


def test_concurrent_adapter_on_and_off_do_not_mix(web_chat):
    """Threads asking with and without the adapter at once get exactly their serial replies."""
    prompts = [("你好", True), ("你好", False), ("晚安", True), ("晚安", False)]
    serial = [web_chat.reply(text, adapter=on) for text, on in prompts]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i, t=t, on=on: results.__setitem__(i, web_chat.reply(t, adapter=on)))
               for i, (t, on) in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i] for i in range(len(prompts))] == serial


def test_closing_the_stream_stops_generation_and_frees_the_model(web_chat):
    calls = []
    hook = web_chat.run.model.get_base_model().register_forward_hook(lambda *args: calls.append(1))
    try:
        stream = web_chat.stream("說一個很長的故事", temperature=1.0, max_new_tokens=1024)
        next(stream)
        stream.close()  # what Gradio does on Stop or Reset
        assert web_chat.lock.acquire(timeout=30)
        web_chat.lock.release()
    finally:
        hook.remove()
    assert 0 < len(calls) < 50  # one forward per token: stopped long before 1024


def test_bounds_are_enforced_server_side(web_chat):
    from lyra.errors import UserError

    limit = web_chat.limits.max_input_chars
    with pytest.raises(UserError, match=rf"message: {limit + 1} characters is over the limit of {limit}"):
        next(web_chat.stream("字" * (limit + 1)))
    with pytest.raises(UserError, match=r"max_new_tokens: must be in \[1, 1024\], got 5000"):
        next(web_chat.stream("你好", max_new_tokens=5000))
    with pytest.raises(UserError, match="message: is empty"):
        next(web_chat.stream("   "))


# ---------------------------------------------------------------- the server's API

def test_page_and_api_refuse_without_credentials(web_server):
    import httpx  # gradio_client's own HTTP client
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    for path in ("config", "gradio_api/info"):  # what the page needs to render, and the API's schema
        assert httpx.get(web_server + path, timeout=10).status_code == 401
    call = httpx.post(web_server + "gradio_api/call/chat", json={"data": ["你好", []]}, timeout=10)
    assert call.status_code == 401 and "Not authenticated" in call.text
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(web_server, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(web_server, verbose=False, auth=(USER, "wrong-password"))
    assert Client(web_server, verbose=False, auth=AUTH).view_api(return_format="dict")["named_endpoints"]["/chat"]


def test_api_replies_streams_and_serves_three_at_once(web_server):
    from gradio_client import Client

    client = Client(web_server, verbose=False, auth=AUTH)
    job = client.submit("你好，萊拉！", [], api_name="/chat")
    reply = job.result(timeout=120)
    steps = job.outputs()
    assert reply and reply == steps[-1]
    assert len(steps) > 1 and all(b.startswith(a) for a, b in zip(steps, steps[1:]))  # streamed as it grew
    assert not any(tag in reply for tag in THINK_TAGS)

    history = [{"role": "user", "content": "你好，萊拉！"}, {"role": "assistant", "content": reply}]
    asks = [("我今天有點累", True), ("推薦一本書", True), ("我今天有點累", False)]  # 3 visitors at once
    jobs = [Client(web_server, verbose=False, auth=AUTH).submit(message, history, None, None, None, adapter, api_name="/chat")
            for message, adapter in asks]
    replies = [job.result(timeout=180) for job in jobs]
    assert all(isinstance(r, str) and r and not any(tag in r for tag in THINK_TAGS) for r in replies)
    assert replies[0] != replies[2]  # greedy, same message: adapter on vs. off differ

    with pytest.raises(Exception, match="over the limit of 2000"):
        client.predict("字" * 2001, [], api_name="/chat")


# ---------------------------------------------------------------- a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_or_skip() -> str:
    """Debian's chromium; its absence skips locally but fails in CI, where .ci/run installs it."""
    path = os.environ.get("LYRA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    problem = None
    if path is None:
        problem = "no chromium: apt-get install -y chromium chromium-driver"
    else:
        try:
            import playwright  # noqa: F401
        except ImportError:
            problem = "no playwright: pip install -e '.[dev]'"
    if problem and os.environ.get("CI"):
        pytest.fail(f"browser test cannot run in CI: {problem}")
    if problem:
        pytest.skip(problem)
    return path


@pytest.mark.browser
def test_browser_logs_in_types_a_message_and_gets_streamed_replies(web_server, tmp_path):
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    requested_hosts = set()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requested_hosts.add(request.url.split("/")[2]))
            page.goto(web_server)
            # Gradio's login form first: a wrong password is refused, the right one opens the page
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill("wrong-password")
            page.get_by_role("button", name="Login").click()
            expect(page.get_by_text("Incorrect Credentials")).to_be_visible(timeout=30_000)
            expect(page.locator("#lyra-header")).to_have_count(0)
            page.get_by_label("username").fill(USER)
            page.get_by_label("password").fill(PASSWORD)
            page.get_by_role("button", name="Login").click()
            expect(page.locator("#lyra-header")).to_contain_text("萊拉", timeout=60_000)
            expect(page.locator("#lyra-header")).to_contain_text("LoRA r=8 on q_proj, v_proj")

            page.locator("#lyra-input textarea").fill("你好，萊拉！")
            page.locator("#lyra-send").click()
            bot = page.locator("#lyra-chat [data-testid='bot']")
            expect(bot).to_have_count(1, timeout=60_000)
            expect(bot.first).not_to_have_text("", timeout=60_000)
            expect(page.locator("#lyra-chat [data-testid='user']")).to_have_text("你好，萊拉！")
            expect(page.locator("#lyra-input textarea")).to_have_value("")
            expect(page.locator("#lyra-input textarea")).to_be_editable()  # unlocked once the reply is done

            # the adapter-off comparison: a second pane answers the same message with the base model
            expect(page.locator("#lyra-base-chat")).to_be_hidden()
            page.locator("#lyra-compare input").check()
            expect(page.locator("#lyra-base-chat")).to_be_visible()
            page.locator("#lyra-input textarea").fill("我今天有點累")
            page.locator("#lyra-input textarea").press("Enter")
            expect(bot).to_have_count(2, timeout=60_000)
            base_bot = page.locator("#lyra-base-chat [data-testid='bot']")
            expect(base_bot).to_have_count(1, timeout=60_000)
            expect(base_bot.first).not_to_have_text("", timeout=60_000)
            expect(page.locator("#lyra-base-chat [data-testid='user']")).to_have_text("我今天有點累")
            page.wait_for_timeout(500)  # let the last streamed chunk render
            replies = bot.all_inner_texts() + base_bot.all_inner_texts()
            assert all(reply.strip() for reply in replies)
            assert not any(tag in reply for reply in replies for tag in THINK_TAGS)
            page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
            if os.environ.get("LYRA_WEB_SCREENSHOT"):  # how docs/web_screenshot.png is made
                page.screenshot(path=os.environ["LYRA_WEB_SCREENSHOT"], full_page=True)

            page.locator("#lyra-reset").click()
            expect(page.locator("#lyra-chat [data-testid='bot']")).to_have_count(0)
            expect(base_bot).to_have_count(0)
        finally:
            browser.close()
    assert (tmp_path / "web.png").stat().st_size > 10_000
    assert requested_hosts == {web_server.split("/")[2]}  # the page loads nothing from the internet
