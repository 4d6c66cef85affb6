// The dashboard: reads /api/stats, /api/jobs and /api/jobs/{id}, and follows /api/stream for live updates;
// /readyz (every few seconds) says whether Redis is there. Everything from the API is put on the page as
// text (never as HTML). What could not be read is said so, never shown as "nothing".
"use strict";

const LABELS = {queued: "waiting", running: "working", succeeded: "done", skipped: "nothing to do",
                retrying: "will retry", failed: "failed", dead: "gave up", undone: "undone"};
const FINAL = new Set(["succeeded", "skipped", "failed", "dead", "undone"]);
// Entities that have a page in the portal: https://<domain>/crm/<type>/details/<id>/
const PAGES = new Set(["lead", "contact", "company", "deal"]);
const $ = (selector) => document.querySelector(selector);
let filters = {};
let nextCursor = null;
let openJob = null;
let statsTimer = null;
let domains = {};  // portal name -> domain, from /api/stats
let authorised = true;
let pages = {};  // portal name -> where its record pages are (the portal's site, or the demo portal's server)
let lastStats = null;  // the last /api/stats read, for the header's portal state
let streamState = "connecting";  // connecting | live | reconnecting | unauthorised
let ready;  // the last /readyz answer; null: the service did not answer; undefined: not asked yet
const HEALTH_EVERY = 3000;  // ms between looks at /readyz

function token() { return localStorage.getItem("b24-token") || ""; }

// An answer other than 2xx: `status` is the HTTP status (0: the service did not answer at all).
class ApiError extends Error { constructor(message, status) { super(message); this.status = status; } }
class Refused extends ApiError {}

async function api(path, options = {}) {
  const headers = token() ? {Authorization: `Bearer ${token()}`} : {};
  let response;
  try {
    response = await fetch(path, {...options, headers});
  } catch (error) {
    throw new ApiError("the service did not answer (stopped, or the network is down)", 0);
  }
  const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (response.status === 401 || response.status === 403) {
    showRefusal(response.status, body.error || `HTTP ${response.status}`, options.method === "POST");
    throw new Refused(body.error || `HTTP ${response.status}`, response.status);
  }
  if (!response.ok) { throw new ApiError(body.error || `HTTP ${response.status}`, response.status); }
  return body;
}

// ------------------------------------------------------------------ feedback where it was clicked

// Says at `node` (next to what was clicked) how an action went: done, refused (with what to do), failed.
function say(node, kind, text) {
  node.textContent = text;
  node.className = `feedback ${kind}`;
  node.dataset.kind = kind;
  node.hidden = false;
  // A refusal also opens the token box at the top, which pushes the page down: keep this in view.
  requestAnimationFrame(() => node.scrollIntoView({block: "nearest"}));
}

function failure(error, action) {
  if (error instanceof Refused) {
    const fix = error.status === 401 ? "enter the API token (B24_API_TOKEN) in the box at the top of the page"
      : "set B24_API_TOKEN on the service and enter it in the box at the top of the page";
    return ["refused", `Refused: ${action} needs the API token. To do: ${fix}.`];
  }
  if (error instanceof ApiError && error.status >= 400 && error.status < 500) {
    return ["refused", `Refused: ${error.message}`];
  }
  const message = error && error.message ? error.message : String(error);
  return ["failed", `Failed: ${message}. Nothing was changed by this click; try again once that is fixed.`];
}

// The API's refusal, said in words with the fix, instead of empty lists that read as "all is well".
function showRefusal(status, error, writing) {
  const fix = $("#auth-fix");
  if (status === 401) {
    $("#auth-what").textContent = token() ? "The API token this page sent is wrong." : "This service needs its API token.";
    fix.replaceChildren("Enter the value of ", el("code", "B24_API_TOKEN"), " (in the service's .env) below.");
  } else {
    $("#auth-what").textContent = writing ? "Retry and undo need an API token, and this service has none set."
      : "The API answers this page only from the service's own machine until it has an API token.";
    fix.replaceChildren("Fix: set ", el("code", "B24_API_TOKEN=<a long random string>"), " in the service's .env, ",
      "restart b24rebind (", el("code", "./scripts/start"), "), then enter the same token below. (", error, ")");
  }
  $("#auth").hidden = false;
  if (!writing) {
    authorised = false;
    $("#attention-empty").textContent = "Unknown: the API refused this page (see above).";
    $("#attention-empty").hidden = false;
    $("#failed-list").replaceChildren();
  }
}

