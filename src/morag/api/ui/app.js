// morag's dashboard: plain JavaScript, no build step, no third-party code.
// The API key lives in sessionStorage (this tab only) and goes in a header, never a URL.
// Live: running jobs are followed through their SSE streams (GET .../events, read with
// fetch so the key can go in a header); queues and the list are read every 5 s (the list
// only while the tab is visible): two small requests, however many jobs there are.
const KEY = "morag.key", ACTIONS = "morag.actions";
const FINAL = new Set(["success", "failure", "revoked"]);
const MAX_STREAMS = 4; // a browser opens at most 6 connections per host over HTTP/1.1
const $ = (sel) => document.querySelector(sel);
const jobs = new Map(); // task id -> job (as GET /status/{id} answers it)
const streams = new Map(); // task id -> AbortController
let nextOffset = null;
let listTimer = null;

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) { showLogin("the API key was refused"); throw new Error("401"); }
  return response;
}

function showLogin(message = "") {
  $("#main").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message;
  $("#forget").hidden = true;
}

function text(tag, content, cls) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  el.textContent = content ?? "";
  return el;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

async function loadQueues() {
  const stats = await (await api("/api/v1/status/stats/queues")).json();
  const list = $("#queue-list");
  list.replaceChildren(...Object.entries(stats.queues).map(([name, q]) => {
    const box = text("div", "", "queue" + (q.pending && !q.consumers ? " idle" : ""));
    box.dataset.queue = name;
    box.append(text("b", name), text("span", `${q.pending} waiting · ${q.consumers} consumer${q.consumers === 1 ? "" : "s"}`));
    return box;
  }));
  $("#workers").textContent = `${stats.workers.length} worker(s): ${stats.workers.join(", ") || "none"} · ${stats.in_flight} in flight`;
  $("#conn").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function query(offset) {
  const params = new URLSearchParams({ limit: "50", offset: String(offset) });
  const state = $("#f-state").value, kind = $("#f-kind").value, since = $("#f-since").value;
  const owner = $("#f-owner").value.trim();
  if (state) params.append("state", state);
  if (kind) params.set("kind", kind);
  if (since) params.set("created_after", new Date(Date.now() - since * 1000).toISOString());
  if (owner) params.set("owner", owner);
  return `/api/v1/status/?${params}`;
}

async function loadJobs(append = false) {
  const page = await (await api(query(append ? nextOffset : 0))).json();
  if (!append) jobs.clear();
  for (const job of page.items) jobs.set(job.task_id, job);
  // Jobs of several owners: an admin key, which may filter by owner.
  if (new Set(page.items.map((job) => job.owner)).size > 1) $("#f-owner").hidden = false;
  nextOffset = page.next_offset;
  $("#more").hidden = nextOffset == null;
  renderJobs();
  followRunning();
}

function renderJobs() {
  const list = $("#jobs");
  const rows = [...jobs.values()].map((job) => renderJob(job, list.querySelector(`[data-task-id="${job.task_id}"]`)));
  list.replaceChildren(...rows);
  if (!rows.length) list.append(text("p", "no jobs", "muted"));
}

function renderJob(job, existing) {
  const row = existing || text("article", "", "job");
  row.dataset.taskId = job.task_id;
  row.dataset.state = job.status;
  const line = text("div", "", "line");
  const bar = text("div", "", "bar");
  const fill = document.createElement("i");
  fill.style.width = `${Math.round((job.progress || 0) * 100)}%`;
  bar.append(fill);
  bar.title = `${Math.round((job.progress || 0) * 100)}%`;
  line.append(
    text("span", job.task_id, "id"),
    text("span", job.kind, "kind"),
    text("span", job.status, `state ${job.status}`),
    text("span", job.stage ? `${job.stage}: ${job.message || ""}` : job.message, "stage"),
    bar,
  );
  line.addEventListener("click", () => toggleDetails(job.task_id));
  const open = existing?.querySelector(".details");
  row.replaceChildren(line);
  if (job.error) row.append(text("div", `${job.error.type || "error"}: ${job.error.message}`, "error"));
  if (open) { row.append(open); fillDetails(job, open); }
  return row;
}

async function toggleDetails(taskId) {
  const row = document.querySelector(`[data-task-id="${taskId}"]`);
  const open = row.querySelector(".details");
  if (open) { open.remove(); return; }
  const details = text("div", "", "details");
  row.append(details);
  fillDetails(jobs.get(taskId), details);
  const history = await (await api(`/api/v1/status/${encodeURIComponent(taskId)}/history`)).json();
  const list = text("ol", "", "history");
  for (const e of history.events) {
    list.append(text("li", `${when(e.ts)} · ${e.state} · ${e.stage} · ${Math.round((e.progress || 0) * 100)}% · ${e.message}`));
  }
  details.querySelector(".history")?.remove();
  details.append(list);
}

function fillDetails(job, details) {
  const history = details.querySelector(".history");
  const dl = document.createElement("dl");
  const items = [
    ["created", when(job.created_at)], ["started", when(job.started_at)],
    ["finished", when(job.finished_at)], ["attempts", String(job.attempts)],
    ["queue", job.queue], ["progress", `${Math.round((job.progress || 0) * 100)}%`],
  ];
  if (job.owner) items.push(["owner", job.owner]);
  if (job.retry_of) items.push(["retry of", job.retry_of]);
  if (job.result) items.push(["result", JSON.stringify(job.result)]);
  for (const [k, v] of items) dl.append(text("dt", k), text("dd", v));
  const buttons = text("div", "", "buttons");
  if ($("#actions").checked) {
    if (!FINAL.has(job.status)) buttons.append(action("cancel", () => cancel(job.task_id)));
    if (job.status === "failure" || job.status === "revoked") buttons.append(action("retry", () => retry(job.task_id)));
  }
  details.replaceChildren(dl, buttons);
  if (history) details.append(history);
}

function action(label, run) {
  const button = text("button", label);
  button.type = "button";
  button.dataset.action = label;
  button.addEventListener("click", async (event) => {
    event.stopPropagation();
    button.disabled = true;
    try { await run(); } finally { button.disabled = false; }
  });
  return button;
}

async function cancel(taskId) {
  const response = await api(`/api/v1/ingest/${encodeURIComponent(taskId)}`, { method: "DELETE" });
  if (!response.ok) alert((await response.json()).error?.message || response.statusText);
  await refreshJob(taskId);
}

async function retry(taskId) {
  const response = await api(`/api/v1/ingest/${encodeURIComponent(taskId)}/retry`, { method: "POST" });
  if (!response.ok) alert((await response.json()).error?.message || response.statusText);
  await loadJobs();
}

async function refreshJob(taskId) {
  const response = await api(`/api/v1/status/${encodeURIComponent(taskId)}`);
  if (!response.ok) return;
  const job = await response.json();
  jobs.set(taskId, job);
  const row = document.querySelector(`[data-task-id="${taskId}"]`);
  if (row) renderJob(job, row);
  followRunning();
}

function followRunning() {
  for (const [taskId, controller] of streams) {
    const job = jobs.get(taskId);
    if (!job || FINAL.has(job.status)) { controller.abort(); streams.delete(taskId); }
  }
  for (const job of jobs.values()) {
    if (streams.size >= MAX_STREAMS) break;
    if (!FINAL.has(job.status) && !streams.has(job.task_id)) follow(job.task_id);
  }
}

async function follow(taskId) {
  const controller = new AbortController();
  streams.set(taskId, controller);
  try {
    const response = await fetch(`/api/v1/status/${encodeURIComponent(taskId)}/events`, {
      headers: headers({ Accept: "text/event-stream" }), signal: controller.signal,
    });
    if (!response.ok) return;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data) onEvent(taskId, JSON.parse(data));
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") console.warn("stream of", taskId, error);
  } finally {
    if (streams.get(taskId) === controller) streams.delete(taskId);
  }
  await refreshJob(taskId); // the final record: error, timestamps, result
  loadQueues().catch(() => {});
}

