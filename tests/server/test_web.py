"""The web chat page (GET /), in a real headless Chromium driven by Playwright, against the real
server app and engine: the scripted engine of scripted.py, so that the tiny random model says what
a test needs (V3.2 thinking, tool calls, a crash). Each test checks what the page shows against an
oracle: the script's text, the /v1/models card, the V3.2 encoder, the server's own error message.

Set DSV32_WEB_SCREENSHOTS=docs/web to write the screenshots of docs/web.md there (they are taken on
every run, into a temporary folder otherwise).
"""

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from scripted import MODEL, ScriptedRunner, Server, engine_args, script, scripted_engine, tiny_chatml_dir, tiny_v32_dir

from dsv32.chat import EOS, encode_completion, encode_messages
from dsv32.server import load_engine

sync_api = pytest.importorskip("playwright.sync_api", reason="the web-page tests drive Chromium with playwright")
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)
if CHROMIUM is None:
    pytest.skip("no Chromium (/usr/bin/chromium or chromium on PATH) to run the web-page tests in",
                allow_module_level=True)
# The system browser, headless; without the background-networking flags it keeps trying to reach
# Google's services, which on a closed network floods it with failing requests.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1000, "height": 700}

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    # a longer context than the tiny preset's 1024: with its 512-token vocabulary, the tools section
    # and a tool round trip take about 1100 tokens
    path = tiny_v32_dir(tmp_path_factory.mktemp("tiny-v32"), max_position_embeddings=4096)
    engine, tok = scripted_engine(path, max_num_seqs=1)
    server = Server(engine, tok)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    engine, tok = load_engine(engine_args(tiny_chatml_dir(tmp_path_factory.mktemp("chatml")), max_num_seqs=1))
    engine.runner.__class__ = ScriptedRunner  # the same engine, the model's choice replaced by a script
    server = Server(engine, tok)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where screenshots go; each is checked to be a PNG well under 1 MB."""
    folder = Path(os.environ.get("DSV32_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)

    def shoot(page, name):
        path = folder / f"{name}.png"
        page.screenshot(path=path, animations="disabled")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 500_000, (path, len(data))

    return shoot


class Chat:
    """The page at a server's URL, and the JSON bodies of the chat requests it sent."""

    def __init__(self, browser, server):
        self.bodies, self.urls = [], []
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page.on("request", self._seen)
        self.page.goto(server.url)
        self.page.locator("#ctx:not(:empty)").wait_for()

    def _seen(self, request):
        self.urls.append(request.url)
        if request.url.endswith("/v1/chat/completions"):
            self.bodies.append(request.post_data_json)

    def ask(self, action, wait=True):
        """Do what sends a chat request; by default wait until its answer is over."""
        with self.page.expect_request("**/v1/chat/completions"):
            action()
        if wait:
            self.done()

    def send(self, text, wait=True):
        self.page.fill("#input", text)
        self.ask(lambda: self.page.press("#input", "Enter"), wait)

    def done(self):
        self.page.locator("#send").wait_for(state="visible", timeout=30_000)

    def texts(self, selector) -> list[str]:
        return self.page.locator(selector).all_text_contents()

    def click(self, name: str, within: str = "#log"):
        self.page.locator(within).get_by_role("button", name=name, exact=True).last.click()


@pytest.fixture
def chat(browser, v32):
    v32.engine.runner.delay, v32.engine.runner.fail = 0.0, False
    c = Chat(browser, v32)
    yield c
    c.context.close()


def say(server, text: str, delay: float = 0.0) -> list[int]:
    """Script the next answer; return its token ids."""
    script(server, text)
    server.engine.runner.delay = delay
    return server.engine.runner.script