// A record's page: on the portal's own site, or on the demo portal, which also has a page per activity.
function portalLink(portal, type, id, text) {
  const site = pages[portal];
  const demo = site && domains[portal] && site !== `https://${domains[portal]}`;
  if (!site || !(PAGES.has(type) || (demo && type === "activity"))) { return document.createTextNode(text); }
  return el("a", text, {href: `${site}/crm/${type}/details/${id}/`, target: "_blank", rel: "noopener"});
}

// "lead 57, contact 52" with each entity a link to its page in the portal
function bindingsNodes(portal, list) {
  if (!list || !list.length) { return [document.createTextNode("nothing")]; }
  return list.flatMap((binding, i) => {
    const [type, id] = bindingParts(binding);
    return [...(i ? [document.createTextNode(", ")] : []), portalLink(portal, type, id, `${type} ${id}`)];
  });
}

// A binding as the API gives it, {entity_type: 3, entity_id: 42}, or as text ("contact 42") in records
// written before bindings were values; the type named as the server's entity_label names it.
const ENTITY_LABELS = {1: "lead", 2: "deal", 3: "contact", 4: "company"};
function bindingParts(binding) {
  if (typeof binding === "string") { return binding.split(" "); }
  return [ENTITY_LABELS[binding.entity_type] || `type${binding.entity_type}`, String(binding.entity_id)];
}

function entityOf(job) {
  const match = /^ONCRM(ACTIVITY|LEAD|CONTACT|COMPANY|DEAL)/.exec(job.event || "");
  return match ? match[1].toLowerCase() : "";
}

function plural(count, noun, many) { return `${count} ${count === 1 ? noun : (many || noun + "s")}`; }

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
  let stats;
  try {
    stats = await api("/api/stats");
  } catch (error) {
    if (!(error instanceof Refused)) { statsUnknown(error); }
    throw error;
  }
  lastStats = stats;
  $("#stats-error").hidden = true;
  domains = Object.fromEntries(Object.entries(stats.portals).map(([name, portal]) => [name, portal.domain]));
  pages = Object.fromEntries(Object.entries(stats.portals).map(([name, portal]) => [name, portal.pages]));
  drawWorkers(stats.workers);
  $("#per-minute").textContent = stats.jobs_finished_last_minute;
  $("#received").textContent = `${plural(stats.jobs_per_minute, "event")} received`;
  const queue = stats.queue;
  $("#queue-depth").textContent = queue.depth;
  const parts = [];
  if (queue.ready) {
    parts.push(`${queue.ready} ready` + (queue.oldest_queued_seconds === null ? ""
      : `, the oldest for ${Math.round(queue.oldest_queued_seconds)} s`));
  }
  if (queue.later) { parts.push(`${queue.later} to retry later`); }
  $("#oldest").textContent = queue.depth ? parts.join("; ") : "nothing waiting";
  const waiting = stats.spool ? stats.spool.waiting_segments || 0 : 0;
  $("#spooled").textContent = waiting ? `${plural(waiting, "spool segment")} on disk wait to be queued` : "";
  drawChart(stats.history);
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
    const site = el("td");
    site.append(el("a", `${name} (${portal.domain})`, {href: `https://${portal.domain}/`, target: "_blank", rel: "noopener"}));
    const reach = portal.reachability;
    const reachable = el("td", null, {class: "reach", "data-reach": reach.state});
    reachable.append(reach.state === "unknown" ? "not asked yet" : el("span", reach.state, {class: `badge ${reach.state}`}),
                     reach.at ? ` ${ago(reach.at)}` : "");
    row.append(site, reachable, budget, el("td", portal.requests), el("td", portal.refused), el("td", portal.unreachable));
    return row;
  }));
  const failed = (stats.jobs.failed || 0) + (stats.jobs.dead || 0);
  $("#retry-all").hidden = failed === 0;
  renderHealth();
}

