// The CY-LLM console: a client of the gateway's public API only (the same routes a
// script uses), with the caller's API key or JWT kept in this tab's session storage.
// Every text from the server goes into the page as text (textContent), never as HTML.
"use strict";

const KEY = "cyllm.key";
const CHATS = "cyllm.chats";  // this tab's conversations: they survive a reload
const MAX_CHATS = 20;
const state = { key: null, admin: false, timers: [], jobStream: null, chats: [], chat: [], chatAbort: null,
                runs: new Set() };
const $ = (id) => document.getElementById(id);

// -- the API ------------------------------------------------------------------------------

function authHeaders(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = body && body.error;
    super(e ? `${e.message}${e.param ? ` (${e.param})` : ""}` : `HTTP ${status}`);
    this.status = status;
  }
}

async function api(method, path, body, { form = false, okStatuses = [] } = {}) {
  const init = { method, headers: authHeaders() };
  if (body !== undefined) {
    if (form) init.body = body;
    else { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  }
  const reply = await fetch(path, init);
  const text = await reply.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!reply.ok && !okStatuses.includes(reply.status)) throw new ApiError(reply.status, data);
  return data;
}

// Server-sent events over fetch (EventSource cannot send an Authorization header).
async function* events(path, init = {}) {
  const reply = await fetch(path, { ...init, headers: authHeaders(init.headers || {}) });
  if (!reply.ok) {
    let body = null;
    try { body = await reply.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(reply.status, body);
  }
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", name = "message";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) {
        const data = line.slice(5).trim();
        yield [name, data === "[DONE]" ? data : JSON.parse(data)];
      } else if (line === "") name = "message";
    }
  }
}

// -- small DOM helpers --------------------------------------------------------------------

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell); else td.textContent = cell ?? "";
    tr.append(td);
  }
  return tr;
}

function button(label, onClick, cls = "secondary") {
  const b = el("button", label, { type: "button", class: cls });
  b.addEventListener("click", onClick);
  return b;
}

function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function bytes(n) { return n ? `${(n / 2 ** 20).toFixed(0)} MiB` : ""; }
function when(seconds) { return seconds ? new Date(seconds * 1000).toLocaleString() : ""; }

function chart(container, series, height = 220) {
  const width = Math.max(320, container.clientWidth || 480);
  const x = series.range ? { time: series.time, range: () => series.range } : { time: series.time };
  const opts = { width, height, scales: { x },
                 series: [{}, ...series.lines], axes: [{}, {}] };
  container.replaceChildren();
  return new uPlot(opts, series.data, container);
}

// -- log in -------------------------------------------------------------------------------

async function logIn(key) {
  state.key = key || null;
  await api("GET", "/v1/models");  // 401 for a bad key
  try { await api("GET", "/admin/keys"); state.admin = true; } catch (_) { state.admin = false; }
  sessionStorage.setItem(KEY, key || "");
  for (const node of document.querySelectorAll(".admin-only")) node.hidden = !state.admin;
  $("who").textContent = state.key ? (state.admin ? "admin" : "signed in") : "authentication off";
  $("who").classList.toggle("bad", !state.key);
  $("logout").hidden = !state.key;
  $("keys-auth-off").hidden = Boolean(state.key);
  if (!location.hash || location.hash === "#login") location.hash = "#playground";
  else route();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  const key = $("login-key").value.trim();
  try { await logIn(key); }
  catch (e) {
    $("login-error").textContent = !key && e.status === 401
      ? "This server needs an API key (cy_…) or a JWT: ask its administrator for one." : e.message;
    state.key = null;
  }
});

$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(CHATS);  // the next user of this tab starts conversations of their own
  state.key = null; state.admin = false;
  location.hash = "#login";
  location.reload();
});

// -- pages --------------------------------------------------------------------------------

const pages = { playground: showPlayground, models: showModels, cluster: showCluster,
                training: showTraining, keys: showKeys, usage: showUsage };

function route() {
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  if (state.jobStream) { state.jobStream.abort(); state.jobStream = null; }
  let page = (location.hash || "#playground").slice(1);
  if (sessionStorage.getItem(KEY) === null) page = "login";
  if (page === "keys" && !state.admin) page = "playground";
  if (!(page in pages) && page !== "login") page = "playground";
  for (const section of document.querySelectorAll("section.page")) section.hidden = section.id !== page;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  if (page !== "login") pages[page]().catch((e) => console.error(e));
}
window.addEventListener("hashchange", route);

async function servedModels() {
  const { data } = await api("GET", "/v1/models");
  state.contexts = Object.fromEntries(data.map((m) => [m.id, m.max_model_len]));
  return data.map((m) => m.id);
}

