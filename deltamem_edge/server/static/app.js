// deltamem-edge chat page: the public HTTP API, called as any client calls it (docs/server.md).
// No framework, no build step, no other origin; every text from the server or the model is shown
// with textContent, never parsed as markup.
"use strict";

const KEY = "deltamem.apiKey"; // sessionStorage: the API key, this tab only
const CURRENT = "deltamem.memory"; // localStorage: the memory id in use
const KNOWN = "deltamem.memories"; // localStorage: ids used in this browser (the picker's list)
const THREAD = "deltamem.thread."; // sessionStorage: this tab's messages, per memory id
const ID_RE = /^[A-Za-z0-9._:@+-]{1,128}$/; // the server's memory id rule
const CONTEXT_MESSAGES = 24; // resent as context; the server writes only the new turn into memory
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let model = "local";
let current = "";
let running = null; // the AbortController of the reply being streamed
let keyPrompt = null; // the open key dialog, shared by every call that got a 401
let panelSeq = 0; // the latest panel refresh; older answers are dropped

// ---- storage --------------------------------------------------------------------------------

function readJson(storage, key, fallback) {
  try {
    const value = JSON.parse(storage.getItem(key));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

function knownIds() {
  const ids = readJson(localStorage, KNOWN, []);
  return Array.isArray(ids) ? ids.filter((x) => typeof x === "string" && ID_RE.test(x)) : [];
}

function setKnownIds(ids) {
  localStorage.setItem(KNOWN, JSON.stringify(ids.slice(0, 50)));
  $("memory-ids").replaceChildren(...ids.map((id) => Object.assign(document.createElement("option"), { value: id })));
}

function thread(id) {
  const msgs = readJson(sessionStorage, THREAD + id, []);
  return Array.isArray(msgs) ? msgs : [];
}

function saveThread(id, msgs) {
  sessionStorage.setItem(THREAD + id, JSON.stringify(msgs));
}

// ---- the API ----------------------------------------------------------------------------------

// fetch with the key the user gave; a 401 asks for one (once for all waiting calls) and retries
async function api(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    const key = sessionStorage.getItem(KEY);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const resp = await fetch(path, { ...init, headers });
    if (resp.status !== 401) return resp;
    const typed = await askKey(key ? "That API key was refused." : "This server needs an API key.");
    if (typed === null) return resp;
  }
}

function askKey(reason) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const dialog = $("key-dialog");
    const done = (value) => {
      dialog.close();
      keyPrompt = null;
      resolve(value);
    };
    $("key-reason").textContent = reason;
    $("key-input").value = "";
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (key) sessionStorage.setItem(KEY, key);
      else sessionStorage.removeItem(KEY);
      done(key || null);
    };
    $("key-cancel").onclick = () => done(null);
    dialog.oncancel = (event) => {
      event.preventDefault();
      done(null);
    };
    dialog.showModal();
    $("key-input").focus();
  });
  return keyPrompt;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${resp.status} ${body.error.code || body.error.type}: ${body.error.message}`;
  } catch {
    // not JSON: the status says enough
  }
  return `HTTP ${resp.status}`;
}

// the data lines of a server-sent event stream, one string per event
async function* serverEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
        if (data.length) yield data.join("\n");
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- chat -----------------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function bubble(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function renderThread() {
  $("messages").replaceChildren();
  for (const m of thread(current)) bubble(m.role, m.content).dataset.state = m.stopped ? "stopped" : "done";
}

function setBusy(busy) {
  document.body.dataset.busy = busy ? "1" : "";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  for (const id of ["memory-id", "open-memory", "new-memory", "forget-memory"]) $(id).disabled = busy;
}

async function send(text) {
  const id = current;
  const msgs = thread(id);
  msgs.push({ role: "user", content: text });
  const userLi = bubble("user", text);
  const panel = $("panel");
  const turnsBefore = panel.dataset.memory === id ? Number(panel.dataset.turns || 0) : 0;
  const li = bubble("assistant", "");
  li.dataset.state = "streaming";
  li.dataset.chunks = "0";
  setStatus("");
  setBusy(true);
  running = new AbortController();
  let reply = "";
  let chunks = 0;
  let painted = true;
  let stopped = false;
  let failed = null;
  // at most one repaint per frame: a small model streams hundreds of pieces a second, and repainting
  // the reply for each would keep the page too busy to answer a click on Stop
  const paint = () => {
    painted = true;
    li.textContent = reply;
    li.dataset.chunks = String(chunks);
    li.scrollIntoView({ block: "end" });
  };
  try {
    const resp = await api("/v1/chat/completions", {
      method: "POST",
      signal: running.signal,
      headers: { "Content-Type": "application/json", "X-Memory-Id": id },
      body: JSON.stringify({
        model, stream: true, messages: msgs.slice(-CONTEXT_MESSAGES).map(({ role, content }) => ({ role, content })),
      }),
    });
    if (!resp.ok) {
      failed = await errorText(resp);
    } else {
      for await (const data of serverEvents(resp.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failed = `${chunk.error.code || chunk.error.type}: ${chunk.error.message}`;
          break;
        }
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (delta) {
          reply += delta;
          chunks += 1;
          if (painted) {
            painted = false;
            requestAnimationFrame(paint);
          }
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else failed = String(err.message || err);
  }
  running = null;
  paint();
  if (reply || stopped) {
    msgs.push({ role: "assistant", content: reply, stopped });
    li.dataset.state = stopped ? "stopped" : "done";
    if (stopped) setStatus("Stopped: what was generated so far is written into the memory.");
    if (failed) setStatus(failed);
  } else {
    msgs.pop(); // nothing was written: give the text back to resend
    userLi.remove();
    li.remove();
    $("prompt").value = text;
    setStatus(failed || "no reply");
  }
  saveThread(id, msgs);
  setBusy(false);
  if (stopped) refreshUntilSaved(id, turnsBefore);
  else refreshPanel();
}

// after Stop the server ends the reply and saves it a moment later: look again until the turn is there
async function refreshUntilSaved(id, turnsBefore) {
  for (let i = 0; i < 20 && current === id; i++) {
    const info = await refreshPanel();
    if (info && info.turns > turnsBefore) return;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

// ---- memory picker ----------------------------------------------------------------------------

function openMemory(id) {
  if (!ID_RE.test(id)) {
    setStatus("A memory id is 1 to 128 characters from A-Z a-z 0-9 . _ - : @ +");
    return;
  }
  current = id;
  $("memory-id").value = id;
  localStorage.setItem(CURRENT, id);
  setKnownIds([id, ...knownIds().filter((x) => x !== id)]);
  setStatus("");
  renderThread();
  refreshPanel();
}

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(4));
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

async function forgetMemory() {
  const id = current;
  if (!confirm(`Forget memory "${id}"? Its state file is deleted on the server.`)) return;
  const resp = await api(`/v1/memories/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!resp.ok && resp.status !== 404) {
    setStatus(await errorText(resp));
    return;
  }
  sessionStorage.removeItem(THREAD + id);
  setKnownIds(knownIds().filter((x) => x !== id));
  renderThread();
  setStatus(`Memory "${id}" forgotten.`);
  refreshPanel();
}