// The numbers could not be read: say so on every card, instead of leaving old or empty ones that read as
// "all is well".
function statsUnknown(error) {
  for (const id of ["#per-minute", "#queue-depth", "#workers-online"]) { $(id).textContent = "?"; }
  for (const id of ["#received", "#oldest", "#workers-hint"]) { $(id).textContent = "unknown"; }
  $("#state-counts").replaceChildren(el("div", "Jobs by state: unknown", {class: "label"}));
  $("#stats-error").textContent = `Could not read the numbers: ${error.message || error}`;
  $("#stats-error").hidden = false;
  $("#workers-empty").textContent = "Unknown: the workers' heartbeats could not be read.";
  $("#workers-empty").hidden = false;
  $("#workers").replaceChildren();
  $("#retry-all").hidden = true;
}

function seconds(value) {
  if (value === null || value === undefined) { return ""; }
  if (value < 90) { return `${Math.round(value)} s`; }
  if (value < 5400) { return `${Math.round(value / 60)} min`; }
  return `${(value / 3600).toFixed(1)} h`;
}

// Worker processes beat every few seconds (app/store/heartbeat.py); one that stops beating is gone.
function drawWorkers(workers) {
  $("#workers-online").textContent = workers.online;
  const seen = workers.last_seen_seconds_ago === null ? "no worker has ever reported"
    : `last seen ${seconds(workers.last_seen_seconds_ago)} ago`;
  $("#workers-hint").textContent = workers.online ? `${plural(workers.running, "job")} under way; ${seen}`
    : `none online; ${seen}`;
  $("#workers-online").parentElement.classList.toggle("alarm", workers.online === 0);
  $("#workers-empty").hidden = workers.online > 0;
  $("#workers-empty").textContent = workers.last_seen_seconds_ago === null
    ? "No worker process has reported yet: jobs wait in the queue until one runs (b24rebind run)."
    : `No worker process is online (${seen}): jobs wait in the queue until one runs (b24rebind run).`;
  $("#workers").replaceChildren(...workers.processes.map((process) => {
    const item = el("li", null, {"data-pid": process.pid});
    item.append(el("strong", `${process.host} pid ${process.pid}`),
                ` ${process.queues.join(" + ")} queue${process.queues.length > 1 ? "s" : ""}: `,
                el("span", `${process.running} of ${process.capacity} jobs under way`, {class: "running"}),
                `, seen ${seconds(process.seen_seconds_ago)} ago`,
                process.started_at ? `, up since ${new Date(process.started_at * 1000).toLocaleString()}` : "");
    return item;
  }));
}

// ------------------------------------------------------------------ the header: live, degraded or down

async function checkHealth() {
  const wasAway = ready !== undefined && redisAway();
  try {
    const response = await fetch("/readyz", {cache: "no-store"});
    const body = await response.json().catch(() => null);
    // A proxy in between may keep /readyz to itself: then the header goes by the stream alone.
    ready = body && typeof body === "object" && "status" in body ? body : {status: "unknown"};
  } catch (error) {
    ready = null;  // the service itself did not answer
  }
  renderHealth();
  if (wasAway && !redisAway()) {  // back: what was said unknown meanwhile is read again
    Promise.all([loadJobs(), refreshStats().catch(showError).then(refreshFailed)]).catch(showError);
  }
}

function redisAway() { return ready === null || Boolean(ready.redis && ready.redis !== "ok"); }

// The header's one word, and beside it the sentence that says what is wrong, since when, and what
// still works. Red: Redis, the service or a portal is away. Amber: degraded (the spool is waiting).
function renderHealth() {
  const [state, word, detail] = healthNow();
  const live = $("#live");
  live.className = `live ${state === "live" ? "on" : state === "down" ? "down" : state === "degraded" ? "degraded" : "off"}`;
  live.dataset.health = state;
  live.textContent = word;
  $("#health").hidden = !detail;
  $("#health").className = `health ${state}`;
  $("#health").textContent = detail || "";
}