function boundMaxTokens() {  // an answer cannot be longer than the model's context
  const context = (state.contexts || {})[$("pg-model").value];
  $("pg-max-tokens").max = context || 131072;
  if (context && Number($("pg-max-tokens").value) > context) $("pg-max-tokens").value = context;
}
$("pg-model").addEventListener("change", boundMaxTokens);

function fillSelect(select, values, keep) {
  const current = keep ?? select.value;
  select.replaceChildren(...values.map((v) => el("option", v, { value: v })));
  if (values.includes(current)) select.value = current;
}

// Playground --------------------------------------------------------------------------------

async function showPlayground() {
  const models = await servedModels();
  fillSelect($("pg-model"), models, state.wantedModel);
  const compare = $("pg-compare");
  const keep = state.wantedCompare ?? compare.value;
  compare.replaceChildren(el("option", "(no comparison)", { value: "" }),
                          ...models.map((m) => el("option", m, { value: m })));
  compare.value = models.includes(keep) ? keep : "";
  state.wantedModel = state.wantedCompare = undefined;
  boundMaxTokens();
  showHistory();
  if (!$("chat-log").childElementCount) showChat();
}

function addMessage(role, text) {
  const div = el("div", undefined, { class: `msg ${role}` });
  div.append(el("span", role, { class: "role" }), el("span", text, { class: "text" }));
  $("chat-log").append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div.querySelector(".text");
}

// Two models' answers to the same turn, side by side, each under its model's name.
function addPair(models) {
  const div = el("div", undefined, { class: "msg assistant pair" });
  const nodes = models.map((model) => {
    const column = el("div", undefined, { class: "side" });
    column.append(el("span", model, { class: "role" }), el("span", "", { class: "text" }));
    div.append(column);
    return column.querySelector(".text");
  });
  $("chat-log").append(div);
  return nodes;
}

// Conversations: a list in this tab's session storage, newest first, MAX_CHATS at most.
function newConversation() {
  const chat = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), messages: [] };
  state.chats.unshift(chat);
  state.chats = state.chats.slice(0, MAX_CHATS);
  return chat;
}

function currentConversation() {
  if (!state.chats.length) newConversation();
  const found = state.chats.find((c) => c.id === state.current) || state.chats[0];
  state.current = found.id;
  return found;
}

function showHistory() {
  const current = currentConversation();
  state.chat = current.messages;
  $("chat-history").replaceChildren(...state.chats.map((c) => {
    const first = c.messages.find((m) => m.role === "user");
    const title = first ? first.content.replace(/\s+/g, " ").slice(0, 48) : "New conversation";
    return el("option", title, { value: c.id });
  }));
  $("chat-history").value = current.id;
}

$("chat-history").addEventListener("change", () => {
  if (state.chatAbort) return;
  state.current = $("chat-history").value;
  showHistory(); showChat(); $("chat-error").hidden = true; $("chat-stats").textContent = "";
});
$("chat-delete").addEventListener("click", () => {
  if (state.chatAbort) return;
  state.chats = state.chats.filter((c) => c.id !== state.current);
  state.current = undefined;
  saveChat(); showHistory(); showChat();
});

