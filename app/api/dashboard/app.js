// The dashboard: reads /api/stats, /api/jobs and /api/jobs/{id}, and follows /api/stream for live updates.
// Everything from the API is put on the page as text (never as HTML).
"use strict";

const LABELS = {queued: "waiting", running: "working", succeeded: "done", skipped: "nothing to do",
                retrying: "will retry", failed: "failed", dead: "gave up"};
const FINAL = new Set(["succeeded", "skipped", "failed", "dead"]);
const $ = (selector) => document.querySelector(selector);
let filters = {};
let nextCursor = null;
let openJob = null;
let statsTimer = null;

function token() { return localStorage.getItem("b24-token") || ""; }

async function api(path, options = {}) {
  const headers = token() ? {Authorization: `Bearer ${token()}`} : {};
  const response = await fetch(path, {...options, headers});
  // 401: a wrong token; 403 on a write: no token yet. Either way a person can enter one.
  if (response.status === 401 || (response.status === 403 && options.method === "POST")) {
    $("#token-form").hidden = false;
  }
  const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) { throw new Error(body.error || `HTTP ${response.status}`); }
  return body;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) { node.textContent = String(text); }
  for (const [key, value] of Object.entries(attrs)) { node.setAttribute(key, value); }
  return node;
}

function badge(state) {
  return el("span", LABELS[state] || state, {class: `badge ${state}`, "data-state": state, title: state});
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) { return ""; }
  const delta = Math.max(0, Date.now() / 1000 - seconds);
  if (delta < 60) { return `${Math.round(delta)} s ago`; }
  if (delta < 3600) { return `${Math.round(delta / 60)} min ago`; }
  if (delta < 86400) { return `${Math.round(delta / 3600)} h ago`; }
  return new Date(seconds * 1000).toLocaleString();
}

// ------------------------------------------------------------------ stats

async function refreshStats() {
  const stats = await api("/api/stats");
  $("#per-minute").textContent = stats.jobs_per_minute;
  $("#queue-depth").textContent = stats.queue.depth;
  $("#oldest").textContent = stats.queue.oldest_queued_seconds === null ? "nothing waiting"
    : `oldest waits ${Math.round(stats.queue.oldest_queued_seconds)} s`;
  drawSpark(stats.jobs_per_minute_history);
  const counts = $("#state-counts");
  counts.replaceChildren(...Object.entries(stats.jobs).map(([state, count]) => {
    const box = el("div", null, {class: "state-count", "data-state": state});
    box.append(el("div", LABELS[state] || state, {class: "label"}), el("div", count, {class: "value"}));
    return box;
  }));
  $("#portals tbody").replaceChildren(...Object.entries(stats.portals).map(([name, portal]) => {
    const row = el("tr", null, {"data-portal": name});
    const meter = el("span", null, {class: portal.headroom_ratio < 0.2 ? "meter low" : "meter"});
    meter.append(el("span", null, {style: `width: ${Math.round(portal.headroom_ratio * 100)}%`}));
    const budget = el("td");
    budget.append(meter, ` ${Math.floor(portal.headroom)} of ${portal.burst}, ${portal.per_second}/s`
      + (portal.slowed_down ? " (slowed down: the portal refused recently)" : ""));
    row.append(el("td", `${name} (${portal.domain})`), budget, el("td", portal.requests), el("td", portal.errors));
    return row;
  }));
  const failed = (stats.jobs.failed || 0) + (stats.jobs.dead || 0);
  $("#retry-all").hidden = failed === 0;
}

function drawSpark(history) {
  const svg = $("#spark");
  const top = Math.max(1, ...history);
  const width = 300 / history.length;
  svg.replaceChildren(...history.map((count, i) => {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const height = Math.max(count ? 2 : 0, 40 * count / top);
    rect.setAttribute("x", i * width); rect.setAttribute("width", width - 1);
    rect.setAttribute("y", 40 - height); rect.setAttribute("height", height);
    return rect;
  }));
}

function statsSoon() {
  // Many transitions arrive together; one refresh a second is enough.
  if (!statsTimer) { statsTimer = setTimeout(() => { statsTimer = null; refreshStats().catch(showError); }, 1000); }
}

// ------------------------------------------------------------------ failed jobs

