// The taipan playground: a chat page over the server's own AI21 Studio route. Plain browser
// JavaScript, no build step; every piece of model or user text reaches the page through
// textContent, never as markup.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "taipan.apiKey";
const CHAT_ROUTE = "/studio/v1/chat/completions";
const EXAMPLE_TOOLS = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", description: "The city, e.g. Paris" } },
      required: ["city"],
    },
  },
}];

// The conversation as the API sees it, plus what the page shows beside each assistant turn.
const chat = { messages: [], views: [], busy: null };

function apiKey() { return $("api-key").value.trim(); }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

async function loadModels() {
  const select = $("model");
  const status = $("model-status");
  status.textContent = "loading models…";
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) {
      status.textContent = "this server needs an API key: enter it in Settings";
      return;
    }
    if (!r.ok) {
      status.textContent = "models unavailable (HTTP " + r.status + "); is the model still loading?";
      setTimeout(loadModels, 2000);
      return;
    }
    const body = await r.json();
    const keep = select.value;
    select.replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    if (body.data.some((m) => m.id === keep)) select.value = keep;
    status.textContent = body.data.length ? "" : "the server lists no models";
  } catch (e) {
    status.textContent = "cannot reach the server: " + e.message;
  }
}

function numberField(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : parse(raw);
}

function parseTools() {
  const text = $("tools").value.trim();
  const error = $("tools-error");
  error.textContent = "";
  $("tools").removeAttribute("aria-invalid");
  if (!text) return [];
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (e) {
    tools = e;
  }
  if (!Array.isArray(tools)) {
    error.textContent = tools instanceof Error ? "Tools: invalid JSON: " + tools.message : "Tools: expected a JSON array";
    $("tools").setAttribute("aria-invalid", "true");
    throw new Error(error.textContent);
  }
  return tools;
}

// The request the next Send would make: the conversation so far, the draft message if there is
// one, and every setting that differs from the API's default.
function buildRequest(draft) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chat.messages);
  if (draft) messages.push({ role: "user", content: draft });
  const n = numberField("n", (v) => parseInt(v, 10)) ?? 1;
  const body = { model: $("model").value || "jamba-mini", messages };
  const maxTokens = numberField("max-tokens", (v) => parseInt(v, 10));
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  const temperature = numberField("temperature", parseFloat);
  if (temperature !== undefined) body.temperature = temperature;
  const topP = numberField("top-p", parseFloat);
  if (topP !== undefined) body.top_p = topP;
  const stop = $("stop").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) body.stop = stop;
  if (n !== 1) body.n = n;
  const documents = [...$("documents").querySelectorAll("textarea")]
    .map((t) => t.value.trim()).filter(Boolean).map((content) => ({ content }));
  if (documents.length) body.documents = documents;
  const tools = parseTools();
  if (tools.length) {
    body.tools = tools;
    if ($("tool-choice").value !== "auto") body.tool_choice = $("tool-choice").value;
  }
  if ($("json-mode").checked) body.response_format = { type: "json_object" };
  // AI21 streams one answer at a time: several answers come back in one response.
  body.stream = n === 1;
  return body;
}

// ---- rendering -------------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addBubble(kind, label) {
  const li = el("li", "msg " + kind);
  li.append(el("span", "role", label));
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

// The thinking of a reasoning model: the server's reasoning_content, or (with
// --reasoning-format none) a leading <think>…</think> block split from the answer here.
function thinkingOf(choice) {
  if (choice.reasoning) {
    return { thinking: choice.reasoning, answer: choice.content || "", open: !choice.content && !choice.done };
  }
  return splitThinking(choice.content || "");
}

function splitThinking(text) {
  const m = /^\s*<think>([\s\S]*?)(<\/think>|$)/.exec(text);
  if (!m) return { thinking: null, answer: text, open: false };
  return { thinking: m[1].trim(), answer: text.slice(m[0].length).replace(/^\s+/, ""), open: m[2] === "" };
}

function renderChoice(box, choice, label) {
  // The thinking block is open while the model thinks and folds once it answers, unless the
  // user opened it since.
  const prior = box.querySelector("details.thinking");
  const userOpened = Boolean(prior && prior.open && !prior.dataset.auto);
  box.replaceChildren();
  if (label) box.append(el("span", "choice-label", label));
  const { thinking, answer, open } = thinkingOf(choice);
  if (thinking !== null) {
    const details = el("details", "thinking");
    details.append(el("summary", null, open ? "Thinking…" : "Thinking"), el("div", null, thinking));
    details.open = open || userOpened;
    if (open) details.dataset.auto = "1";
    box.append(details);
  }
  box.append(el("div", "answer", answer));
  for (const call of choice.toolCalls) {
    box.append(el("div", "tool-call", "call " + call.function.name + "(" + call.function.arguments + ")  id " + call.id));
  }
}

