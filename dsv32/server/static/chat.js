// The dsv32 web chat: one page, plain JavaScript, talking to this server's OpenAI-compatible API.
//
// `conv` is the conversation exactly as it is sent back to the server on every request
// (OpenAI messages: assistant turns keep their reasoning_content and tool_calls, tool results are
// `tool` messages), plus what only the page needs: fields whose name starts with "_", and "error"
// entries; `wire()` strips both before sending.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input");
const conv = [];
let card = {};        // this server's /v1/models entry
let busy = null;      // the AbortController of the request in flight
let serverTools = []; // the server's own tools (dsv32 serve --agent-tools), from /v1/agent/tools
// this page's conversation with the server's tools (its own sandbox there); a reload starts a new one
const conversation = Array.from(crypto.getRandomValues(new Uint8Array(12)),
  (b) => b.toString(16).padStart(2, "0")).join("");

// ---- the conversation on the wire ----
const wire = () => conv.filter((m) => m.role !== "error").map((m) =>
  Object.fromEntries(Object.entries(m).filter(([k]) => !k.startsWith("_"))));

const thinkingOn = () => card.supports_thinking && $("thinking").checked;
const lastUser = () => conv.findLastIndex((m) => m.role === "user");

// Whether the next request renders message i's reasoning. This mirrors dsv32/chat/encode.py: in
// thinking mode, only assistant messages after the last user message keep their reasoning (it
// survives tool round trips, not a new user turn); in chat mode no reasoning is rendered at all.
const inContext = (i) => thinkingOn() && i > lastUser();

const serverToolsOn = () => card.supports_tools && serverTools.length > 0 && $("server-tools").checked;
const isServerTool = (name) => serverToolsOn() && serverTools.some((t) => t.function.name === name);

function tools() {  // the settings panel's tool list and the server's tools if chosen, or null; throws on bad JSON
  const text = $("tools").value.trim();
  if (!card.supports_tools) return null;
  let list = [];
  if (text) {
    try { list = JSON.parse(text); } catch (e) { throw new Error(`Tools: ${e.message}`); }
    if (!Array.isArray(list)) throw new Error("Tools: expected a JSON list of {\"type\": \"function\", ...}");
  }
  if (serverToolsOn()) list = list.concat(serverTools);
  return list.length ? list : null;
}

function requestBody() {
  const body = {
    model: card.id, messages: wire(), stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  if (card.supports_thinking) body.chat_template_kwargs = { thinking: thinkingOn() };
  const t = tools();
  if (t) body.tools = t;
  return body;
}

// ---- server-sent events ----
async function* events(response) {  // each `data:` payload, parsed; ends at [DONE]
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the connection closed before the answer was complete");
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const data = buf.slice(0, end).split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      buf = buf.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function errorMessage(response) {  // {"error": {"message": ...}}, or whatever came
  const text = await response.text();
  try { return `HTTP ${response.status}: ${JSON.parse(text).error.message}`; }
  catch { return `HTTP ${response.status}: ${text || response.statusText}`; }
}

function apply(m, chunk) {  // one chat.completion.chunk into the assistant message m
  if (chunk.usage) m._usage = chunk.usage;
  const choice = chunk.choices?.[0];
  if (!choice) return;
  const d = choice.delta || {};
  if (d.reasoning_content) m.reasoning_content = (m.reasoning_content || "") + d.reasoning_content;
  if (d.content) m.content += d.content;
  for (const tc of d.tool_calls || []) {  // the first delta of a call has its id and name
    m.tool_calls ??= [];
    const call = m.tool_calls[tc.index] ??=
      { id: tc.id, type: "function", function: { name: tc.function?.name, arguments: "" } };
    call.function.arguments += tc.function?.arguments || "";
  }
  if (d.reasoning_content || d.content || d.tool_calls) m._tLast = performance.now();
  if (choice.finish_reason) m._finish = choice.finish_reason;
}

// Ask for the next assistant message of conv, streaming it into the page.
async function complete() {
  const m = { role: "assistant", content: "", _t0: performance.now() };
  let failure = null;
  try {
    const body = requestBody();  // before anything changes: bad tool JSON fails here
    conv.push(m);
    setBusy(new AbortController());
    render();
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: busy.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);  // the server's error event
      apply(m, chunk);
      update(m);
    }
  } catch (e) {
    if (e.name === "AbortError") m._stopped = true;
    else failure = e.message;
  }
  if (failure) {  // the error takes the place of an answer that never started
    const i = conv.indexOf(m);
    if (i >= 0 && !m.content && !m.reasoning_content && !m.tool_calls) conv.splice(i, 1);
    conv.push({ role: "error", content: failure });
  }
  setBusy(null);
  render();
}