// ---- memory panel -----------------------------------------------------------------------------

const count = (n) => Number(n).toLocaleString("en-US");
const short = (x) => (Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(3));

const size = (bytes) => `${(bytes / 1024).toFixed(1)} KiB · ${count(bytes)} bytes`;

function fact(id, text, value) {
  const dd = $(id);
  dd.textContent = text;
  if (value === undefined) delete dd.dataset.value;
  else dd.dataset.value = String(value);
  if (typeof value === "string") dd.title = value;
}

// one bar per layer, scaled to the largest; each bar carries its value (data-value, and a tooltip)
function barChart(svg, values) {
  const width = 300;
  const height = 100;
  const top = Math.max(0, ...values) || 1;
  const step = width / Math.max(values.length, 1);
  const gap = Math.min(2, step * 0.2);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.replaceChildren(...values.map((v, i) => {
    const rect = document.createElementNS(SVG, "rect");
    const h = (height * v) / top;
    rect.setAttribute("x", (i * step + gap / 2).toFixed(2));
    rect.setAttribute("width", (step - gap).toFixed(2));
    rect.setAttribute("y", (height - h).toFixed(2));
    rect.setAttribute("height", h.toFixed(2));
    rect.dataset.layer = String(i);
    rect.dataset.value = String(v);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `layer ${i}: ${v}`;
    rect.append(title);
    return rect;
  }));
  return top;
}