function healthNow() {
  if (ready === undefined) { return ["connecting", "connecting…", ""]; }
  if (ready === null) {
    return ["down", "service not answering", "b24rebind is not answering this page: it is stopped, or the network "
      + "between you is down. Nothing on this page is current."];
  }
  if (ready.redis && ready.redis !== "ok") {
    const away = ready.redis_down_seconds !== undefined ? ` for ${seconds(ready.redis_down_seconds)}` : "";
    return ["down", `Redis away${away}`, `Redis has been unreachable${away}: no job is read, run or retried, and `
      + "the numbers below may be out of date. Events are still accepted into the spool and queued once Redis "
      + "is back. Check the Redis server (REDIS_URL)."];
  }
  if (ready.status === "unavailable") {  // not ready for another reason than Redis: say what it says
    const reasons = Object.entries(ready).filter(([key, value]) => key !== "status" && typeof value === "string"
      && value !== "ok").map(([key, value]) => `${key}: ${value}`);
    return ["down", "not ready", `GET /readyz says the service is not ready (${reasons.join("; ") || "no reason given"}).`];
  }
  const unreachable = lastStats ? Object.entries(lastStats.portals).filter(([, p]) => p.reachability.state === "unreachable") : [];
  if (unreachable.length) {
    const [name, portal] = unreachable[0];
    const since = portal.reachability.last_answer ? `last answered ${ago(portal.reachability.last_answer)}` : "never answered";
    const others = unreachable.length > 1 ? ` (and ${plural(unreachable.length - 1, "other portal")})` : "";
    return ["down", `portal ${name} unreachable`, `Portal ${name} (${portal.domain}) cannot be reached${others}: `
      + `${since}, last tried ${ago(portal.reachability.at)}. Its jobs wait and retry; check its address `
      + "(rest_url) and the network from the workers."];
  }
  const waiting = ready.spool && ready.spool.waiting_segments ? ready.spool.waiting_segments : 0;
  if (ready.status === "degraded" || waiting) {
    const what = waiting ? `${plural(waiting, "spool segment")} waiting to be queued`
      : (ready.reason || "the service reports itself degraded");
    return ["degraded", "degraded", `Degraded: ${what}. Events are safe on disk and are queued as Redis takes them.`];
  }
  if (streamState === "unauthorised") { return ["unauthorised", "not authorised", ""]; }
  if (streamState === "live") { return ["live", "live", ""]; }
  return ["connecting", streamState === "reconnecting" ? "reconnecting…" : "connecting…", ""];
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) { node.setAttribute(key, value); }
  if (text !== undefined) { node.textContent = text; }
  return node;
}

// Three lines over the last hour, one point a minute, with a labelled count axis and a time axis.
function drawChart(history) {
  const chart = $("#chart");
  const [left, right, top, bottom] = [44, 630, 12, 190];
  const series = ["events", "jobs", "requests"];
  const points = history.minute_starts.length;
  const highest = Math.max(1, ...series.flatMap((name) => history[name]));
  const step = Math.pow(10, Math.floor(Math.log10(highest)));
  const ceiling = Math.ceil(highest / step) * step;
  const x = (i) => left + (right - left) * i / Math.max(1, points - 1);
  const y = (value) => bottom - (bottom - top) * value / ceiling;
  const nodes = [];
  for (const tick of [0, ceiling / 2, ceiling]) {
    nodes.push(svg("line", {class: "grid", x1: left, x2: right, y1: y(tick), y2: y(tick)}),
               svg("text", {x: left - 6, y: y(tick) + 4, "text-anchor": "end"}, String(Math.round(tick))));
  }
  nodes.push(svg("line", {class: "axis", x1: left, x2: left, y1: top, y2: bottom}),
             svg("line", {class: "axis", x1: left, x2: right, y1: bottom, y2: bottom}),
             svg("text", {x: left + 6, y: top + 10}, "per minute"));
  for (const [i, label] of [[0, "60 min ago"], [Math.floor((points - 1) / 2), "30 min ago"], [points - 1, "now"]]) {
    nodes.push(svg("line", {class: "axis", x1: x(i), x2: x(i), y1: bottom, y2: bottom + 4}),
               svg("text", {x: x(i), y: bottom + 18, "text-anchor": i === 0 ? "start" : i === points - 1 ? "end" : "middle"}, label));
  }
  for (const name of series) {
    const line = history[name].map((value, i) => `${x(i).toFixed(1)},${y(value).toFixed(1)}`).join(" ");
    nodes.push(svg("polyline", {class: name, points: line, "data-series": name,
                                "data-total": history[name].reduce((a, b) => a + b, 0)}));
  }
  chart.replaceChildren(...nodes);
}