def test_header_shows_the_model_card_and_the_page_stays_offline(chat, v32, shots):
    card = httpx.get(v32.url + "/v1/models").json()["data"][0]
    k = card["index_topk"]
    page = chat.page
    assert page.inner_text("#model") == card["id"] == MODEL
    assert page.inner_text("#ctx") == f"context {card['max_model_len']:,} tokens" == "context 4,096 tokens"
    assert page.inner_text("#dsa") == f"DSA top-{k}: selecting keys past {k} tokens"
    assert page.is_visible("#thinking-control") and page.is_visible("#tools-control")
    shots(page, "empty")
    # every resource the page loaded came from this server: no CDN, no fonts from elsewhere
    paths = {u.removeprefix(v32.url) for u in chat.urls}
    assert all(u.startswith(v32.url) for u in chat.urls) and paths == {
        "/", "/static/chat.css", "/static/chat.js", "/v1/models", "/v1/agent/tools"}, chat.urls
    assert page.is_hidden("#server-tools-control")  # this server runs no tools (404)
    # a context within DSA's key budget, and a dense model, say so (the card as another server gives it)
    for change, text in (({"max_model_len": k}, f"DSA top-{k}: dense within this context"),
                         ({"index_topk": None}, "dense attention")):
        fake = {"object": "list", "data": [{**card, **change}]}
        page.route("**/v1/models", lambda route: route.fulfill(json=fake))  # noqa: B023 (unrouted below)
        page.reload()
        page.locator("#ctx:not(:empty)").wait_for()
        assert page.inner_text("#dsa") == text
        page.unroute("**/v1/models")


def test_an_answer_streams_in_token_by_token(chat, v32, shots):
    answer = ("DeepSeek Sparse Attention lets each query attend to only the top-k keys its lightning "
              "indexer picks, so long contexts cost far less to decode.")
    ids = say(v32, answer + EOS, delay=0.02)
    page = chat.page
    page.click("#input")  # Shift+Enter is a new line, Enter sends
    page.keyboard.type("What does DSA change?")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("One sentence, please.")
    chat.ask(lambda: page.keyboard.press("Enter"), wait=False)
    seen, shot = [], False
    while page.is_visible("#stop"):
        text = "".join(chat.texts(".msg.assistant .content"))
        if not seen or text != seen[-1]:
            seen.append(text)
        if not shot and len(text) > len(answer) // 2:
            shots(page, "streaming")
            shot = True
        time.sleep(0.05)
    chat.done()
    assert chat.texts(".msg.user .text") == ["What does DSA change?\nOne sentence, please."]
    assert chat.texts(".msg.assistant .content") == [answer]
    # it grew over several observations, each a prefix of the answer, before the answer was complete
    partial = [t for t in seen if t and t != answer]
    assert len(partial) >= 3 and all(answer.startswith(t) for t in partial), seen
    # usage from the stream's last chunk: the script's tokens and its EOS
    stats = page.inner_text(".msg.assistant .stats")
    assert stats.startswith(f"{len(ids)} tokens · ") and " tok/s · " in stats, stats
    [body] = chat.bodies
    assert body["messages"] == [{"role": "user", "content": "What does DSA change?\nOne sentence, please."}]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["chat_template_kwargs"] == {"thinking": False} and "tools" not in body
    assert (body["model"], body["temperature"], body["max_tokens"]) == (MODEL, 1, 1024)