function setBusy(controller) {
  busy = controller;
  $("send").hidden = !!busy;
  $("stop").hidden = !busy;
}

// ---- actions ----
function send() {
  const text = input.value;
  if (busy || !text.trim() || !card.chat_format) return;
  conv.push({ role: "user", content: text });
  input.value = "";
  complete();
}

function regenerate() {  // replace the last answer (and any error after it) with a new one
  while (conv.at(-1)?.role === "error") conv.pop();
  if (conv.at(-1)?.role === "assistant") conv.pop();
  complete();
}

function resendEdited(i, text) {  // a user message changed: the conversation restarts there
  conv.splice(i, conv.length - i, { role: "user", content: text });
  complete();
}

function sendResults(m, boxes) {  // tool messages in call order, then the turn goes on
  m.tool_calls.forEach((call, k) =>
    conv.push({ role: "tool", tool_call_id: call.id, content: boxes[k].value, _name: call.function.name }));
  complete();
}

async function copy(text, button) {
  try { await navigator.clipboard.writeText(text); button.textContent = "Copied"; }
  catch { button.textContent = "Copy failed"; }
  setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

// ---- rendering ----
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, onclick, disabled = !!busy) {
  const b = el("button", "", label);
  b.type = "button";
  b.disabled = disabled;
  b.onclick = onclick;
  return b;
}

function pretty(args) {  // arguments JSON, indented once it parses (it may still be streaming)
  try { return JSON.stringify(JSON.parse(args), null, 2); } catch { return args; }
}

function stats(m) {
  const secs = ((m._tLast ?? performance.now()) - m._t0) / 1000;
  if (m._stopped) return `stopped after ${secs.toFixed(1)} s`;
  const u = m._usage;
  if (!u) return "";
  const parts = [`${u.completion_tokens} tokens`, `${(u.completion_tokens / secs).toFixed(1)} tok/s`,
    `${u.prompt_tokens} prompt tokens (${u.prompt_tokens_details?.cached_tokens ?? 0} cached)`];
  if (m._finish === "length") parts.push("max tokens reached");
  return parts.join(" · ");
}

function view(m, i) {  // the element of conv[i]
  const last = i === conv.length - 1;
  if (m.role === "error") {
    const box = el("div", "msg error");
    box.setAttribute("role", "alert");
    box.append(el("strong", "", "Error "), el("span", "text", m.content));
    if (last) {
      const actions = el("div", "actions");
      actions.append(button("Retry", regenerate));
      box.append(actions);
    }
    return box;
  }
  const box = el("article", `msg ${m.role}`);
  const actions = el("div", "actions"), foot = el("div", "foot");
  foot.append(el("span", "stats", m.role === "assistant" ? stats(m) : ""), actions);
  if (m.role === "user") {
    box.append(el("div", "role", "You"), el("div", "text", m.content), foot);
    actions.append(button("Edit", () => edit(box, i)), button("Copy", (e) => copy(m.content, e.target), false));
  } else if (m.role === "tool") {
    box.append(el("div", "role", `Result of ${m._name}`), el("pre", "text", m.content));
  } else {
    box.append(el("div", "role", "Assistant"));
    if (m.reasoning_content !== undefined) {
      const keep = inContext(i);
      const think = el("details", keep ? "thinking" : "thinking dropped");
      // open while it is the latest turn's, closed once dropped, unless the reader chose (a click
      // on the summary; "toggle" events also fire when we set `open` here, so they cannot tell)
      think.open = m._open ?? (keep || m === conv.at(-1));
      const tag = el("span", "tag", keep ? "in context" : "not in context");
      if (!keep) {
        tag.title = thinkingOn() ? "the chat format drops a turn's reasoning at the next user message"
          : "thinking is off: no reasoning is rendered";
      }
      const summary = el("summary", "", "Thinking ");
      summary.append(tag);
      summary.onclick = () => { m._open = !think.open; };
      think.append(summary, el("div", "text", m.reasoning_content));
      box.append(think);
    }
    if (m.content) box.append(el("div", "text content", m.content));
    else if (!m.reasoning_content && !m.tool_calls) {
      box.append(el("div", "text empty", busy && last ? "…" : "(no text)"));
    }
    for (const call of m.tool_calls || []) {
      const c = el("div", "call");
      c.append(el("div", "name", call.function.name), el("pre", "args", pretty(call.function.arguments)));
      box.append(c);
    }
    if (last && m.tool_calls && m._finish && !busy) box.append(resultForm(m));
    box.append(foot);
    if (busy && last) box.classList.add("live");  // the answer streaming in
    actions.append(button("Copy", (e) => copy(m.content || m.reasoning_content || "", e.target), false));
    if (last) actions.append(button("Regenerate", regenerate));
  }
  m._el = box;
  return box;
}