// An answer's text, its fenced code blocks (```) as code with a Copy button: built from
// text nodes only, so nothing a model writes is ever read as HTML.
function render(node, text) {
  node.replaceChildren();
  const parts = text.split(/^```[^\n]*\n?/m);
  parts.forEach((part, i) => {
    if (i % 2 === 0) { if (part) node.append(document.createTextNode(part)); return; }
    const block = el("div", undefined, { class: "code" });
    const code = el("pre", part.replace(/\n$/, ""));
    const copy = button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(code.textContent));
    block.append(copy, code);
    node.append(block);
  });
}

function showChat() {
  $("chat-log").replaceChildren();
  for (const m of state.chat) {
    if (m.compare) {
      const [a, b] = addPair([m.model, m.compare.model]);
      render(a, m.content); render(b, m.compare.content);
    } else render(addMessage(m.role, ""), m.content);
  }
}

function saveChat() {  // best effort: a full storage never fails the chat itself
  try { sessionStorage.setItem(CHATS, JSON.stringify({ chats: state.chats, current: state.current })); }
  catch (e) { console.warn(e); }
}

function number(id) {  // a setting left empty: the model's own default
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

// One model's answer streamed into ``node``: its text, usage and when its first token came.
async function streamAnswer(model, messages, node, signal) {
  const body = { model, messages, stream: true, stream_options: { include_usage: true },
                 temperature: number("pg-temperature"), top_p: number("pg-top-p"),
                 max_tokens: number("pg-max-tokens"), seed: number("pg-seed") };
  const stop = $("pg-stop").value.trim();
  if (stop) body.stop = [stop];
  let usage = null, first = null;
  for await (const [, data] of events("/v1/chat/completions", {
    method: "POST", body: JSON.stringify(body), signal, headers: { "Content-Type": "application/json" } })) {
    if (data === "[DONE]") break;
    if (data.error) throw new ApiError(500, data);
    if (data.usage) usage = data.usage;
    for (const choice of data.choices || []) {
      const piece = choice.delta.content || "";
      if (piece && first === null) first = performance.now();
      node.textContent += piece;
    }
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
  }
  return { usage, first };
}

async function send(retry) {
  const text = retry ?? $("chat-input").value.trim();
  if (!text || state.chatAbort) return;
  if (retry === undefined) $("chat-input").value = "";  // a retry keeps what was typed since
  $("chat-error").hidden = true;
  const model = $("pg-model").value, compare = $("pg-compare").value;
  state.chat.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const outs = compare ? addPair([model, compare]) : [addMessage("assistant", "")];
  const system = $("pg-system").value.trim();
  // Each model sees its own earlier answers.
  const history = (side) => [...(system ? [{ role: "system", content: system }] : []),
    ...state.chat.map((m) => ({ role: m.role, content: side && m.compare ? m.compare.content : m.content }))];
  state.chatAbort = new AbortController();
  $("chat-send").disabled = true; $("chat-stop").disabled = false;
  const started = performance.now();
  $("chat-stats").textContent = "…";
  const answer = () => ({ role: "assistant", content: outs[0].textContent, model,
                          ...(compare ? { compare: { model: compare, content: outs[1].textContent } } : {}) });
  try {
    const results = await Promise.all(outs.map((node, side) =>
      streamAnswer(side ? compare : model, history(side), node, state.chatAbort.signal)));
    state.chat.push(answer());
    outs.forEach((node) => render(node, node.textContent));
    saveChat(); showHistory();
    const { usage, first } = results[0];
    if (usage && first !== null) {
      const seconds = (performance.now() - first) / 1000;
      $("chat-stats").textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens · ` +
        `TTFT ${Math.round(first - started)} ms · ${(usage.completion_tokens / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s`;
    } else $("chat-stats").textContent = "";
  } catch (e) {
    if (e.name === "AbortError") {  // stopped: what came so far is the answer
      state.chat.push(answer());
      saveChat();
      $("chat-stats").textContent = "stopped";
    } else {  // failed: the turn is dropped, the error is a banner with Retry
      state.chatAbort.abort();  // the other side of a comparison too
      state.chat.pop();
      asked.parentNode.remove();
      outs[0].closest(".msg").remove();
      $("chat-error-text").textContent = e.message;
      $("chat-error").hidden = false;
      state.retry = text;
      $("chat-stats").textContent = "";
    }
  } finally {
    state.chatAbort = null;
    $("chat-send").disabled = false; $("chat-stop").disabled = true;
  }
}