function showPanel(id, info) {
  const panel = $("panel");
  $("panel-id").textContent = id;
  $("panel-empty").hidden = info !== null;
  for (const part of ["facts", "norms-figure", "change-figure"]) $(part).hidden = info === null;
  panel.dataset.memory = id;
  panel.dataset.turns = info ? String(info.turns) : "";
  if (info === null) return;
  fact("turns", count(info.turns), info.turns);
  fact("tokens", count(info.tokens_written), info.tokens_written);
  fact("bytes", size(info.bytes), info.bytes);
  fact("shape", `${info.layers} layers × ${info.rows} × ${info.rank}${info.resident ? " · in a sequence" : ""}`);
  fact("adapter", `${info.adapter || "-"} · ${info.adapter_fingerprint.slice(0, 12)}…`, info.adapter_fingerprint);
  fact("base", `${info.model || "-"} · ${info.model_fingerprint.slice(0, 12)}…`, info.model_fingerprint);
  fact("updated", new Date(info.updated_us / 1000).toLocaleString());
  const top = barChart($("norms-chart"), info.layer_norms);
  $("norms-max").textContent = `(layers 0–${info.layers - 1}, max ${short(top)})`;
  const last = info.last_turn;
  $("change-unknown").hidden = last !== null;
  $("change-chart").toggleAttribute("hidden", last === null); // an SVG element has no .hidden property
  if (last) {
    const most = barChart($("change-chart"), last.layer_change);
    $("change-max").textContent = `(turn ${last.turn}, max ${short(most)})`;
  } else {
    $("change-chart").replaceChildren();
    $("change-max").textContent = "";
  }
}

// the panel for the memory in use; returns its info (null: none, or a newer refresh took over)
async function refreshPanel() {
  const id = current;
  const seq = ++panelSeq;
  let resp;
  try {
    resp = await api(`/v1/memories/${encodeURIComponent(id)}`);
  } catch (err) {
    setStatus(String(err.message || err));
    return null;
  }
  if (seq !== panelSeq) return null;
  if (resp.status === 404) {
    showPanel(id, null);
    return null;
  }
  if (!resp.ok) {
    setStatus(await errorText(resp));
    return null;
  }
  const info = await resp.json();
  if (seq !== panelSeq) return null;
  showPanel(id, info);
  return info;
}

// ---- start ------------------------------------------------------------------------------------

async function loadModel() {
  const resp = await api("/v1/models");
  if (!resp.ok) {
    setStatus(await errorText(resp));
    return;
  }
  const body = await resp.json();
  model = (body.data && body.data[0] && body.data[0].id) || model;
  $("model").textContent = `· ${model}`;
}

function start() {
  $("compose").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || running) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("compose").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => running && running.abort());
  $("memory-form").addEventListener("submit", (event) => {
    event.preventDefault();
    openMemory($("memory-id").value.trim());
  });
  $("new-memory").addEventListener("click", () => openMemory(newId()));
  $("forget-memory").addEventListener("click", forgetMemory);
  $("key-button").addEventListener("click", () => askKey("API key for this server (empty: none).").then(() => {
    loadModel();
    refreshPanel();
  }));
  setBusy(false);
  const saved = localStorage.getItem(CURRENT);
  openMemory(saved && ID_RE.test(saved) ? saved : newId());
  loadModel();
}

start();