function statsSoon() {
  // Many transitions arrive together; one refresh a second is enough.
  if (!statsTimer) { statsTimer = setTimeout(() => { statsTimer = null; refreshStats().catch(showError); }, 1000); }
}

// ------------------------------------------------------------------ failed jobs

// Identical failures (same state, portal, code and fix) are one item with a count: a hundred jobs
// refused for one reason are one thing to fix.
async function refreshFailed() {
  if (!authorised) { return; }
  let failed, dead;
  try {
    [failed, dead] = await Promise.all([api("/api/jobs?state=failed&limit=200"), api("/api/jobs?state=dead&limit=200")]);
  } catch (error) {
    if (!(error instanceof Refused)) {  // a refusal says so itself (showRefusal)
      $("#attention-empty").textContent = `Unknown: the failed jobs could not be read (${String(error.message || error).replace(/\.$/, "")}).`;
      $("#attention-empty").hidden = false;
      $("#failed-list").replaceChildren();
    }
    throw error;
  }
  const jobs = [...failed.jobs, ...dead.jobs].sort((a, b) => b.received_at - a.received_at);
  const groups = new Map();
  for (const job of jobs) {
    const what = job.error && job.error.what_to_do ? job.error.what_to_do : job.outcome;
    const key = [job.state, job.portal, job.error ? job.error.code : "", what].join("|");
    if (!groups.has(key)) { groups.set(key, {first: job, what, ids: []}); }
    groups.get(key).ids.push(job.id);
  }
  $("#attention-empty").textContent = "Nothing has failed.";
  $("#attention-empty").hidden = jobs.length > 0;
  $("#failed-list").replaceChildren(...[...groups.values()].map(({first, what, ids}) => {
    const item = el("li", null, {"data-job": first.id, "data-count": ids.length});
    const retry = el("button", ids.length > 1 ? `Retry these ${ids.length}` : "Retry", {type: "button", class: "retry"});
    const said = el("p", null, {class: "feedback", role: "status", hidden: ""});
    retry.addEventListener("click", () => retryFromList(ids, said));
    const open = el("a", `${first.event} ${first.entity_id} on ${first.portal}`, {href: `#${first.id}`});
    open.addEventListener("click", (e) => { e.preventDefault(); openClicked(first.id); });
    item.append(badge(first.state), " ");
    if (ids.length > 1) { item.append(el("span", `${ids.length} jobs ×`, {class: "count"}), "latest "); }
    item.append(open, ` (${ago(first.received_at)}): `, el("strong", first.error ? first.error.code : ""), " ",
                el("span", what, {class: "what"}), " ", retry, said);
    return item;
  }));
}

async function undoJob(id) {
  const sure = window.confirm("Undo this job? The bindings it changed go back to what they were before it ran.\n\n"
    + "The rules still hold: the next event about these items, or the next reconcile, applies them again "
    + "unless you pause the rule (enabled: false in the rules file).");
  if (!sure) { return; }
  $("#d-undo").disabled = true;
  let answer;
  try {
    answer = await api(`/api/jobs/${encodeURIComponent(id)}/undo`, {method: "POST"});
  } catch (error) {
    $("#d-undo").disabled = false;
    say($("#d-message"), ...failure(error, "undo"));
    return;
  }
  await openDetail(id).catch(() => {});
  say($("#d-message"), "done", `Restored ${plural(answer.restored.length, "item")} to their bindings before the job. `
    + "The rules apply again on the next event or reconcile, unless you pause the rule (enabled: false).");
}