async function refreshFailed() {
  const [failed, dead] = await Promise.all([api("/api/jobs?state=failed&limit=20"), api("/api/jobs?state=dead&limit=20")]);
  const jobs = [...failed.jobs, ...dead.jobs].sort((a, b) => b.received_at - a.received_at);
  $("#attention-empty").hidden = jobs.length > 0;
  $("#failed-list").replaceChildren(...jobs.map((job) => {
    const item = el("li", null, {"data-job": job.id});
    const what = job.error && job.error.what_to_do ? job.error.what_to_do : job.outcome;
    const retry = el("button", "Retry", {type: "button", class: "retry"});
    retry.addEventListener("click", () => retryJob(job.id));
    const open = el("a", `${job.event} ${job.entity_id} on ${job.portal}`, {href: `#${job.id}`});
    open.addEventListener("click", (e) => { e.preventDefault(); openDetail(job.id); });
    item.append(badge(job.state), " ", open, ` (${ago(job.received_at)}): `,
                el("strong", job.error ? job.error.code : ""), " ", el("span", what, {class: "what"}), " ", retry);
    return item;
  }));
}

async function undoJob(id) {
  const answer = await api(`/api/jobs/${encodeURIComponent(id)}/undo`, {method: "POST"});
  $("#d-message").textContent = `Restored ${answer.restored.length} item(s) to their bindings before the job.`;
  await openDetail(id);
}

async function retryJob(id) {
  await api(`/api/jobs/${encodeURIComponent(id)}/retry`, {method: "POST"});
  await Promise.all([refreshFailed(), refreshStats()]);
  if (openJob === id) { await openDetail(id); }
}

// ------------------------------------------------------------------ job list

function readFilters() {
  const form = new FormData($("#filters"));
  const chosen = {};
  for (const [key, value] of form.entries()) {
    if (!value) { continue; }
    chosen[key] = key === "since" ? String(new Date(value).getTime() / 1000) : value;
  }
  return chosen;
}

function matches(job) {
  return (!filters.state || job.state === filters.state) && (!filters.portal || job.portal === filters.portal)
    && (!filters.event || job.event === filters.event.toUpperCase()) && (!filters.rule || job.rules.includes(filters.rule))
    && (!filters.entity || String(job.entity_id) === filters.entity) && (!filters.since || job.received_at >= Number(filters.since));
}

function jobRow(job) {
  const row = el("tr", null, {"data-job": job.id, "data-state": job.state});
  row.append(el("td", ago(job.received_at), {title: new Date(job.received_at * 1000).toLocaleString()}));
  const state = el("td"); state.append(badge(job.state));
  row.append(state, el("td", job.portal), el("td", job.event), el("td", job.entity_id),
             el("td", job.error && job.error.what_to_do ? `${job.outcome}: ${job.error.what_to_do}` : job.outcome));
  row.addEventListener("click", () => openDetail(job.id));
  return row;
}

async function loadJobs(append = false) {
  const params = new URLSearchParams({...filters, limit: "50"});
  if (append && nextCursor) { params.set("cursor", nextCursor); }
  try {
    const page = await api(`/api/jobs?${params}`);
    $("#filter-error").hidden = true;
    const rows = page.jobs.map(jobRow);
    if (append) { $("#jobs tbody").append(...rows); } else { $("#jobs tbody").replaceChildren(...rows); }
    nextCursor = page.next_cursor;
    $("#more").hidden = !nextCursor;
  } catch (error) {
    $("#filter-error").textContent = error.message;
    $("#filter-error").hidden = false;
  }
}

function onJobEvent(job) {
  const existing = document.querySelector(`#jobs tr[data-job="${CSS.escape(job.id)}"]`);
  if (existing) {
    if (matches(job)) { existing.replaceWith(jobRow(job)); } else { existing.remove(); }
  } else if (matches(job)) {
    $("#jobs tbody").prepend(jobRow(job));
  }
  if (openJob === job.id) { openDetail(job.id).catch(showError); }
  if (FINAL.has(job.state) || job.state === "queued") { refreshFailed().catch(showError); }
  statsSoon();
}

// ------------------------------------------------------------------ job detail

function bindingsCell(list) { return el("td", list && list.length ? list.join(", ") : "nothing"); }