$("chat-form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
});
$("chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
$("chat-reset").addEventListener("click", () => {
  if (state.chatAbort) return;
  const current = currentConversation();
  if (current.messages.length) state.current = newConversation().id;  // an empty one is reused
  saveChat(); showHistory(); $("chat-log").replaceChildren(); $("chat-stats").textContent = "";
  $("chat-error").hidden = true;
});
$("chat-retry").addEventListener("click", () => send(state.retry));

// Models ------------------------------------------------------------------------------------

// Each action redraws the page and then says what went wrong, if anything: the message is
// shown by the redraw, not before it (a redraw would wipe it).
async function showModels(message = "") {
  $("models-error").textContent = message;
  const [{ models }, { aliases }] = await Promise.all([api("GET", "/api/v1/models"),
                                                       api("GET", "/api/v1/aliases")]);
  const act = (call) => async (event) => {
    event.target.disabled = true;
    let said = "";
    try { await call(); } catch (e) { said = e.message; }
    showModels(said);
  };
  fill($("models-table").querySelector("tbody"), models.map((m) => {
    const loss = m.evaluation && m.evaluation.eval_loss;
    const kind = el("span", m.kind || "");
    if (m.jobId) {  // the job that made it, one click away
      const link = el("a", m.jobId, { href: "#training" });
      link.addEventListener("click", () => { state.openJob = m.jobId; });
      kind.append(" · ", link);
    }
    const cells = [m.id, m.state, m.engine, m.device, m.contextLength, bytes(m.memoryBytes), m.base,
                   kind, loss === undefined || loss === null ? "" : loss.toFixed(4),
                   (m.aliases || []).join(", ")];
    const actions = el("span");
    if (state.admin) {
      const verb = m.state === "loaded" ? "unload" : "load";
      actions.append(button(verb === "load" ? "Load" : "Unload",
                            act(() => api("POST", `/api/v1/models/${encodeURIComponent(m.id)}/${verb}`))));
    }
    if (m.kind && m.owner) {  // made here, and the caller's (or an admin's): export, delete
      actions.append(button("Export", () => exportModel(m.id).catch((e) => {
        $("models-error").textContent = e.message;
      })));
      if (state.admin) {  // share it with every tenant, or take it back
        const shared = (m.publishedTo || []).includes("*");
        actions.append(button(shared ? "Withdraw" : "Publish", act(() => api(
          "POST", `/api/v1/models/${encodeURIComponent(m.id)}/publish`, { everyone: true, withdraw: shared }))));
      }
      const remove = act(() => api("DELETE", `/api/v1/models/${encodeURIComponent(m.id)}`));
      actions.append(button("Delete", (event) => {
        if (confirm(`Delete ${m.id} and its files?`)) remove(event);
      }, "danger"));
    }
    cells.push(actions);
    return row(cells);
  }));
  fill($("aliases-table").querySelector("tbody"), aliases.map((a) => row([a.name, a.model, el("span")])));
  for (const [i, a] of aliases.entries()) {
    const cell = $("aliases-table").querySelectorAll("tbody tr")[i].lastChild.firstChild;
    const name = encodeURIComponent(a.name);
    cell.append(button("Roll back", act(() => api("POST", `/api/v1/aliases/${name}/rollback`))),
                button("Delete", act(() => api("DELETE", `/api/v1/aliases/${name}`)), "danger"));
  }
  fillSelect($("alias-model"), models.map((m) => m.id), $("alias-model").value);
}

// A download that carries the key: fetched, then handed to the browser as a file.
async function download(path, filename) {
  const reply = await fetch(path, { headers: authHeaders() });
  if (!reply.ok) {
    let body = null;
    try { body = JSON.parse(await reply.text()); } catch (_) { /* not the error shape */ }
    throw new ApiError(reply.status, body);
  }
  const link = el("a", null, { href: URL.createObjectURL(await reply.blob()), download: filename });
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

function exportModel(id) {
  return download(`/api/v1/models/${encodeURIComponent(id)}/export`, `${id.replace(/[^A-Za-z0-9._-]/g, "_")}.tar`);
}

$("alias-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("alias-name").value.trim();
  let said = "";
  try {
    await api("PUT", `/api/v1/aliases/${encodeURIComponent(name)}`, { model: $("alias-model").value });
    $("alias-name").value = "";
  } catch (e) { said = e.message; }
  showModels(said);
});

// Cluster -----------------------------------------------------------------------------------

async function showCluster() {
  await refreshCluster();
  state.timers.push(setInterval(() => refreshCluster().catch(console.error), 5000));
}

async function refreshCluster() {
  const health = await api("GET", "/api/v1/health", undefined, { okStatuses: [503] });
  const badge = $("cluster-status");
  badge.textContent = health.status; badge.className = `badge ${health.status}`;
  fill($("coordinators-table").querySelector("tbody"), health.coordinators.map((c) => row([
    c.address, c.reachable ? "yes" : "no", c.backend, `${c.queueDepth} / ${c.queueCapacity}`,
    `${c.cacheHits} / ${c.cacheMisses}`])));
  fill($("workers-table").querySelector("tbody"), health.workers.map((w) => {
    const h = el("span", w.healthy ? "healthy" : `unhealthy: ${w.unhealthyReason || "no reason given"}`,
                 { class: w.healthy ? "good" : "bad" });
    if (w.trainingJob) {  // training: say so, and whether it serves meanwhile
      h.append(el("span", ` · training ${w.trainingJob}` +
                  (w.trainingSharesDevice === false ? " (not serving until it ends)" : " (serving beside it)"),
                  { class: "muted" }));
    }
    return row([w.id, h, `${w.outstanding} / ${w.capacity}`, (w.models || []).join(", "), w.device]);
  }));
  const stats = await api("GET", "/api/v1/stats");
  const t = stats.buckets.map((b) => b.start);
  const lines = (label, stroke) => [{ label, stroke, width: 2, spanGaps: false }];
  const traffic = stats.buckets.some((b) => b.tokensPerSecond || b.ttftP50Ms);
  for (const id of ["chart-tokens", "chart-ttft"]) {
    if (!traffic) $(id).replaceChildren(el("p", "No traffic yet in the last 10 minutes.", { class: "empty-chart" }));
  }
  if (!traffic) return;
  chart($("chart-tokens"), { time: true, lines: lines("tokens/s", "#2f5fd0"),
                             data: [t, stats.buckets.map((b) => b.tokensPerSecond)] });
  chart($("chart-ttft"), { time: true, lines: lines("TTFT p50 ms", "#b36b00"),
                           data: [t, stats.buckets.map((b) => b.ttftP50Ms)] });
}

// Fine-tuning -------------------------------------------------------------------------------

async function showTraining() {
  await refreshFiles();
  await refreshJobs();
  if (state.openJob) { openJob(state.openJob); state.openJob = undefined; }
  state.timers.push(setInterval(() => refreshJobs().catch(console.error), 5000));
}

async function refreshFiles() {
  const [models, files] = await Promise.all([servedModels(), api("GET", "/v1/files")]);
  fillSelect($("job-model"), models.filter((m) => !m.includes(":")));
  // Every file of the caller's (datasets, batches and their results), newest first, with Delete.
  const all = [...files.data].sort((a, b) => b.created_at - a.created_at);
  fill($("files-table").querySelector("tbody"), all.map((f) => row([
    `${f.filename} (${f.id})`, f.purpose, f.bytes < 1024 ? `${f.bytes} B` : `${(f.bytes / 1024).toFixed(1)} KiB`,
    when(f.created_at), button("Delete", async () => {
      if (!confirm(`Delete ${f.filename}?`)) return;
      $("files-error").textContent = "";
      try { await api("DELETE", `/v1/files/${encodeURIComponent(f.id)}`); }
      catch (e) { $("files-error").textContent = e.message; }
      refreshFiles().catch((e) => { $("files-error").textContent = e.message; });
    }, "danger")])));
  const datasets = files.data.filter((f) => f.purpose === "fine-tune")
    .sort((a, b) => b.created_at - a.created_at);  // the newest first
  for (const [select, none] of [[$("job-file"), false], [$("job-validation"), true]]) {
    const current = select.value;
    const options = datasets.map((f) => el("option", `${f.filename} (${f.id})`, { value: f.id }));
    if (none) options.unshift(el("option", "(none)", { value: "" }));
    select.replaceChildren(...options);
    // what was chosen stays; else the newest upload (validation: none)
    select.value = [...select.options].some((o) => o.value === current) ? current : (none ? "" : select.options[0]?.value ?? "");
  }
}

async function refreshJobs() {
  const { jobs } = await api("GET", "/api/v1/training/jobs?limit=50");
  fill($("jobs-table").querySelector("tbody"), jobs.map((j) => {
    const tick = el("input", null, { type: "checkbox", "aria-label": `compare ${j.id}` });
    tick.checked = state.runs.has(j.id);
    tick.addEventListener("click", (event) => event.stopPropagation());
    tick.addEventListener("change", () => {
      if (tick.checked) state.runs.add(j.id); else state.runs.delete(j.id);
      drawRuns().catch(console.error);
    });
    const tr = row([tick, j.id, j.state, j.baseModel, j.progress ? `${j.progress.step}/${j.progress.totalSteps}` : ""]);
    tr.className = `selectable${state.job === j.id ? " selected" : ""}`;
    tr.addEventListener("click", () => openJob(j.id));
    return tr;
  }));
}

// The training loss of every run ticked, on one chart (steps on a shared axis).
const RUN_COLOURS = ["#2f5fd0", "#b36b00", "#1e7a3c", "#b3261e", "#7b3fb3", "#00838f"];
async function drawRuns() {
  const ids = [...state.runs];
  $("runs").hidden = ids.length === 0;
  if (!ids.length) return;
  const curves = await Promise.all(ids.map(async (id) => {
    const { data } = await api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?limit=1000`);
    const loss = new Map();
    for (const e of data) if (e.type === "metrics" && e.data && e.data.train_loss != null) loss.set(e.data.step, e.data.train_loss);
    return loss;
  }));
  const steps = [...new Set(curves.flatMap((c) => [...c.keys()]))].sort((a, b) => a - b);
  chart($("chart-runs"), { time: false,
    lines: ids.map((id, i) => ({ label: id, stroke: RUN_COLOURS[i % RUN_COLOURS.length], width: 2, spanGaps: true })),
    data: [steps, ...curves.map((c) => steps.map((s) => c.get(s) ?? null))] });
  $("chart-runs").dataset.runs = String(ids.length);
  $("chart-runs").dataset.points = String(steps.length);
}

// The dataset's first examples, read in the browser before it is sent; the server reads
// all of it on upload and names the line of the first error.
$("ds-file").addEventListener("change", async () => {
  const file = $("ds-file").files[0];
  $("ds-result").textContent = ""; $("ds-result").className = "";
  $("ds-upload").disabled = !file;
  const preview = $("ds-preview");
  preview.replaceChildren();
  if (!file) return;
  const head = await file.slice(0, 65536).text();
  if (/\.jsonl$/i.test(file.name)) {
    const lines = head.split("\n").filter((l) => l.trim()).slice(0, 5);
    lines.forEach((line, i) => {
      try {
        const record = JSON.parse(line);
        const turns = (record.messages || []).map((m) => `${m.role}: ${m.content}`).join("\n");
        preview.append(el("div", `line ${i + 1}\n${turns || JSON.stringify(record)}`));
      } catch (_) {
        preview.append(el("div", `line ${i + 1}: not JSON: ${line.slice(0, 200)}`, { class: "bad" }));
      }
    });
  } else preview.append(el("div", head.slice(0, 1200)));
});

$("ds-upload").addEventListener("click", async () => {
  const file = $("ds-file").files[0];
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file);
  $("ds-upload").disabled = true;
  try {
    const uploaded = await api("POST", "/v1/files", form, { form: true });
    $("ds-result").textContent = `uploaded ${uploaded.filename} as ${uploaded.id}`;
    $("ds-result").className = "good";
    await refreshFiles();
    $("job-file").value = uploaded.id;
  } catch (e) {
    $("ds-result").textContent = e.message; $("ds-result").className = "error";
  } finally { $("ds-upload").disabled = false; }
});

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("job-error").textContent = "";
  const body = { baseModel: $("job-model").value, fileId: $("job-file").value, method: $("job-method").value,
                 batchSize: Number($("job-batch").value) };
  if ($("job-steps").value) body.maxSteps = Number($("job-steps").value);
  if ($("job-epochs").value) body.epochs = Number($("job-epochs").value);
  if ($("job-max-length").value) body.maxLength = Number($("job-max-length").value);
  const options = {};
  if ($("job-rank").value) options.r = Number($("job-rank").value);
  if ($("job-alpha").value) options.lora_alpha = Number($("job-alpha").value);
  if (Object.keys(options).length) {
    if (!["lora", "dora", "pissa"].includes(body.method)) {  // the others name them otherwise
      $("job-error").textContent = "LoRA rank and alpha apply to lora, dora and pissa";
      return;
    }
    body.options = options;
  }
  if ($("job-validation").value) body.validationFileId = $("job-validation").value;
  if ($("job-lr").value) body.learningRate = Number($("job-lr").value);
  if ($("job-suffix").value) body.suffix = $("job-suffix").value;
  if ($("job-promote").value) body.promoteTo = $("job-promote").value.trim();
  try {
    const job = await api("POST", "/api/v1/training/start", body);
    await refreshJobs();
    openJob(job.id);
  } catch (e) { $("job-error").textContent = e.message; }
});

async function openJob(id) {
  if (state.jobStream) state.jobStream.abort();
  state.job = id;
  const job = await api("GET", `/api/v1/training/status/${encodeURIComponent(id)}`);
  $("job-detail").hidden = false;
  $("job-title").textContent = `${job.id}: ${job.method} on ${job.baseModel}`;
  const points = new Map();  // step -> [train loss, eval loss]
  const draw = () => {
    const steps = [...points.keys()].sort((a, b) => a - b);
    state.lossChart = chart($("chart-loss"), { time: false,
      lines: [{ label: "train loss", stroke: "#2f5fd0", width: 2 },
              { label: "eval loss", stroke: "#b36b00", width: 2, points: { show: true }, spanGaps: true }],
      data: [steps, steps.map((s) => points.get(s)[0]), steps.map((s) => points.get(s)[1])] });
    $("chart-loss").dataset.points = String(steps.length);
  };
  const describe = (j) => {
    const p = j.progress;
    $("job-state").textContent = `${j.state}` + (p ? ` · step ${p.step}/${p.totalSteps}` : "") +
      (p && p.loss != null ? ` · loss ${p.loss.toFixed(4)}` : "") +
      (p && p.evalLoss != null ? ` · eval loss ${p.evalLoss.toFixed(4)}` : "") +
      (p && j.state === "running" && p.etaS ? ` · ${Math.round(p.etaS)} s left` : "") +
      (j.error ? ` · ${j.error.message}` : "");
    const scores = Object.entries(j.evaluation || {}).map(([k, v]) => `${k} ${v.toFixed(4)}`);
    $("job-promotion").textContent = [j.promotion, ...scores].filter(Boolean).join(" · ");
    $("job-cancel").hidden = ["succeeded", "failed", "cancelled"].includes(j.state);
    $("job-open").hidden = !j.fineTunedModel;
    $("job-open").onclick = () => {  // the result beside its base, side by side
      state.wantedModel = j.fineTunedModel; state.wantedCompare = j.baseModel;
      location.hash = "#playground";
    };
  };
  let current = job;  // what the page shows: live progress on top of the last status
  describe(job);
  const spec = job.spec || {};
  $("job-params").textContent = ["method", "epochs", "max_steps", "batch_size", "learning_rate", "max_length",
                                 "objective", "options"]
    .filter((k) => spec[k] !== undefined && spec[k] !== null)
    .map((k) => `${k} ${typeof spec[k] === "object" ? JSON.stringify(spec[k]) : spec[k]}`).join(" · ");
  const showEvents = () => api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?limit=100`)
    .then(({ data }) => state.job === id && $("job-events").replaceChildren(...data.reverse().map((e) =>
      el("div", `${new Date(e.created_at * 1000).toLocaleTimeString()} ${e.message}`))))
    .catch(console.error);
  showEvents();
  $("job-checkpoints").replaceChildren(...job.checkpoints.map((c) => el("li", `step ${c.step}: ${c.path}`)));
  $("job-cancel").onclick = async () => {
    try { describe(await api("POST", `/api/v1/training/cancel/${encodeURIComponent(id)}`)); }
    catch (e) { $("job-state").textContent = e.message; }
  };
  draw();
  const abort = new AbortController();
  state.jobStream = abort;
  try {
    for await (const [name, data] of events(`/api/v1/training/stream/${encodeURIComponent(id)}`,
                                            { signal: abort.signal })) {
      if (name === "metrics") {
        const p = data.progress;
        points.set(p.step, [p.loss, (points.get(p.step) || [null, null])[1]]);
        draw();
        if (state.job !== id) return;  // another job was opened meanwhile
        const known = Object.fromEntries(Object.entries(p).filter(([, v]) => v !== null && v !== undefined));
        current = { ...current, state: "running", progress: { ...(current.progress || {}), ...known } };
        describe(current);
      } else if (name === "eval") {
        points.set(data.step, [(points.get(data.step) || [null, null])[0], data.evalLoss]);
        draw();
      } else if (name === "checkpoint") {
        $("job-checkpoints").append(el("li", `step ${data.checkpoint.step}: ${data.checkpoint.path}`));
      } else if (name === "state") {
        current = await api("GET", `/api/v1/training/status/${encodeURIComponent(id)}`);
        describe(current);
        showEvents();
        refreshJobs().catch(console.error);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("job-state").textContent = e.message;
  }
}

// Keys --------------------------------------------------------------------------------------

async function showKeys() {
  $("keys-error").textContent = "";
  const since = Math.floor(Date.now() / 1000) - 30 * 86400;
  const [{ keys }, usage] = await Promise.all([api("GET", "/admin/keys"),
    api("GET", `/api/v1/usage?group_by=day,subject&from=${since}`).catch(() => null)]);
  const tokens = {}, last = {};  // per caller: tokens over 30 days, the last day it was used
  for (const u of usage ? usage.data : []) {
    tokens[u.subject] = (tokens[u.subject] || 0) + u.totalTokens;
    if (!last[u.subject] || u.start > last[u.subject]) last[u.subject] = u.start;
  }
  const shown = keys.filter((k) => !k.revoked || $("keys-revoked").checked);
  fill($("keys-table").querySelector("tbody"), shown.map((k) => row([
    k.key_id, k.name, k.models ? k.models.join(", ") : "all", k.admin ? "yes" : "",
    when(k.created), when(k.expires_at) || "never", k.revoked ? "revoked" : (k.expires_at && k.expires_at * 1000 < Date.now() ? "expired" : "active"),
    !usage ? "(usage unavailable)" : last[`key:${k.key_id}`] ? last[`key:${k.key_id}`].slice(0, 10) : "not in 30 days",
    usage ? (tokens[`key:${k.key_id}`] || 0).toLocaleString() : "", budgetCell(k),
    k.revoked ? "" : button("Revoke", async () => {
      try { await api("DELETE", `/admin/keys/${encodeURIComponent(k.key_id)}`); }
      catch (e) { $("keys-error").textContent = e.message; }
      showKeys();
    })])));
}

function budgetText(b) {
  if (!b) return "none";
  const parts = [];
  if (b.tokens_per_day) parts.push(`${b.tokens_per_day.toLocaleString()}/day`);
  if (b.tokens_per_month) parts.push(`${b.tokens_per_month.toLocaleString()}/month`);
  if (b.device_seconds_per_month) parts.push(`${b.device_seconds_per_month} training s/month`);
  return parts.join(" · ") || "none";
}

// A key's budget, edited in place: tokens per day and per month (both empty: no budget).
function budgetCell(k) {
  const cell = el("span", budgetText(k.budget) + " ");
  if (k.revoked) return cell;
  cell.append(button("Edit", () => {
    const day = el("input", null, { type: "number", min: "1", placeholder: "tokens/day", class: "budget-day" });
    const month = el("input", null, { type: "number", min: "1", placeholder: "tokens/month", class: "budget-month" });
    day.value = (k.budget && k.budget.tokens_per_day) || "";
    month.value = (k.budget && k.budget.tokens_per_month) || "";
    const save = button("Save", async () => {
      const budget = { ...(k.budget || {}) };
      delete budget.tokens_per_day; delete budget.tokens_per_month;
      if (day.value) budget.tokens_per_day = Number(day.value);
      if (month.value) budget.tokens_per_month = Number(month.value);
      const path = `/admin/keys/${encodeURIComponent(k.key_id)}/budget`;
      const limits = Object.keys(budget).filter((name) => name !== "warn_at");
      try { await (limits.length ? api("PUT", path, budget) : api("DELETE", path)); }
      catch (e) { $("keys-error").textContent = e.message; return; }
      showKeys();
    }, "");
    cell.replaceChildren(day, month, save);
  }));
  return cell;
}

$("keys-revoked").addEventListener("change", () => showKeys());
$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const models = $("key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  const budget = {};
  if ($("key-day").value) budget.tokens_per_day = Number($("key-day").value);
  if ($("key-month").value) budget.tokens_per_month = Number($("key-month").value);
  try {
    const created = await api("POST", "/admin/keys", { name: $("key-name").value, admin: $("key-admin").checked,
                                                      models: models.length ? models : null,
                                                      budget: Object.keys(budget).length ? budget : null });
    const notice = $("key-created");
    notice.hidden = false;
    notice.textContent = `Key for ${created.name} (shown once, copy it now): ${created.key}`;
    notice.append(" ", button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(created.key)));
    $("key-form").reset();
    showKeys();
  } catch (e) { $("keys-error").textContent = e.message; }
});

// Usage -------------------------------------------------------------------------------------

function usageQuery(groupBy, format) {
  const since = Math.floor(Date.now() / 1000) - Number($("usage-days").value) * 86400;
  return `/api/v1/usage?group_by=${groupBy}&from=${since}${format ? `&format=${format}` : ""}`;
}

async function showUsage() {
  $("usage-error").textContent = "";
  const by = $("usage-by").value;
  try {
    const [daily, grouped, budget] = await Promise.all([
      api("GET", usageQuery("day")), api("GET", usageQuery(by)), api("GET", "/api/v1/usage/budget")]);
    const spent = (p) => {
      const t = budget.tokens[p];
      return `${t.spent.toLocaleString()}${t.limit ? ` of ${t.limit.toLocaleString()}` : ""} tokens ${p === "day" ? "today" : "this month"}`;
    };
    $("usage-budget").textContent = `You (${budget.subject}): ${spent("day")} · ${spent("month")}` +
      (budget.budget ? "" : " · no budget");
    $("usage-key").textContent = { model: "Model", route: "Route", subject: "Caller" }[by];
    fill($("usage-table").querySelector("tbody"), grouped.data.map((u) => row([
      u[by] || "(unknown)", u.requests.toLocaleString(), u.promptTokens.toLocaleString(),
      u.completionTokens.toLocaleString(), u.cachedTokens.toLocaleString(), u.trainedTokens.toLocaleString(),
      u.deviceSeconds.toFixed(1)])));
    if (!daily.data.length) {
      $("chart-usage").replaceChildren(el("p", "No usage in this period yet.", { class: "empty-chart" }));
      return;
    }
    const t = daily.data.map((u) => Date.parse(u.start) / 1000);
    const now = Date.now() / 1000, days = Number($("usage-days").value);
    chart($("chart-usage"), { time: true, range: [Math.floor((now - days * 86400) / 86400) * 86400, now],
      lines: [{ label: "prompt tokens", stroke: "#2f5fd0", width: 2 },
              { label: "completion tokens", stroke: "#b36b00", width: 2 }],
      data: [t, daily.data.map((u) => u.promptTokens), daily.data.map((u) => u.completionTokens)] });
  } catch (e) { $("usage-error").textContent = e.message; }
}

$("usage-days").addEventListener("change", () => showUsage());
$("usage-by").addEventListener("change", () => showUsage());
$("usage-csv").addEventListener("click", () => {
  download(usageQuery(`day,${$("usage-by").value}`, "csv"), "cyllm-usage.csv")
    .catch((e) => { $("usage-error").textContent = e.message; });
});

// -- start ---------------------------------------------------------------------------------

(async () => {
  try {
    const saved = JSON.parse(sessionStorage.getItem(CHATS) || "{}");
    state.chats = Array.isArray(saved.chats) ? saved.chats : [];
    state.current = saved.current;
  } catch (_) { state.chats = []; }
  const saved = sessionStorage.getItem(KEY);
  // A saved key, or none at all: a server without authentication lets everyone straight in.
  for (const key of saved !== null ? [saved] : [""]) {
    try { await logIn(key); return; } catch (_) { sessionStorage.removeItem(KEY); }
  }
  location.hash = "#login";
  route();
})();
