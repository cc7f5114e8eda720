// The CY-LLM console: a client of the gateway's public API only (the same routes a
// script uses), with the caller's API key or JWT kept in this tab's session storage.
// Every text from the server goes into the page as text (textContent), never as HTML.
"use strict";

const KEY = "cyllm.key";
const CHAT = "cyllm.chat";  // this tab's conversation: it survives a reload
const state = { key: null, admin: false, timers: [], jobStream: null, chat: [], chatAbort: null };
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
  const opts = { width, height, scales: { x: { time: series.time } },
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
  sessionStorage.removeItem(CHAT);  // the next user of this tab starts a conversation of their own
  state.key = null; state.admin = false;
  location.hash = "#login";
  location.reload();
});

// -- pages --------------------------------------------------------------------------------

const pages = { playground: showPlayground, models: showModels, cluster: showCluster,
                training: showTraining, keys: showKeys };

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
  fillSelect($("pg-model"), await servedModels(), state.wantedModel);
  state.wantedModel = undefined;
  boundMaxTokens();
  if (!$("chat-log").childElementCount) showChat();
}

function addMessage(role, text) {
  const div = el("div", undefined, { class: `msg ${role}` });
  div.append(el("span", role, { class: "role" }), el("span", text, { class: "text" }));
  $("chat-log").append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div.querySelector(".text");
}

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
  for (const m of state.chat) render(addMessage(m.role, ""), m.content);
}

function saveChat() {  // best effort: a full storage never fails the chat itself
  try { sessionStorage.setItem(CHAT, JSON.stringify(state.chat)); } catch (e) { console.warn(e); }
}

function number(id) {  // a setting left empty: the model's own default
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

async function send(retry) {
  const text = retry ?? $("chat-input").value.trim();
  if (!text || state.chatAbort) return;
  if (retry === undefined) $("chat-input").value = "";  // a retry keeps what was typed since
  $("chat-error").hidden = true;
  state.chat.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const out = addMessage("assistant", "");
  const messages = [...state.chat];
  const system = $("pg-system").value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  const body = { model: $("pg-model").value, messages, stream: true,
                 stream_options: { include_usage: true },
                 temperature: number("pg-temperature"), top_p: number("pg-top-p"),
                 max_tokens: number("pg-max-tokens"), seed: number("pg-seed") };
  const stop = $("pg-stop").value.trim();
  if (stop) body.stop = [stop];
  state.chatAbort = new AbortController();
  $("chat-send").disabled = true; $("chat-stop").disabled = false;
  const started = performance.now();
  let first = null, usage = null;
  $("chat-stats").textContent = "…";
  try {
    for await (const [, data] of events("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: state.chatAbort.signal,
      headers: { "Content-Type": "application/json" } })) {
      if (data === "[DONE]") break;
      if (data.error) throw new ApiError(500, data);
      if (data.usage) usage = data.usage;
      for (const choice of data.choices || []) {
        const piece = choice.delta.content || "";
        if (piece && first === null) first = performance.now();
        out.textContent += piece;
      }
      $("chat-log").scrollTop = $("chat-log").scrollHeight;
    }
    state.chat.push({ role: "assistant", content: out.textContent });
    render(out, out.textContent);
    saveChat();
    if (usage && first !== null) {
      const seconds = (performance.now() - first) / 1000;
      $("chat-stats").textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens · ` +
        `TTFT ${Math.round(first - started)} ms · ${(usage.completion_tokens / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s`;
    } else $("chat-stats").textContent = "";
  } catch (e) {
    if (e.name === "AbortError") {  // stopped: what came so far is the answer
      state.chat.push({ role: "assistant", content: out.textContent });
      saveChat();
      $("chat-stats").textContent = "stopped";
    } else {  // failed: the turn is dropped, the error is a banner with Retry
      state.chat.pop();
      asked.parentNode.remove();
      out.parentNode.remove();
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
  state.chat = []; saveChat(); $("chat-log").replaceChildren(); $("chat-stats").textContent = "";
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

async function exportModel(id) {
  // A download that carries the key: fetched, then handed to the browser as a file.
  const reply = await fetch(`/api/v1/models/${encodeURIComponent(id)}/export`, { headers: authHeaders() });
  if (!reply.ok) {
    let body = null;
    try { body = JSON.parse(await reply.text()); } catch (_) { /* not the error shape */ }
    throw new ApiError(reply.status, body);
  }
  const link = el("a", null, { href: URL.createObjectURL(await reply.blob()),
                               download: `${id.replace(/[^A-Za-z0-9._-]/g, "_")}.tar` });
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
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
  const ids = files.data.map((f) => f.id);
  const names = Object.fromEntries(files.data.map((f) => [f.id, `${f.filename} (${f.id})`]));
  for (const [select, none] of [[$("job-file"), false], [$("job-validation"), true]]) {
    const current = select.value;
    const options = ids.map((id) => el("option", names[id], { value: id }));
    if (none) options.unshift(el("option", "(none)", { value: "" }));
    select.replaceChildren(...options);
    if ([...select.options].some((o) => o.value === current)) select.value = current;
  }
}

async function refreshJobs() {
  const { jobs } = await api("GET", "/api/v1/training/jobs?limit=50");
  fill($("jobs-table").querySelector("tbody"), jobs.map((j) => {
    const tr = row([j.id, j.state, j.baseModel, j.progress ? `${j.progress.step}/${j.progress.totalSteps}` : ""]);
    tr.className = `selectable${state.job === j.id ? " selected" : ""}`;
    tr.addEventListener("click", () => openJob(j.id));
    return tr;
  }));
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
    $("job-open").onclick = () => { state.wantedModel = j.fineTunedModel; location.hash = "#playground"; };
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
  const { keys } = await api("GET", "/admin/keys");
  const shown = keys.filter((k) => !k.revoked || $("keys-revoked").checked);
  fill($("keys-table").querySelector("tbody"), shown.map((k) => row([
    k.key_id, k.name, k.models ? k.models.join(", ") : "all", k.admin ? "yes" : "",
    when(k.created), when(k.expires_at) || "never", k.revoked ? "revoked" : (k.expires_at && k.expires_at * 1000 < Date.now() ? "expired" : "active"),
    k.revoked ? "" : button("Revoke", async () => {
      try { await api("DELETE", `/admin/keys/${encodeURIComponent(k.key_id)}`); }
      catch (e) { $("keys-error").textContent = e.message; }
      showKeys();
    })])));
}

$("keys-revoked").addEventListener("change", () => showKeys());
$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const models = $("key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  try {
    const created = await api("POST", "/admin/keys", { name: $("key-name").value, admin: $("key-admin").checked,
                                                      models: models.length ? models : null });
    const notice = $("key-created");
    notice.hidden = false;
    notice.textContent = `Key for ${created.name} (shown once, copy it now): ${created.key}`;
    notice.append(" ", button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(created.key)));
    $("key-form").reset();
    showKeys();
  } catch (e) { $("keys-error").textContent = e.message; }
});

// -- start ---------------------------------------------------------------------------------

(async () => {
  try { state.chat = JSON.parse(sessionStorage.getItem(CHAT) || "[]"); } catch (_) { state.chat = []; }
  const saved = sessionStorage.getItem(KEY);
  // A saved key, or none at all: a server without authentication lets everyone straight in.
  for (const key of saved !== null ? [saved] : [""]) {
    try { await logIn(key); return; } catch (_) { sessionStorage.removeItem(KEY); }
  }
  location.hash = "#login";
  route();
})();