async function openDetail(id) {
  const job = await api(`/api/jobs/${encodeURIComponent(id)}`);
  if (openJob !== id) { $("#d-message").textContent = ""; }
  openJob = id;
  $("#detail").hidden = false;
  $("#detail").dataset.job = id;
  $("#d-id").textContent = job.id;
  $("#d-state").replaceWith(Object.assign(badge(job.state), {id: "d-state"}));
  $("#d-outcome").textContent = job.outcome;
  $("#d-error").hidden = !job.error;
  if (job.error) {
    $("#d-what").textContent = job.error.what_to_do || job.error.description || "";
    $("#d-code").textContent = `${job.error.code || ""}: ${job.error.description || ""}`;
  }
  $("#d-retry").hidden = !FINAL.has(job.state);
  $("#d-undo").hidden = !job.changes.some((change) => change.status === "changed");
  const facts = [["Portal", job.portal], ["Event", `${job.event} for ${job.entity_id}`], ["Started by", job.trigger],
                 ["Rules that matched", job.rules.join(", ") || "none"], ["Received", ago(job.received_at)],
                 ["Finished", ago(job.finished_at) || "not yet"], ["Portal requests", job.requests]];
  $("#d-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", name), el("dd", value)]));
  const itemName = (entry) => entry.activity ? `activity ${entry.activity}` : `comment ${entry.comment}`;
  $("#d-no-changes").hidden = job.changes.length > 0;
  $("#d-changes tbody").replaceChildren(...job.changes.map((change) => {
    const row = el("tr", null, {"data-item": itemName(change)});
    row.append(el("td", itemName(change)), bindingsCell(change.before), el("td", "→"), bindingsCell(change.after),
               el("td", change.status + (change.errors.length ? `: ${change.errors[0].what_to_do || change.errors[0].code}` : "")));
    return row;
  }));
  $("#d-plan tbody").replaceChildren(...job.plan.map((item) => {
    const row = el("tr");
    row.append(el("td", itemName(item)), bindingsCell(item.before), el("td", "→"), bindingsCell(item.after),
               el("td", [...(item.rules || []), ...(item.notes || [])].join("; ") + (item.dry_run ? " (dry run)" : "")));
    return row;
  }));
  $("#d-attempts").replaceChildren(...job.attempts.map((attempt) => el("li",
    `${new Date(attempt.started_at * 1000).toLocaleTimeString()}: ${attempt.outcome}`
    + (attempt.error ? ` (${attempt.error.code}: ${attempt.error.what_to_do || attempt.error.description})` : ""))));
}

// ------------------------------------------------------------------ live updates

async function follow() {
  // fetch rather than EventSource: EventSource cannot send the Authorization header.
  for (;;) {
    try {
      const headers = token() ? {Authorization: `Bearer ${token()}`} : {};
      const response = await fetch("/api/stream", {headers});
      if (!response.ok) { throw new Error(`stream: HTTP ${response.status}`); }
      $("#live").className = "live on"; $("#live").textContent = "live";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) { break; }
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (data) { onJobEvent(JSON.parse(data)); }
        }
      }
    } catch (error) { /* reconnect below */ }
    $("#live").className = "live off"; $("#live").textContent = "reconnecting…";
    await new Promise((resolve) => setTimeout(resolve, 2000));
    await Promise.all([loadJobs(), refreshStats(), refreshFailed()]).catch(showError);
  }
}

function showError(error) {
  console.warn(error);
  $("#d-message").textContent = String(error.message || error);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#filters").addEventListener("submit", (event) => { event.preventDefault(); filters = readFilters(); loadJobs(); });
  $("#filters").addEventListener("reset", () => { filters = {}; setTimeout(loadJobs); });
  $("#more").addEventListener("click", () => loadJobs(true));
  $("#close-detail").addEventListener("click", () => { $("#detail").hidden = true; openJob = null; });
  $("#d-retry").addEventListener("click", () => retryJob(openJob).catch(showError));
  $("#d-undo").addEventListener("click", () => undoJob(openJob).catch(showError));
  $("#retry-all").addEventListener("click", async () => {
    await api("/api/jobs/retry?state=failed&limit=1000", {method: "POST"});
    await api("/api/jobs/retry?state=dead&limit=1000", {method: "POST"});
    await Promise.all([refreshFailed(), refreshStats(), loadJobs()]);
  });
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem("b24-token", $("#token").value.trim());
    location.reload();
  });
  Promise.all([refreshStats(), refreshFailed(), loadJobs()]).catch(showError);
  setInterval(() => refreshStats().catch(showError), 10000);
  follow();
});