function showStats(bubble, stats) {
  const parts = [];
  if (stats.tokens !== undefined) parts.push(stats.tokens + " tokens");
  if (stats.ttft !== undefined) parts.push("first token " + Math.round(stats.ttft) + " ms");
  if (stats.tokensPerSecond !== undefined) parts.push(stats.tokensPerSecond.toFixed(1) + " tokens/s");
  if (stats.finish) parts.push("finish: " + stats.finish);
  const line = el("span", "stats", parts.join(" · "));
  line.dataset.tokens = stats.tokens ?? "";
  bubble.append(line);
}

// The last assistant turn asked for tools: one answer box per call, sent back together.
function offerToolAnswers(bubble, calls) {
  const form = el("form", "tool-answers");
  calls.forEach((call, i) => {
    const id = "tool-result-" + call.id;
    const label = el("label", null, "Result of " + call.function.name + " (" + call.id + ")");
    label.htmlFor = id;
    const box = el("textarea");
    box.id = id;
    box.rows = 2;
    box.dataset.callId = call.id;
    if (i === 0) box.setAttribute("autofocus", "");
    form.append(label, box);
  });
  const send = el("button", null, "Send tool results");
  send.type = "submit";
  form.append(send);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (chat.busy) return;
    for (const box of form.querySelectorAll("textarea")) {
      chat.messages.push({ role: "tool", tool_call_id: box.dataset.callId, content: box.value });
      addBubble("tool", "tool result (" + box.dataset.callId + ")").append(document.createTextNode(box.value));
    }
    form.remove();
    send_(null);
  });
  bubble.append(form);
  form.querySelector("textarea")?.focus();
}

// ---- talking to the server -----------------------------------------------------------------

async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => (d.loc ? d.loc.join(".") + ": " : "") + d.msg).join("; ");
    }
    return body.detail || body.error?.message || text;
  } catch {
    return text || response.statusText;
  }
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function mergeToolDeltas(calls, deltas) {
  for (const d of deltas) {
    const call = calls[d.index] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
    if (d.id) call.id = d.id;
    if (d.function?.name) call.function.name += d.function.name;
    if (d.function?.arguments) call.function.arguments += d.function.arguments;
  }
}