async function runTool(call) {  // POST one call to the server's tool; its result, or throws
  const response = await fetch(`v1/agent/tools/${encodeURIComponent(call.function.name)}`, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ conversation, arguments: call.function.arguments || "{}" }),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  return (await response.json()).result;
}

function resultForm(m) {  // a result box per pending tool call; Run for the server's tools
  const form = el("form", "results");
  m._results ??= m.tool_calls.map(() => "");
  const runs = [];
  const boxes = m.tool_calls.map((call, k) => {
    const label = el("label", "", `Result of ${call.function.name}`);
    const box = el("textarea");
    box.rows = 2;
    box.value = m._results[k];
    box.oninput = () => { m._results[k] = box.value; };
    label.append(box);
    form.append(label);
    if (isServerTool(call.function.name)) {
      const row = el("div", "run"), status = el("span", "run-status");
      const run = async () => {
        b.disabled = true;
        status.textContent = "running…";
        status.removeAttribute("role");
        try {
          box.value = m._results[k] = await runTool(call);
          status.textContent = "";
        } catch (e) {
          status.textContent = `Error ${e.message}`;
          status.setAttribute("role", "alert");
        }
        b.disabled = false;
      };
      const b = button("Run", run);
      b.title = `Run ${call.function.name} on the server, in this conversation's sandbox`;
      row.append(b, status);
      form.append(row);
      runs.push(run);
    }
    return box;
  });
  const buttons = el("div", "buttons");
  if (runs.length > 1) buttons.append(button("Run all", () => Promise.all(runs.map((r) => r()))));
  buttons.append(button("Send results", () => sendResults(m, boxes)));
  form.append(buttons);
  return form;
}

function edit(box, i) {
  const area = el("textarea");
  area.value = conv[i].content;
  area.setAttribute("aria-label", "Edit message");
  const actions = el("div", "actions");
  actions.append(button("Save & send", () => resendEdited(i, area.value)), button("Cancel", render));
  box.querySelector(".text").replaceWith(area);
  box.querySelector(".actions").replaceWith(actions);
  area.focus();
}

function render() {
  log.replaceChildren(...conv.map(view));
  log.scrollTop = log.scrollHeight;
}

function update(m) {  // a streaming message: redraw it alone, following it if we were at the bottom
  const follow = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  m._el.replaceWith(view(m, conv.indexOf(m)));
  if (follow) log.scrollTop = log.scrollHeight;
}

// ---- start ----
function describe(c) {  // the header: model, context, DSA, chat format
  $("model").textContent = c.id;
  $("ctx").textContent = c.max_model_len ? `context ${c.max_model_len.toLocaleString("en")} tokens` : "";
  const k = c.index_topk;
  $("dsa").textContent = k == null ? "dense attention"
    : k < c.max_model_len ? `DSA top-${k}: selecting keys past ${k} tokens`
    : `DSA top-${k}: dense within this context`;
  $("format").textContent = { v32: "V3.2 chat format", chatml: "ChatML: no thinking" }[c.chat_format]
    ?? "no chat format: use /v1/completions";
  $("thinking-control").hidden = !c.supports_thinking;
  $("tools-control").hidden = !c.supports_tools;
  $("server-tools-names").textContent = serverTools.map((t) => t.function.name).join(", ");
  $("server-tools-control").hidden = !serverTools.length;
  input.disabled = $("send").disabled = !c.chat_format;
}

async function start() {
  const listed = fetch("v1/agent/tools").then((r) => (r.ok ? r.json() : { data: [] }))  // 404 without --agent-tools
    .then((j) => j.data, () => []);
  try {
    const response = await fetch("v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    card = (await response.json()).data[0];
    serverTools = card.supports_tools ? await listed : [];
    describe(card);
  } catch (e) {
    conv.push({ role: "error", content: `could not read v1/models: ${e.message}` });
    render();
  }
}

$("composer").onsubmit = (e) => { e.preventDefault(); send(); };
$("stop").onclick = () => busy?.abort();
$("thinking").onchange = render;  // what is in context depends on it
$("server-tools").onchange = render;  // whether calls get a Run button
input.onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
};
start();