def test_thinking_and_a_tool_call_then_its_result_continues_the_turn(chat, v32, shots):
    page = chat.page
    page.check("#thinking")
    page.click("#tools-control summary")
    page.fill("#tools", json.dumps(TOOLS, indent=1))
    page.click("#tools-control summary")
    reasoning = "The user wants a 3-day forecast for Paris, so I should call get_weather."
    say(v32, encode_completion({"reasoning_content": reasoning, "content": "", "tool_calls": [CALL]}, "thinking"))
    chat.send("What's the weather in Paris for the next 3 days?")
    assert chat.texts(".thinking .text") == [reasoning] and chat.texts(".thinking .tag") == ["in context"]
    assert chat.texts(".call .name") == ["get_weather"]
    assert json.loads(page.inner_text(".call .args")) == CALL["function"]["arguments"]
    assert page.get_by_label("Result of get_weather").is_visible()

    result = '{"forecast": ["sunny, 24°C", "cloudy, 21°C", "rain, 18°C"]}'
    answer = "Paris: sunny and 24°C tomorrow, cloudy and 21°C the day after, then rain at 18°C."
    say(v32, encode_completion({"reasoning_content": "Three days came back; summarise them.",
                                "content": answer}, "thinking"))
    page.get_by_label("Result of get_weather").fill(result)
    shots(page, "thinking-tools")
    chat.ask(lambda: chat.click("Send results"))
    assert chat.texts(".msg.tool .text") == [result]
    assert chat.texts(".msg.assistant .content") == [answer]
    assert chat.texts(".thinking .tag") == ["in context", "in context"]  # no user message since
    # the page sent the whole turn back: reasoning, the call, its result, and the tools
    first, second = chat.bodies
    assert first["chat_template_kwargs"] == second["chat_template_kwargs"] == {"thinking": True}
    assert first["tools"] == second["tools"] == TOOLS
    user, call_msg, tool_msg = second["messages"]
    assert user == first["messages"][0] and call_msg["reasoning_content"] == reasoning
    [call] = call_msg["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris", "days": 3}
    assert tool_msg == {"role": "tool", "tool_call_id": call["id"], "content": result}
    # and the V3.2 format keeps that reasoning in context across the tool call, as the page marks it
    assert reasoning in encode_messages(second["messages"], "thinking", tools=TOOLS)


def test_an_earlier_turns_thinking_is_marked_dropped_after_the_next_user_message(chat, v32, shots):
    page = chat.page
    page.check("#thinking")
    one, two = "The user says hello; greet them back.", "They ask my name; I am a tiny test model."
    say(v32, f"{one}</think>Hello! How can I help?" + EOS)
    chat.send("Hi there")
    assert chat.texts(".thinking .tag") == ["in context"]
    say(v32, f"{two}</think>I am tiny-test, a random V3.2 model." + EOS)
    chat.send("Who are you?")
    assert chat.texts(".thinking .text") == [one, two]
    assert chat.texts(".thinking .tag") == ["not in context", "in context"]
    assert page.locator(".thinking").nth(0).get_attribute("class") == "thinking dropped"
    page.locator(".thinking summary").first.click()  # open the dropped one for the picture
    shots(page, "thinking-dropped")
    # the oracle: what the V3.2 encoder renders of the conversation the page holds (it did send the
    # first reasoning back; the format drops it)
    held = chat.bodies[-1]["messages"] + [{"role": "assistant", "reasoning_content": two, "content": "..."}]
    assert held[1]["reasoning_content"] == one
    prompt = encode_messages(held, "thinking")
    assert one not in prompt and two in prompt
    # thinking off: the chat-mode prompt renders no reasoning at all
    page.uncheck("#thinking")
    assert chat.texts(".thinking .tag") == ["not in context", "not in context"]
    prompt = encode_messages(held, "chat")
    assert one not in prompt and two not in prompt


def test_regenerate_replaces_the_last_answer_and_copy_copies_it(chat, v32):
    chat.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=v32.url)
    say(v32, "First answer." + EOS)
    chat.send("Tell me something.")
    assert chat.texts(".msg.assistant .content") == ["First answer."]
    say(v32, "Second answer." + EOS)
    chat.ask(lambda: chat.click("Regenerate"))
    assert chat.texts(".msg.assistant .content") == ["Second answer."]
    assert chat.bodies[1]["messages"] == chat.bodies[0]["messages"] == [
        {"role": "user", "content": "Tell me something."}]
    chat.page.locator(".msg.assistant").get_by_role("button", name="Copy").click()
    assert chat.page.evaluate("navigator.clipboard.readText()") == "Second answer."


def test_edit_a_user_message_and_resend_from_there(chat, v32):
    say(v32, "Answer A." + EOS)
    chat.send("first question")
    say(v32, "Answer B." + EOS)
    chat.send("second question")
    chat.page.locator(".msg.user").first.get_by_role("button", name="Edit").click()
    chat.page.get_by_label("Edit message").fill("edited question")
    say(v32, "Answer C." + EOS)
    chat.ask(lambda: chat.click("Save & send"))
    assert chat.texts(".msg.user .text") == ["edited question"]
    assert chat.texts(".msg.assistant .content") == ["Answer C."]
    assert chat.bodies[-1]["messages"] == [{"role": "user", "content": "edited question"}]


