// The localmoa console: chat with an ensemble, watch every agent write.
//
// Plain JavaScript, no build step, nothing loaded from elsewhere. The conversation lives in this
// page (the server keeps no chat state): each turn posts the whole conversation to
// /console/chat and reads the run's events from the response body as server-sent events. fetch,
// not EventSource, so that the API key can travel as an Authorization header. Model text is only
// ever set as textContent, never parsed as HTML.
"use strict";

const KEY = "localmoa.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  conversation: [], // {role, content}, every finished turn
  controller: null, // the running turn's AbortController
  panes: new Map(), // "stage:index" -> pane element
  answer: null, // the answer element of the running turn
};

class Unauthorized extends Error {}

// --- the API key ---------------------------------------------------------------------------

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function askForKey(why) {
  $("key-why").textContent = why;
  $("key-form").hidden = false;
  $("key-input").focus();
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    askForKey(await errorText(response));
    throw new Unauthorized("this server needs its API key");
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

// --- small helpers -------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function seconds(s) {
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(1)} s`;
}

function say(text) {
  $("status").textContent = text;
}

// --- ensembles -----------------------------------------------------------------------------

async function loadEnsembles() {
  const select = $("ensemble");
  const chosen = select.value;
  const response = await api("/v1/models");
  const names = (await response.json()).data.map((m) => m.id.replace(/^moa\//, ""));
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  if (names.includes(chosen)) select.value = chosen;
  $("ensemble-note").textContent = names.length ? "" : "no ensembles";
}

// --- server-sent events over fetch ---------------------------------------------------------

async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield JSON.parse(data); // lines starting ":" are keep-alive pings
    }
  }
}

// --- one turn ------------------------------------------------------------------------------

function bubble(role, text) {
  const item = el("li", { class: `turn ${role}` });
  item.append(el("span", { class: "who", text: role === "user" ? "You" : "Ensemble" }));
  const body = el("div", { class: "text", text });
  item.append(body);
  $("transcript").append(item);
  item.scrollIntoView({ block: "end" });
  return { item, body };
}

function setBusy(busy) {
  // While the answer streams, screen readers wait (aria-busy) instead of reading every token.
  $("transcript").setAttribute("aria-busy", String(busy));
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("prompt").setAttribute("aria-busy", String(busy));
}

async function send() {
  const prompt = $("prompt");
  const text = prompt.value.trim();
  const ensemble = $("ensemble").value;
  if (!text || state.controller) return;
  if (!ensemble) {
    say("No ensemble to ask: the server lists none (or needs its API key).");
    return;
  }
  const messages = [...state.conversation, { role: "user", content: text }];
  const asked = bubble("user", text);
  const answer = bubble("assistant", "");
  document.querySelector('[data-testid="answer"]')?.removeAttribute("data-testid");
  answer.body.setAttribute("data-testid", "answer");
  state.answer = answer;
  prompt.value = "";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  say(`Asking ${ensemble}…`);
  let end = null;
  try {
    const response = await api("/console/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ensemble, messages }),
      signal: controller.signal,
    });
    for await (const event of serverEvents(response)) {
      if (event.type === "end") end = event;
      handle(event);
    }
    if (end === null) throw new Error("the stream ended before the run did");
    if (end.error) throw new Error(end.error);
    state.conversation = [...messages, { role: "assistant", content: end.answer }];
    const took = end.seconds === null ? "" : ` in ${seconds(end.seconds)}`;
    const where = end.run_id ? ` · recorded as ${end.run_id}` : "";
    say(`Answered${took}: ${end.calls} calls, ${end.loads} loads${where}.`);
  } catch (error) {
    const stopped = error.name === "AbortError";
    answer.item.classList.add("failed");
    asked.item.classList.add("failed");
    if (!answer.body.textContent) answer.body.textContent = stopped ? "(stopped)" : "(no answer)";
    say(stopped ? "Stopped: the run was cancelled." : `Failed: ${error.message}`);
    if (!(error instanceof Unauthorized)) prompt.value = text; // to retry or edit
  } finally {
    state.controller = null;
    setBusy(false);
    prompt.focus();
    refreshRuns();
  }
}

function handle(event) {
  switch (event.type) {
    case "plan":
      return showPlan(event);
    case "wave":
      return showWave(event);
    case "memory":
      return showMemory(event);
    case "agent":
      return agentStarted(event);
    case "piece":
      return pane(event)?.querySelector(".text").append(event.text);
    case "answer":
      state.answer.body.append(event.text);
      return;
    case "done":
      return agentDone(event);
    case "judged":
      return judged(event);
    case "end":
      if (event.answer !== null) state.answer.body.textContent = event.answer;
      return;
  }
}

// --- the plan and the panes ----------------------------------------------------------------

function key(event) {
  return `${event.stage}:${event.index}`;
}

function pane(event) {
  return state.panes.get(key(event));
}

function showPlan(plan) {
  state.panes.clear();
  const stages = $("stages");
  stages.replaceChildren();
  const order = plan.stages.map((s) => `${s.label}: ${s.calls.map((c) => c.model).join(", ")}`);
  $("plan").replaceChildren(
    el("p", { text: `${plan.ensemble} · budget ${size(plan.budget_bytes)} (${plan.budget_source})` }),
    el("p", { class: "note", text: order.join(" → ") }),
    el("ol", { id: "waves", class: "waves", "aria-label": "Waves as they start" }),
  );
  for (const stage of plan.stages) {
    const calls = stage.calls.filter((c) => !c.final);
    if (!calls.length) continue; // the final answer streams in the conversation
    const row = el("div", { class: "panes" });
    stages.append(
      el("section", { class: "stage", "aria-label": stage.label }, el("h3", { text: stage.label }), row),
    );
    for (const call of calls) row.append(newPane(call));
  }
}

function newPane(call) {
  const pane = el("article", {
    class: `agent ${call.role} waiting`,
    "data-testid": "agent",
    "data-layer": String(call.layer),
    "data-model": call.model,
    "data-role": call.role,
    "aria-label": `${call.label}: ${call.model}`,
  });
  pane.append(
    el(
      "header",
      {},
      el("span", { class: "model", text: call.model }),
      el("span", { class: "state", text: call.role === "proposer" ? "waiting" : `${call.role} · waiting` }),
    ),
    el("div", { class: "text" }),
  );
  state.panes.set(key(call), pane);
  return pane;
}

function showWave(wave) {
  const parts = [];
  if (wave.unload.length) parts.push(`unload ${wave.unload.join(", ")}`);
  if (wave.load.length) parts.push(`load ${wave.load.join(", ")}`);
  parts.push(`${wave.resident.join(", ")} resident (${size(wave.bytes)})`);
  $("waves")?.append(el("li", { text: `wave ${wave.number + 1} · ${wave.label}: ${parts.join(" · ")}` }));
}

function showMemory(memory) {
  const meter = $("memory-meter");
  meter.max = memory.budget_bytes;
  meter.value = Math.min(memory.bytes, memory.budget_bytes);
  meter.high = memory.budget_bytes * 0.9;
  const models = Object.entries(memory.models).map(([m, b]) => `${m} ${size(b)}`);
  $("memory-text").textContent =
    `memory ${size(memory.bytes)} of ${size(memory.budget_bytes)}` +
    (models.length ? ` (${models.join(", ")})` : "") +
    ` — ${memory.cause}`;
}

function agentStarted(call) {
  if (call.final) {
    state.answer.item.querySelector(".who").textContent = `Ensemble · ${call.label}: ${call.model}`;
    return;
  }
  const found = pane(call) ?? newPane(call);
  found.classList.replace("waiting", "writing");
  found.querySelector(".state").textContent = call.role === "proposer" ? "writing…" : `${call.role} · writing…`;
}

function agentDone(done) {
  if (done.final) return;
  const found = pane(done);
  if (!found) return;
  found.classList.remove("waiting", "writing");
  found.classList.add(done.ok ? "ok" : "failed");
  const speed = done.decode_tok_s ? ` · ${done.decode_tok_s.toFixed(0)} tok/s` : "";
  found.querySelector(".state").textContent = done.ok
    ? `${done.tokens} tokens · ${seconds(done.seconds)}${speed}`
    : `failed: ${done.error}`;
}

function judged(verdict) {
  const found = state.panes.get(`${verdict.stage}:0`);
  if (!found) return;
  let note = `kept answers ${verdict.selected.join(", ")}`;
  if (verdict.skipped.length) note += `; early stop skipped layers ${verdict.skipped.join(", ")}`;
  found.append(el("p", { class: "verdict", text: note }));
}

// --- past runs -----------------------------------------------------------------------------

async function refreshRuns() {
  if (!$("runs").open) return;
  let page;
  try {
    page = await (await api("/console/runs")).json();
  } catch (error) {
    $("runs-note").textContent = error.message;
    return;
  }
  $("runs-note").textContent = page.message ?? "";
  $("runs-list").replaceChildren(
    ...page.runs.map((run) => {
      const took = run.seconds === null ? "running" : seconds(run.seconds);
      const label = `${run.started.replace("T", " ").slice(0, 19)} · ${run.ensemble} · ${run.status} · ${took}`;
      const button = el("button", { type: "button", class: "run-link" });
      button.append(el("span", { text: label }), el("span", { class: "note", text: run.prompt ?? "" }));
      button.addEventListener("click", () => showRun(run.id));
      return el("li", {}, button);
    }),
  );
}

async function showRun(id) {
  const box = $("run-detail");
  let run;
  try {
    run = await (await api(`/console/runs/${encodeURIComponent(id)}`)).json();
  } catch (error) {
    box.replaceChildren(el("p", { text: error.message }));
    return;
  }
  const parts = [el("h3", { text: `Run ${run.id} · ${run.ensemble} · ${run.status}` })];
  if (run.error) parts.push(el("p", { class: "failed", text: run.error }));
  const byLayer = new Map();
  for (const call of run.calls) {
    if (!byLayer.has(call.layer)) byLayer.set(call.layer, []);
    byLayer.get(call.layer).push(call);
  }
  for (const [layer, calls] of byLayer) {
    const aggregating = calls.every((call) => call.role === "aggregator");
    parts.push(el("h4", { text: aggregating ? "aggregator" : `layer ${layer}` }));
    for (const call of calls) {
      const head = `${call.role} · ${call.model} · ${call.ok ? "ok" : "failed"} · ${call.tokens_out} tokens · ${seconds(call.seconds)}`;
      const details = el("details", {}, el("summary", { text: head }));
      details.append(el("div", { class: "text", text: call.text ?? call.error ?? "(text not recorded)" }));
      parts.push(details);
    }
  }
  if (run.answer !== null) parts.push(el("h4", { text: "answer" }), el("div", { class: "text", text: run.answer }));
  box.replaceChildren(...parts);
  box.focus();
}

// --- wiring --------------------------------------------------------------------------------

async function boot() {
  try {
    await loadEnsembles();
    say("");
  } catch (error) {
    if (!(error instanceof Unauthorized)) say(`Could not list ensembles: ${error.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("clear").addEventListener("click", () => {
    if (state.controller) return;
    state.conversation = [];
    $("transcript").replaceChildren();
    say("New chat: the next message starts a new conversation.");
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-form").hidden = true;
    boot().then(refreshRuns);
  });
  $("key-change").addEventListener("click", () => askForKey("Enter the server's API key."));
  $("runs").addEventListener("toggle", refreshRuns);
  boot();
});