async function retryJobs(ids) {
  for (const id of ids) { await api(`/api/jobs/${encodeURIComponent(id)}/retry`, {method: "POST"}); }
}

function afterRetry(ids) {
  Promise.all([refreshFailed(), refreshStats()]).catch(showError);
  if (ids.includes(openJob)) { openDetail(openJob).catch(showError); }
}

// A retry from the "Needs attention" list: a refusal or failure is said in the item clicked; once done,
// the item leaves the list (its jobs are queued), so that is said just above the list.
async function retryFromList(ids, said) {
  try {
    await retryJobs(ids);
  } catch (error) {
    say(said, ...failure(error, "retry"));
    return;
  }
  say($("#attention-message"), "done", `Queued again: ${plural(ids.length, "job")}. Each re-reads the portal first; `
    + "follow them under Jobs.");
  afterRetry(ids);
}

async function retryJob(id) {
  try {
    await retryJobs([id]);
  } catch (error) {
    say($("#d-message"), ...failure(error, "retry"));
    return;
  }
  await openDetail(id).catch(() => {});
  say($("#d-message"), "done", "Queued again: it re-reads the portal first, and this page follows it.");
  $("#d-message").dataset.after = "retry";  // once it has run again, the message says how it went
  afterRetry([id]);
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
  // Each cell says what it is (class, data-label): below 600 px the rows are cards laid out by class.
  const row = el("tr", null, {"data-job": job.id, "data-state": job.state});
  row.append(el("td", ago(job.received_at), {title: new Date(job.received_at * 1000).toLocaleString(),
                                              class: "received", "data-label": "Received"}));
  const state = el("td", null, {class: "state", "data-label": "State"}); state.append(badge(job.state));
  const entity = el("td", null, {class: "entity", "data-label": "Entity"});
  const type = entityOf(job);
  entity.append(portalLink(job.portal, type, job.entity_id, `${type} ${job.entity_id}`.trim()));
  entity.addEventListener("click", (e) => { if (e.target.tagName === "A") { e.stopPropagation(); } });
  const what = job.error && job.error.what_to_do ? `${job.outcome}: ${job.error.what_to_do}` : job.outcome;
  const whatCell = el("td", null, {class: "what", "data-label": "What happened", title: what});
  whatCell.append(el("div", what, {class: "clamp"}));
  row.append(state, el("td", job.portal, {class: "portal", "data-label": "Portal"}),
             el("td", job.event, {class: "event", "data-label": "Event"}), entity,
             whatCell);
  row.addEventListener("click", () => openClicked(job.id));
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
    if (error instanceof Refused) { $("#jobs tbody").replaceChildren(); return; }
    if (!(error instanceof ApiError) || error.status === 0 || error.status >= 500) {
      $("#jobs tbody").replaceChildren();  // rows from before would read as current
      $("#more").hidden = true;
      $("#filter-error").textContent = `Could not read the jobs: ${error.message}`;
    } else {
      $("#filter-error").textContent = error.message;
    }
    $("#filter-error").hidden = false;
  }
}