async function send_(draft) {
  let body;
  try {
    body = buildRequest(draft);
  } catch (e) {
    addBubble("error", "error").append(document.createTextNode(e.message));
    return;
  }
  if (draft) {
    chat.messages.push({ role: "user", content: draft });
    addBubble("user", "you").append(document.createTextNode(draft));
  }
  const bubble = addBubble("assistant", body.model);
  bubble.setAttribute("aria-busy", "true");
  const controller = new AbortController();
  chat.busy = controller;
  $("send").disabled = true;
  $("stop-generation").disabled = false;
  const started = performance.now();
  let firstAt;
  const choices = [];
  const boxes = [];
  const choiceBox = (i) => {
    if (!boxes[i]) {
      boxes[i] = el("div", "choice");
      bubble.append(boxes[i]);
      choices[i] = { content: "", toolCalls: [] };
    }
    return boxes[i];
  };
  const stats = {};
  try {
    const response = await fetch(CHAT_ROUTE, {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error("HTTP " + response.status + ": " + (await errorText(response)));
    if (body.stream) {
      const box = choiceBox(0);
      for await (const chunk of sseEvents(response)) {
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const c = chunk.choices?.[0];
        if (!c) continue;
        if (c.delta?.content) choices[0].content += c.delta.content;
        if (c.delta?.reasoning_content) choices[0].reasoning = (choices[0].reasoning || "") + c.delta.reasoning_content;
        if (c.delta?.tool_calls) mergeToolDeltas(choices[0].toolCalls, c.delta.tool_calls);
        if (firstAt === undefined && (c.delta?.content || c.delta?.reasoning_content || c.delta?.tool_calls)) {
          firstAt = performance.now();
        }
        if (c.finish_reason) {
          stats.finish = c.finish_reason;
          choices[0].done = true;
        }
        if (chunk.usage) stats.tokens = chunk.usage.completion_tokens;
        renderChoice(box, choices[0]);
      }
    } else {
      const result = await response.json();
      firstAt = performance.now();
      result.choices.forEach((c, i) => {
        const box = choiceBox(i);
        choices[i].content = c.message.content || "";
        choices[i].reasoning = c.message.reasoning_content || "";
        choices[i].done = true;
        choices[i].toolCalls = c.message.tool_calls || [];
        renderChoice(box, choices[i], result.choices.length > 1 ? "answer " + (i + 1) : null);
      });
      stats.finish = result.choices.map((c) => c.finish_reason).join(", ");
      stats.tokens = result.usage?.completion_tokens;
    }
    const ended = performance.now();
    if (firstAt !== undefined) {
      stats.ttft = firstAt - started;
      if (stats.tokens && body.stream && ended > firstAt) stats.tokensPerSecond = stats.tokens / ((ended - firstAt) / 1000);
      else if (stats.tokens && !body.stream) stats.tokensPerSecond = stats.tokens / ((ended - started) / 1000);
    }
    showStats(bubble, stats);
    const first = choices[0] ?? { content: "", toolCalls: [] };
    const calls = first.toolCalls.filter(Boolean);
    chat.messages.push({ role: "assistant", content: first.content || null, ...(calls.length ? { tool_calls: calls } : {}) });
    if (calls.length) offerToolAnswers(bubble, calls);
  } catch (e) {
    const text = e.name === "AbortError" ? "stopped" : e.message;
    const note = el("div", "error-text", text);
    bubble.classList.add(e.name === "AbortError" ? "stopped" : "error");
    bubble.append(note);
    const partial = choices[0]?.content;
    if (partial) chat.messages.push({ role: "assistant", content: partial });
  } finally {
    bubble.removeAttribute("aria-busy");
    chat.busy = null;
    $("send").disabled = false;
    $("stop-generation").disabled = true;
    bubble.scrollIntoView({ block: "end" });
  }
}

// ---- view code -----------------------------------------------------------------------------

// Python source that py() passes through as it is.
class PythonCode {
  constructor(text) { this.text = text; }
}

// One message as the ai21 SDK's class for its role; `classes` collects what to import.
function ai21Message(m, classes) {
  const kwargs = [];
  let cls;
  if (m.role === "system") cls = "SystemMessage";
  else if (m.role === "user") cls = "UserMessage";
  else if (m.role === "tool") {
    cls = "ToolMessage";
    kwargs.push("tool_call_id=" + JSON.stringify(m.tool_call_id));
  } else {
    cls = "AssistantMessage";
    if (m.tool_calls?.length) {
      classes.add("ToolCall").add("ToolFunction");
      const calls = m.tool_calls.map((c) => "ToolCall(id=" + JSON.stringify(c.id) + ", function=ToolFunction(name=" +
        JSON.stringify(c.function.name) + ", arguments=" + JSON.stringify(c.function.arguments) + "))");
      kwargs.push("tool_calls=[" + calls.join(", ") + "]");
    }
  }
  classes.add(cls);
  kwargs.unshift("content=" + (m.content === null ? "None" : JSON.stringify(m.content)));
  return cls + "(" + kwargs.join(", ") + ")";
}

// A JSON value as a Python literal.
function py(value, indent = "") {
  const next = indent + "    ";
  if (value instanceof PythonCode) return value.text;
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return "[\n" + value.map((v) => next + py(v, next)).join(",\n") + ",\n" + indent + "]";
  }
  const keys = Object.keys(value);
  if (!keys.length) return "{}";
  return "{\n" + keys.map((k) => next + JSON.stringify(k) + ": " + py(value[k], next)).join(",\n") + ",\n" + indent + "}";
}

function shellQuote(text) { return "'" + text.replace(/'/g, "'\\''") + "'"; }

function pythonCall(body, indent) {
  return Object.keys(body).map((k) => indent + k + "=" + py(body[k], indent) + ",").join("\n");
}

function snippets(body) {
  const origin = location.origin;
  const keyed = Boolean(apiKey());
  const curl = ["curl " + origin + CHAT_ROUTE + (body.stream ? " --no-buffer" : "") + " \\",
    "  -H 'Content-Type: application/json' \\"]
    .concat(keyed ? ['  -H "Authorization: Bearer $TAIPAN_API_KEY" \\'] : [])
    .concat(["  -d " + shellQuote(JSON.stringify(body, null, 2))]).join("\n");
  const keyExpr = keyed ? 'os.environ["TAIPAN_API_KEY"]' : '"no-key"';
  const imports = keyed ? "import os\n\n" : "";
  const printing = body.stream
    ? 'for chunk in response:\n    delta = chunk.choices[0].delta\n    print(delta.content or "", end="", flush=True)\nprint()'
    : "for choice in response.choices:\n    print(choice.message.content if choice.message.content is not None else choice.message.tool_calls)";
  // The ai21 SDK wants its message classes (it calls model_dump on each); the rest are dicts.
  const classes = new Set();
  const ai21Messages = body.messages.map((m) => ai21Message(m, classes));
  const ai21Body = { ...body, messages: new PythonCode("[\n" + ai21Messages.map((m) => "        " + m + ",\n").join("") + "    ]") };
  const ai21 = imports + "from ai21 import AI21Client\n" +
    "from ai21.models.chat import " + [...classes].sort().join(", ") + "\n\n" +
    "client = AI21Client(api_key=" + keyExpr + ", api_host=" + JSON.stringify(origin + "/studio/v1") + ")\n" +
    "response = client.chat.completions.create(\n" + pythonCall(ai21Body, "    ") + "\n)\n" + printing + "\n";
  // The openai SDK has no `documents` parameter: it travels in extra_body, as vLLM documents it.
  const openaiBody = { ...body };
  const extra = {};
  for (const k of ["documents"]) {
    if (k in openaiBody) { extra[k] = openaiBody[k]; delete openaiBody[k]; }
  }
  if (Object.keys(extra).length) openaiBody.extra_body = extra;
  const openai = imports + "from openai import OpenAI\n\n" +
    "client = OpenAI(api_key=" + keyExpr + ", base_url=" + JSON.stringify(origin + "/v1") + ")\n" +
    "response = client.chat.completions.create(\n" + pythonCall(openaiBody, "    ") + "\n)\n" + printing + "\n";
  return { curl, ai21, openai };
}

let codeLang = "curl";
function showCode() {
  let body;
  try {
    body = buildRequest($("prompt").value.trim() || null);
  } catch (e) {
    $("tools").focus();
    return;
  }
  $("code").textContent = snippets(body)[codeLang];
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const on = tab.dataset.lang === codeLang;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
  }
  $("copy-status").textContent = "";
  if (!$("code-dialog").open) $("code-dialog").showModal();
}

// ---- wiring ---------------------------------------------------------------------------------

function addDocument(text = "") {
  const li = el("li");
  const index = $("documents").children.length + 1;
  const label = el("label", null, "Document " + index);
  const area = el("textarea");
  area.id = "document-" + Date.now() + "-" + index;
  area.rows = 3;
  area.value = text;
  label.htmlFor = area.id;
  const remove = el("button", null, "Remove document " + index);
  remove.type = "button";
  remove.addEventListener("click", () => li.remove());
  const row = el("div", "row");
  row.append(remove);
  li.append(label, area, row);
  $("documents").append(li);
  area.focus();
}

function init() {
  $("api-key").value = localStorage.getItem(KEY_STORE) ?? "";
  $("api-key").addEventListener("change", () => {
    if (apiKey()) localStorage.setItem(KEY_STORE, apiKey());
    else localStorage.removeItem(KEY_STORE);
    loadModels();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || chat.busy) return;
    $("prompt").value = "";
    send_(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && chat.busy && !$("code-dialog").open) chat.busy.abort();
  });
  $("stop-generation").addEventListener("click", () => chat.busy?.abort());
  $("clear").addEventListener("click", () => {
    chat.busy?.abort();
    chat.messages = [];
    $("messages").replaceChildren();
    $("prompt").focus();
  });
  $("add-document").addEventListener("click", () => addDocument());
  $("example-tool").addEventListener("click", () => {
    $("tools").value = JSON.stringify(EXAMPLE_TOOLS, null, 2);
    parseTools();
  });
  $("tools").addEventListener("change", () => { try { parseTools(); } catch { /* shown beside the field */ } });
  $("view-code").addEventListener("click", showCode);
  $("close-code").addEventListener("click", () => $("code-dialog").close());
  $("copy-code").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("code").textContent);
      $("copy-status").textContent = "copied";
    } catch {
      $("copy-status").textContent = "select the code and copy it by hand";
    }
  });
  const tabs = [...document.querySelectorAll("[role=tab]")];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => { codeLang = tab.dataset.lang; showCode(); tab.focus(); });
    tab.addEventListener("keydown", (e) => {
      const step = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
      if (!step) return;
      const to = tabs[(i + step + tabs.length) % tabs.length];
      codeLang = to.dataset.lang;
      showCode();
      to.focus();
    });
  });
  const narrow = window.matchMedia("(max-width: 760px)");
  const setSettings = (open) => {
    $("settings").hidden = !open;
    $("toggle-settings").setAttribute("aria-expanded", String(open));
  };
  setSettings(!narrow.matches);
  $("toggle-settings").addEventListener("click", () => setSettings($("settings").hidden));
  loadModels();
  $("prompt").focus();
}

document.addEventListener("DOMContentLoaded", init);