def test_stop_aborts_the_stream(chat, v32):
    n = len(say(v32, "word " * 300, delay=0.02))  # 6 s of words
    before = v32.metrics()["dsv32_generation_tokens_total"]
    chat.send("Talk forever.", wait=False)
    content = chat.page.locator(".msg.assistant .content")
    content.wait_for()
    chat.page.click("#stop")
    chat.done()
    stopped = content.inner_text()
    time.sleep(0.5)
    assert content.inner_text() == stopped and 0 < len(stopped) < len("word " * 300)
    assert chat.page.inner_text(".msg.assistant .stats").startswith("stopped after ")
    m = v32.wait_idle()  # the server saw the client go and freed the request
    assert m["dsv32_requests_running"] == 0 and m["dsv32_cache_blocks_free"] == m["dsv32_cache_blocks_total"]
    assert m["dsv32_generation_tokens_total"] - before < n / 2
    say(v32, "Still here." + EOS)
    chat.send("Are you there?")
    assert chat.texts(".msg.assistant .content")[-1] == "Still here."


def test_server_errors_are_shown_and_the_page_stays_usable(chat, v32, shots):
    page = chat.page
    # a request the server rejects: a prompt longer than the context (the 400's own message)
    long = "def f(x): return x\n" * 500  # 4500 tokens
    r = httpx.post(v32.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400
    page.eval_on_selector("#input", "(box, text) => { box.value = text; }", long)  # page.fill: seconds
    chat.ask(lambda: page.press("#input", "Enter"))
    assert chat.texts(".msg.error .text") == [f"HTTP 400: {r.json()['error']['message']}"]
    # an engine that crashes mid-answer: the error event of the stream, after the partial answer
    page.locator(".msg.user").first.get_by_role("button", name="Edit").click()
    page.get_by_label("Edit message").fill("Summarise the V3.2 paper.")
    say(v32, "V3.2 adds DeepSeek Sparse Attention to V3.1-Terminus: a lightning indexer scores the earlier "
             "tokens, and each query attends to only the 2048 it ranks highest, " + "so " * 200, delay=0.02)
    chat.ask(lambda: chat.click("Save & send"), wait=False)
    page.wait_for_function("document.querySelector('.msg.assistant .content')?.textContent.length > 80")
    v32.engine.runner.fail = True
    chat.done()
    assert chat.texts(".msg.error .text") == ["sampling failed for this request: scripted failure"]
    assert chat.texts(".msg.assistant .content")[0].startswith("V3.2 adds")
    shots(page, "error")
    # Retry replaces the broken answer
    say(v32, "Recovered." + EOS)
    chat.ask(lambda: chat.click("Retry"))
    assert chat.texts(".msg.assistant .content") == ["Recovered."] and not chat.texts(".msg.error")
    # tool definitions that are not JSON: shown, and nothing is sent
    page.click("#tools-control summary")
    page.fill("#tools", "[{not json")
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    error = page.locator(".msg.error .text")
    error.wait_for()
    assert error.inner_text().startswith("Tools: ") and "JSON" in error.inner_text()
    assert len(chat.bodies) == 3


def test_the_chatml_model_hides_thinking_and_offers_tools(browser, chatml):
    c = Chat(browser, chatml)
    try:
        page = c.page
        assert page.inner_text("#format") == "ChatML: no thinking"
        assert page.is_hidden("#thinking-control") and page.is_visible("#tools-control")
        assert page.inner_text("#dsa") == "DSA top-16: selecting keys past 16 tokens"
        say(chatml, "Hello there!<|im_end|>")
        c.send("hi")
        assert c.texts(".msg.assistant .content") == ["Hello there!"]
        [body] = c.bodies
        assert "tools" not in body and "chat_template_kwargs" not in body
    finally:
        c.context.close()
