// The Potluck dashboard: polls /v1/swarm every 2 s and streams chat answers from
// /v1/chat/completions. No framework, no build step, nothing loaded from elsewhere.
// Everything shown comes from the network (node names are untrusted): text goes in via textContent only.
"use strict";

const POLL_MS = 2000;
const KEY_STORE = "potluck.apiKey";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "style") for (const [k, v] of Object.entries(value)) node.style.setProperty(k, v);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// -- the API key ------------------------------------------------------------------------------
function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }
function authHeaders() { const key = apiKey(); return key ? { Authorization: "Bearer " + key } : {}; }

$("api-key").value = apiKey();
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
  poll();
});

// -- the swarm --------------------------------------------------------------------------------
const fmt = (x, digits = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const duration = (seconds) => {
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
};
let pollTimer = null;

async function poll() {
  clearTimeout(pollTimer);
  try {
    const res = await fetch("/v1/swarm", { headers: authHeaders(), cache: "no-store" });
    $("auth-banner").hidden = res.status !== 401;
    if (!res.ok) throw new Error(res.status === 401 ? "API key needed" : `HTTP ${res.status}`);
    const state = await res.json();
    renderSwarm(state.models);
    setConn(true, "live · updated " + new Date(state.time * 1000).toLocaleTimeString());
  } catch (error) {
    setConn(false, String(error.message || error));
  } finally {
    pollTimer = setTimeout(poll, POLL_MS);
  }
}

function setConn(ok, text) {
  $("conn").className = "conn " + (ok ? "ok" : "bad");
  $("conn-text").textContent = text;
}

function renderSwarm(models) {
  const root = $("models");
  root.replaceChildren(...models.map(renderModel));
  if (!models.length) root.append(el("p", { class: "muted" }, "This server serves no model."));
  updateModelChoice(models.map((m) => m.name));
}

function renderModel(model) {
  const online = model.nodes.filter((n) => n.state === "ONLINE").length;
  const head = el("div", { class: "model-head" },
    el("h2", {}, model.name), el("span", { class: "badge " + model.status }, model.status),
    el("span", { class: "muted" },
      model.num_layers ? `${model.num_layers} layers · ${online}/${model.nodes.length} nodes online · ` +
        (model.discovery === "swarm" ? "discovered" : "explicit peers") : ""));
  const warnings = el("ul", { class: "warnings" },
    ...model.warnings.map((w) => el("li", { class: w.level }, w.text)));
  const parts = [head, warnings];
  if (model.num_layers) parts.push(renderLayers(model));
  parts.push(el("div", { class: "cards" }, ...model.nodes.map(renderCard)));
  return el("div", { class: "model", dataset: { model: model.name } }, ...parts);
}

function renderLayers(model) {
  const n = model.num_layers;
  const pct = (layer) => (layer / n) * 100 + "%";
  const rows = model.nodes.filter((node) => node.start !== null).map((node) => {
    const seg = el("div", {
      class: "seg" + (node.state === "ONLINE" ? "" : " not-online"),
      title: `${node.address}: layers ${node.start}:${node.end} (${node.state})`,
      style: { left: pct(node.start), width: pct(node.end - node.start), background: node.color },
    }, `${node.start}:${node.end}`);
    return el("div", { class: "lrow node-row", dataset: { address: node.address } },
      el("div", { class: "label", title: node.address }, node.name || node.address),
      el("div", { class: "track", style: { "--n": n } }, seg));
  });
  const counts = new Array(n).fill(0);
  for (const node of model.nodes) {
    if (node.state !== "ONLINE" || node.start === null) continue;
    for (let layer = node.start; layer < Math.min(node.end, n); layer++) counts[layer]++;
  }
  const cover = el("div", { class: "cover" }, ...counts.map((c, layer) =>
    el("span", { class: "c" + Math.min(c, 2), title: `layer ${layer}: ${c} node${c === 1 ? "" : "s"}` })));
  const ticks = [];
  const step = n <= 12 ? 1 : n <= 40 ? 5 : 10;
  for (let layer = 0; layer <= n; layer += step) ticks.push(el("span", { style: { left: pct(layer) } }, layer));
  if (n % step) ticks.push(el("span", { style: { left: "100%" } }, n));
  return el("div", { class: "layers" },
    ...rows,
    el("div", { class: "lrow" }, el("div", { class: "label" }, "coverage"), cover),
    el("div", { class: "lrow" }, el("div", { class: "label" }, "layer"), el("div", { class: "axis" }, ...ticks)));
}

function renderCard(node) {
  const rows = [
    ["layers", node.start === null ? "–" : `${node.start}:${node.end} (${node.end - node.start})`],
    ["device", node.device || "–"], ["weights", node.stored || node.dtype || "–"],
    ["decode", node.throughput ? fmt(node.throughput) + " tok/s" : "–"],
    ["prefill", node.prefill_throughput ? fmt(node.prefill_throughput, 0) + " tok/s" : "–"],
    ["load", `${fmt(node.load, 0)} session${node.load === 1 ? "" : "s"}`],
    ["free cache", node.free_cache_tokens ? node.free_cache_tokens.toLocaleString() + " tokens" : "–"],
  ];
  if (node.memory && node.memory.resident) {  // bytes by part (docs/memory.md)
    const mb = (b) => fmt((b || 0) / 1048576, 0) + " MiB";
    rows.push(["memory", `${mb(node.memory.resident)} (peak ${mb(node.memory.peak)})`]);
    rows.push(["held", `weights ${mb(node.memory.weights)}, cache ${mb(node.memory.kv_cache)}, ` +
      `runtime ${mb(node.memory.baseline)}`]);
  }
  if (node.uptime_s !== null && node.uptime_s !== undefined) rows.push(["uptime", duration(node.uptime_s)]);
  if (node.rtt_ms !== null) rows.push(["rtt", fmt(node.rtt_ms) + " ms"]);
  if (node.announced_s_ago !== null) rows.push(["announced", fmt(node.announced_s_ago, 0) + " s ago"]);
  const title = node.name || (node.node_id ? "node " + node.node_id.slice(0, 8) : node.address);
  return el("div", { class: "node-card", dataset: { address: node.address }, style: { "--c": node.color } },
    el("div", { class: "top" }, el("span", { class: "title", title: node.node_id }, title),
      el("span", { class: "badge " + node.state }, node.state)),
    el("div", { class: "addr" }, node.address),
    el("dl", {}, ...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    node.error ? el("div", { class: "err" }, node.error) : null);
}

function updateModelChoice(names) {
  const select = $("chat-model");
  const current = [...select.options].map((o) => o.value);
  if (current.join("\n") === names.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
  if (names.includes(chosen)) select.value = chosen;
}

// -- chat -------------------------------------------------------------------------------------
const history = [];
let controller = null;

function addMessage(role, text) {
  const box = $("messages");
  box.querySelector(".hint")?.remove();
  const node = el("div", { class: "msg " + role }, text);
  box.append(node);
  box.scrollTop = box.scrollHeight;
  return node;
}

function setBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

// Yields each parsed `data:` payload of a server-sent event stream, until [DONE].
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") { reader.cancel().catch(() => {}); return; }
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  const user = { role: "user", content: text };
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  const meta = el("div", { class: "msg-meta" });
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let answer = "", tokens = 0, firstAt = null, finish = null;
  try {
    const body = {
      model: $("chat-model").value, messages: [...history, user], stream: true,
      stream_options: { include_usage: true },  // the last chunk counts the tokens (a chunk may hold several)
      temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
    };
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const error = await res.json().catch(() => null);
      throw new Error(error?.error?.message || `HTTP ${res.status}`);
    }
    for await (const event of sseEvents(res.body)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices?.[0];
      const text = choice?.delta?.content;
      if (text) {
        answer += text; tokens++;
        firstAt ??= performance.now();
        out.textContent = answer;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
      if (event.usage) tokens = event.usage.completion_tokens;
    }
    history.push(user, { role: "assistant", content: answer });
    const seconds = (performance.now() - started) / 1000;
    const rate = firstAt && tokens > 1 ? ` · ${fmt((tokens - 1) / ((performance.now() - firstAt) / 1000))} tokens/s` : "";
    meta.textContent = `${tokens} tokens in ${fmt(seconds)} s${rate}` + (finish ? ` · finish: ${finish}` : "");
  } catch (error) {
    if (error.name === "AbortError") {
      meta.textContent = "stopped";
      if (answer) history.push(user, { role: "assistant", content: answer });
    } else {
      out.classList.add("error");
      out.textContent = (answer ? answer + "\n\n" : "") + "Error: " + (error.message || error);
    }
  } finally {
    out.classList.remove("streaming");
    out.dataset.done = "1";
    out.after(meta);
    controller = null;
    setBusy(false);
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || controller) return;
  $("chat-input").value = "";
  send(text);
});
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-stop").addEventListener("click", () => controller?.abort());
$("chat-clear").addEventListener("click", () => {
  controller?.abort();
  history.length = 0;
  $("messages").replaceChildren();
});

poll();