function onEvent(taskId, event) {
  const job = jobs.get(taskId);
  if (!job || event.error) return;
  if (event.stage === "webhook" || event.stage === "requeued" || event.stage === "cancelling") {
    job.message = event.message;
  } else {
    Object.assign(job, { status: event.state, stage: event.stage, message: event.message, progress: event.progress ?? job.progress });
    if (event.attempt) job.attempts = event.attempt;
  }
  const row = document.querySelector(`[data-task-id="${taskId}"]`);
  if (row) renderJob(job, row);
}

async function start() {
  try {
    await loadQueues();
  } catch (error) {
    if (error.message !== "401") $("#conn").textContent = "the API did not answer";
    return;
  }
  $("#login").hidden = true;
  $("#main").hidden = false;
  $("#forget").hidden = !sessionStorage.getItem(KEY);
  await loadJobs();
  clearInterval(listTimer);
  listTimer = setInterval(() => {
    loadQueues().catch(() => {});
    if (!document.hidden) loadJobs().catch(() => {});
  }, 5000);
}

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("#key").value);
  $("#key").value = "";
  start();
});
$("#forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
$("#actions").checked = sessionStorage.getItem(ACTIONS) === "on";
$("#actions").addEventListener("change", () => {
  sessionStorage.setItem(ACTIONS, $("#actions").checked ? "on" : "off");
  renderJobs();
});
$("#filters").addEventListener("change", () => loadJobs());
$("#filters").addEventListener("submit", (event) => { event.preventDefault(); loadJobs(); });
$("#more").addEventListener("click", () => loadJobs(true));
start();