// One box for the ids people have at hand: a job id opens the job; a number lists the jobs about that
// activity or lead, and the jobs that changed that activity's bindings.
async function search(text) {
  const query = text.trim();
  const result = $("#search-result");
  result.replaceChildren();
  if (!query) { return; }
  if (!/^\d+$/.test(query)) {
    try { await openDetail(query); } catch (error) { result.textContent = String(error.message || error); }
    return;
  }
  // Not the form's reset(): its handler reloads the list, which would race this one.
  for (const field of $("#filters").querySelectorAll("input, select")) { field.value = ""; }
  $("#filters input[name=entity]").value = query;
  filters = {entity: query};  // live updates add new jobs about the same id
  const [byEntity, byLead, audit] = await Promise.all([
    api(`/api/jobs?entity=${query}&limit=100`), api(`/api/jobs?lead=${query}&limit=100`),
    api(`/api/audit?activity=${query}`).catch(() => ({entries: []}))]);
  const found = new Map([...byEntity.jobs, ...byLead.jobs].map((job) => [job.id, job]));
  const listed = [...found.values()].sort((a, b) => b.received_at - a.received_at);
  $("#jobs tbody").replaceChildren(...listed.map(jobRow));
  nextCursor = null;
  $("#more").hidden = true;
  const jobs = [...new Set(audit.entries.map((entry) => entry.job))];
  result.append(`${plural(listed.length, "job")} about activity or lead ${query} (listed below)`);
  if (jobs.length) {
    result.append(`; activity ${query} was changed by `);
    jobs.forEach((id, i) => {
      const link = el("a", id, {href: `#${id}`});
      link.addEventListener("click", (e) => { e.preventDefault(); openClicked(id.replace(/^undo/, "")); });
      result.append(...(i ? [", "] : []), link);
    });
  }
  result.append(".");
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

function bindingsCell(portal, list) {
  const cell = el("td");
  cell.append(...bindingsNodes(portal, list));
  return cell;
}

// A job opened by a click whose record cannot be read: the panel opens and says why, where it was clicked.
function openClicked(id) {
  openDetail(id).catch((error) => {
    if (error instanceof Refused) { return; }
    openJob = id;
    $("#detail").hidden = false;
    $("#d-id").textContent = id;
    $("#d-body").hidden = true;
    say($("#d-unreadable"), "failed", `Could not read this job: ${error.message || error}`);
  });
}

async function openDetail(id) {
  const job = await api(`/api/jobs/${encodeURIComponent(id)}`);
  $("#d-body").hidden = false;
  $("#d-unreadable").hidden = true;
  if (openJob !== id) { $("#d-message").textContent = ""; $("#d-message").hidden = true; delete $("#d-message").dataset.after; }
  openJob = id;
  $("#detail").hidden = false;
  $("#detail").dataset.job = id;
  $("#d-id").textContent = job.id;
  $("#d-state").replaceWith(Object.assign(badge(job.state), {id: "d-state"}));
  const said = $("#d-message");
  if (said.dataset.after === "retry" && FINAL.has(job.state)) {
    delete said.dataset.after;
    say(said, "done", `Retried: it ran again and is ${LABELS[job.state] || job.state} (${job.outcome}).`);
  }
  $("#d-outcome").textContent = job.outcome;
  $("#d-error").hidden = !job.error;
  if (job.error) {
    $("#d-what").textContent = job.error.what_to_do || job.error.description || "";
    $("#d-code").textContent = `${job.error.code || ""}: ${job.error.description || ""}`;
  }
  $("#d-retry").hidden = !FINAL.has(job.state);
  // Undone is a state: the button stays, disabled, and says so.
  $("#d-undo").hidden = !job.changes.some((change) => change.status === "changed");
  $("#d-undo").disabled = job.state === "undone";
  $("#d-undo").textContent = job.state === "undone" ? "Undone" : "Undo its changes";
  const type = entityOf(job);
  const event = el("dd");
  event.append(`${job.event} for `, portalLink(job.portal, type, job.entity_id, `${type} ${job.entity_id}`.trim()));
  const facts = [["Portal", job.portal], ["Event", event], ["Started by", job.trigger + (job.dry_run ? " (dry run)" : "")],
                 ["Rules that matched", job.rules.join(", ") || "none"], ["Received", ago(job.received_at)],
                 ["Finished", ago(job.finished_at) || "not yet"], ["Portal requests", job.requests]];
  $("#d-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", name),
                                                                      value instanceof Node ? value : el("dd", value)]));
  const itemName = (entry) => entry.activity ? `activity ${entry.activity}` : `comment ${entry.comment}`;
  $("#d-no-changes").hidden = job.changes.length > 0;
  $("#d-changes tbody").replaceChildren(...job.changes.map((change) => {
    const row = el("tr", null, {"data-item": itemName(change)});
    const status = change.status === "dry_run" ? "dry run: would be, nothing written" : change.status;
    row.append(el("td", itemName(change)), bindingsCell(job.portal, change.before), el("td", "→"),
               bindingsCell(job.portal, change.after),
               el("td", status + (change.errors.length ? `: ${change.errors[0].what_to_do || change.errors[0].code}` : "")));
    return row;
  }));
  $("#d-plan tbody").replaceChildren(...job.plan.map((item) => {
    const row = el("tr");
    row.append(el("td", itemName(item)), bindingsCell(job.portal, item.before), el("td", "→"),
               bindingsCell(job.portal, item.after),
               el("td", [...(item.rules || []), ...(item.notes || [])].join("; ") + (item.dry_run ? " (dry run)" : "")));
    return row;
  }));
  $("#d-payload").textContent = job.payload ? JSON.stringify(job.payload, null, 2)
    : `Not kept for this job (started by ${job.trigger}, or queued before b24rebind kept events).`;
  $("#d-attempts").replaceChildren(...job.attempts.map((attempt) => el("li",
    `attempt ${attempt.number} at ${new Date(attempt.started_at * 1000).toLocaleTimeString()}: ${attempt.outcome}`
    + (attempt.error ? ` (${attempt.error.code}: ${attempt.error.what_to_do || attempt.error.description})` : ""))));
}

// ------------------------------------------------------------------ live updates

async function follow() {
  // fetch rather than EventSource: EventSource cannot send the Authorization header.
  for (;;) {
    try {
      const headers = token() ? {Authorization: `Bearer ${token()}`} : {};
      const response = await fetch("/api/stream", {headers});
      if (response.status === 401 || response.status === 403) {
        streamState = "unauthorised"; renderHealth();
        return;  // the banner says why; entering a token reloads the page
      }
      if (!response.ok) { throw new Error(`stream: HTTP ${response.status}`); }
      streamState = "live"; renderHealth();
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
    streamState = "reconnecting";
    await checkHealth();
    await new Promise((resolve) => setTimeout(resolve, 2000));
    await Promise.all([loadJobs(), refreshStats().catch(showError).then(refreshFailed)]).catch(showError);
  }
}

// Reads that fail say so where their data would be (statsUnknown, refreshFailed, loadJobs); this is for
// what is left: the console, for whoever looks.
function showError(error) {
  if (error instanceof Refused || error instanceof ApiError) { return; }
  console.warn(error);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#filters").addEventListener("submit", (event) => { event.preventDefault(); filters = readFilters(); loadJobs(); });
  $("#filters").addEventListener("reset", () => { filters = {}; setTimeout(loadJobs); });
  $("#search").addEventListener("submit", (event) => { event.preventDefault(); search($("#q").value).catch(showError); });
  $("#more").addEventListener("click", () => loadJobs(true));
  $("#close-detail").addEventListener("click", () => { $("#detail").hidden = true; openJob = null; });
  $("#d-retry").addEventListener("click", () => retryJob(openJob).catch(showError));
  $("#d-undo").addEventListener("click", () => undoJob(openJob).catch(showError));
  $("#retry-all").addEventListener("click", async () => {
    let failed, dead;
    try {
      failed = await api("/api/jobs/retry?state=failed&limit=1000", {method: "POST"});
      dead = await api("/api/jobs/retry?state=dead&limit=1000", {method: "POST"});
    } catch (error) {
      say($("#attention-message"), ...failure(error, "retry"));
      return;
    }
    const more = failed.more || dead.more ? " More are left: click again once these have run." : "";
    say($("#attention-message"), "done", `Queued again: ${plural(failed.retried + dead.retried, "job")}.${more}`);
    Promise.all([refreshFailed(), refreshStats(), loadJobs()]).catch(showError);
  });
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem("b24-token", $("#token").value.trim());
    location.reload();
  });
  // The failed jobs are read even when the numbers could not be: each part says what it could not read.
  Promise.all([refreshStats().catch(showError).then(refreshFailed), loadJobs()]).catch(showError);
  setInterval(() => refreshStats().catch(showError), 10000);
  checkHealth();
  setInterval(checkHealth, HEALTH_EVERY);
  follow();
});
