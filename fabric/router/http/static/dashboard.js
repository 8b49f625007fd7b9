// fabric dashboard: the live view (/) and a workflow's page (/workflows/<id>).
// Vanilla JavaScript and SVG, no dependencies. Data: /api/v1/stream (server-sent events),
// /api/v1/history (stored samples) and /api/v1/workflows/<id> (the REST API).
"use strict";

const API = "/api/v1";
const JAEGER = document.querySelector('meta[name="fabric-jaeger-url"]').content;
const SVG_NS = "http://www.w3.org/2000/svg";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

// -- small helpers -----------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function fill(tbody, rows, columns, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: columns, text: empty }))]));
}

function cell(content, attrs = {}) {
  const td = el("td", attrs);
  td.append(content);
  return td;
}

function badge(state) { return el("span", { class: `status ${state}`, text: state }); }

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function when(epoch) { return epoch ? new Date(epoch * 1000).toLocaleTimeString() : "–"; }

function workflowHref(id) { return `/workflows/${encodeURIComponent(id)}`; }

// A workflow as people know it: the name its submitter set in the metadata, else a short id (the
// whole id is the link's tooltip).
function workflowName(id, metadata) {
  const name = metadata && metadata.name;
  if (name) return name;
  return id.length > 14 ? `${id.slice(0, 12)}…` : id;
}

function workflowLink(id, metadata) {
  return el("a", { href: workflowHref(id), class: "wf", title: id, text: workflowName(id, metadata) });
}

// "attempt 3", "attempts 1–4", "attempts 1–2, 4": a sorted list of attempt numbers, as ranges.
function attemptRange(attempts) {
  const sorted = [...new Set(attempts)].sort((a, b) => a - b);
  const parts = [];
  for (let i = 0; i < sorted.length; i++) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j] + 1) j++;
    parts.push(i === j ? `${sorted[i]}` : `${sorted[i]}–${sorted[j]}`);
    i = j;
  }
  return `${sorted.length > 1 ? "attempts" : "attempt"} ${parts.join(", ")}`;
}

// Each distinct error of a task once, with the attempts it ended: the history's failed attempts and the
// task's last error (when it is not already the last history entry).
function distinctErrors(task) {
  const failures = task.history.map((h) => [h.attempt, h.error ? `${h.error.type}: ${h.error.message}` : "no error recorded"]);
  if (task.error) {
    const text = `${task.error.type}: ${task.error.message}`;
    // A task that never started (upstream_failed, cancelled) has an error but no attempt.
    const attempt = task.attempts || null;
    if (!failures.some(([a, t]) => a === attempt && t === text)) failures.push([attempt, text]);
  }
  const byText = new Map();
  for (const [attempt, text] of failures) (byText.get(text) || byText.set(text, []).get(text)).push(attempt);
  return [...byText].map(([text, attempts]) => {
    const numbered = attempts.filter((a) => a !== null);
    return numbered.length ? `${attemptRange(numbered)}: ${text}` : text;
  });
}

function resultText(result) {
  if (result === null || result === undefined) return null;
  return JSON.stringify(result);
}

function traceUrl(traceId, find) {
  if (!JAEGER || !traceId) return null;
  const url = `${JAEGER}/trace/${traceId}`;
  return find ? `${url}?uiFind=${encodeURIComponent(find)}` : url;
}

function setText(id, text) { document.getElementById(id).textContent = text; }

// -- the live view -----------------------------------------------------------------------------------

function live() {
  document.getElementById("live").hidden = false;
  const conn = document.getElementById("connection");
  let lastSampleAt = 0;
  const source = new EventSource(`${API}/stream`);
  source.addEventListener("open", () => { conn.dataset.state = "live"; conn.textContent = "live"; });
  source.addEventListener("error", () => { conn.dataset.state = "down"; conn.textContent = "reconnecting…"; });
  source.addEventListener("problem", (e) => { conn.dataset.state = "down"; conn.textContent = JSON.parse(e.data).error; });
  source.addEventListener("snapshot", (e) => {
    conn.dataset.state = "live"; conn.textContent = "live";
    render(JSON.parse(e.data));
  });
  loadHistory();
  setInterval(loadHistory, 10000);  // samples come every router.sample_interval_s (10 s)

  function render(snap) {
    const { stats, rates, agents, running, recent } = snap;
    renderAttention(snap.alerts || [], snap.escalated || []);
    setText("throughput", rates.tasks_per_s.toFixed(1));
    setText("error-rate", `${(rates.error_rate * 100).toFixed(1)} %`);
    // A queue with messages and no consumer is stuck until an agent for it comes: red, and first.
    const queues = Object.entries(stats.queues)
      .map(([capability, q]) => [capability, { ...q, stuck: q.messages > 0 && q.consumers === 0 }])
      .sort(([a, qa], [b, qb]) => (qb.stuck - qa.stuck) || a.localeCompare(b));
    setText("queued", queues.reduce((sum, [, q]) => sum + q.messages, 0));
    document.getElementById("queued-tile").classList.toggle("bad", queues.some(([, q]) => q.stuck));
    setText("agents-alive", stats.agents.alive);
    setText("agents-lost", `alive · ${stats.agents.unhealthy ?? 0} unhealthy · ${stats.agents.lost} lost · ${stats.agents.stopped ?? 0} stopped`);
    setText("running-count", running.length >= 15 ? "15+" : running.length);
    setText("completed", stats.counters.completed ?? 0);
    setText("dead", stats.dead ? stats.dead.messages : "–");

    fill(document.querySelector("#queues tbody"), queues.map(([capability, q]) => {
      const name = el("span", { text: capability });
      const row = el("tr", { "data-capability": capability, "data-stuck": String(q.stuck), class: q.stuck ? "stuck" : null },
        cell(name), cell(String(q.messages)), cell(String(q.consumers)), cell(String(q.agents ?? "–")));
      if (q.stuck) name.append(" ", el("span", { class: "status stuck", text: "no consumer", title: "messages wait and nobody consumes them: start a worker with a handler for it" }));
      return row;
    }), 4, "no capability queue yet");

    fill(document.querySelector("#agents tbody"), agents.map((a) => {
      const breakers = el("span");
      for (const [capability, state] of Object.entries(a.breakers)) {
        if (state !== "closed") breakers.append(el("span", { class: `status ${state}`, text: `${capability}: ${state}` }), " ");
      }
      if (!breakers.childNodes.length) breakers.textContent = "all closed";
      // Scores per capability: the consumer priority (x-priority, 1..10) each is consumed with.
      const scores = Object.entries(a.consumers || {})
        .filter(([, c]) => c.score !== undefined && c.score !== null)
        .map(([capability, c]) => `${capability} ${c.score}`);
      const score = scores.length ? scores.join(", ") : "–";
      const stalled = Object.keys(a.unhealthy || {});
      const health = stalled.length
        ? el("span", { class: "status unhealthy", text: "unhealthy", title: a.reason || stalled.join(", ") })
        : badge(a.health);
      return el("tr", { "data-agent": a.agent_id },
        cell(el("span", { title: `${a.host} pid ${a.pid} · ${a.capabilities.join(", ")}`, text: a.agent_id })),
        cell(badge(a.state)), cell(health), cell(`${a.in_flight} / ${a.concurrency}`), cell(breakers),
        cell(score), cell(`${a.silent_s.toFixed(0)} s ago`));
    }), 7, "no agent has sent a heartbeat");

    const now = snap.at;
    fill(document.querySelector("#running tbody"), running.map((w) =>
      el("tr", { "data-workflow": w.workflow_id }, cell(workflowLink(w.workflow_id, w.metadata)),
        cell(`${w.task_count - w.remaining} / ${w.task_count}`), cell(w.capabilities.join(", ")),
        cell(duration(now - w.created_at)))), 4, "nothing running");

    fill(document.querySelector("#recent tbody"), recent.map((w) =>
      el("tr", { "data-workflow": w.workflow_id, "data-status": w.status }, cell(workflowLink(w.workflow_id, w.metadata)),
        cell(badge(w.status)), cell(String(w.task_count)),
        cell(duration((w.finished_at ?? now) - w.created_at)))), 4, "no workflow yet");
  }

  // The "Needs attention" box: tasks escalated to an operator, then the firing alerts, critical first
  // (an escalated task's own alert is not listed twice).
  function renderAttention(alerts, escalated) {
    const box = document.getElementById("attention");
    const items = escalated.map((t) => {
      const reason = (t.escalation && t.escalation.reason) || "escalated";
      const error = t.error ? ` — ${t.error.type}: ${t.error.message}` : "";
      return el("li", { "data-kind": "escalated", "data-workflow": t.workflow_id, "data-task": t.task_id },
        badge("escalated"), " ", el("span", { class: "what", text: `task ${t.task_id} (${t.capability}) waits for an operator: ${reason}` }),
        ` in workflow `, workflowLink(t.workflow_id), el("span", { class: "hint", text: `${error} · resume or abort it on the workflow's page` }));
    });
    const listed = new Set(escalated.map((t) => `task.escalated:${t.workflow_id}/${t.task_id}`));
    const rank = { critical: 0, warning: 1, info: 2 };
    const firing = alerts.filter((a) => !listed.has(a.key)).sort((a, b) => (rank[a.severity] ?? 3) - (rank[b.severity] ?? 3) || a.at - b.at);
    for (const a of firing) {
      const links = [];
      const labels = a.labels || {};
      if (labels.workflow_id) links.push(workflowLink(labels.workflow_id));
      if (labels.capability) links.push(el("a", { href: `#queues`, text: `queue ${labels.capability}` }));
      if (labels.agent_id) links.push(el("a", { href: `#agents`, text: `agent ${labels.agent_id}` }));
      const li = el("li", { "data-kind": "alert", "data-key": a.key, title: a.detail || "" },
        el("span", { class: `status ${a.severity}`, text: a.severity }), " ", el("span", { class: "what", text: a.summary }),
        el("span", { class: "hint", text: ` · ${a.kind} since ${when(a.at)}` }));
      for (const link of links) li.append(" · ", link);
      items.push(li);
    }
    box.classList.toggle("calm", items.length === 0);
    setText("attention-count", String(items.length));
    document.getElementById("attention-list").replaceChildren(...(items.length ? items
      : [el("li", { class: "quiet", text: "Nothing: no alert fires and no task waits for an operator." })]));
  }

  async function loadHistory() {
    const response = await fetch(`${API}/history`);
    if (!response.ok) return;
    const history = await response.json();
    const items = history.items;
    if (items.length && items[items.length - 1].at === lastSampleAt) return;
    lastSampleAt = items.length ? items[items.length - 1].at : 0;
    const series = (f) => items.map((s) => [s.at, f(s.data)]);
    const moved = (d, k) => (d.moved && d.moved[k]) || 0;
    const perSecond = (d, keys) => keys.reduce((sum, k) => sum + moved(d, k), 0) / (d.interval_s || 1);
    const charts = [
      ["throughput (tasks/s)", series((d) => perSecond(d, ["tasks_succeeded", "tasks_failed", "tasks_parked"]))],
      ["error rate (%)", series((d) => {
        const bad = moved(d, "tasks_failed") + moved(d, "tasks_parked") + moved(d, "tasks_retried");
        const all = bad + moved(d, "tasks_succeeded");
        return all ? (100 * bad) / all : 0;
      })],
      ["queued messages", series((d) => Object.values(d.queues || {}).reduce((a, b) => a + b, 0))],
      ["agents alive", series((d) => d.agents_alive || 0)],
      ["tasks in flight", series((d) => d.in_flight || 0)],
    ];
    const box = document.getElementById("charts");
    box.replaceChildren(...charts.map(([title, points]) => chart(title, points)));
  }
}

// A line chart of the last hour: x from an hour ago to now, y from 0 to the largest value.
function chart(title, points) {
  const W = 300, H = 90, pad = 14;
  const end = Date.now() / 1000, start = end - 3600;
  const top = Math.max(1, ...points.map(([, v]) => v));
  const x = (t) => pad + ((t - start) / (end - start)) * (W - 2 * pad);
  const y = (v) => H - pad - (v / top) * (H - 2 * pad);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", "data-points": points.length });
  svg.append(el("svg:line", { x1: pad, x2: W - pad, y1: H - pad, y2: H - pad, stroke: "#d9dde3" }));
  if (points.length) {
    const line = points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const first = x(points[0][0]).toFixed(1), last = x(points[points.length - 1][0]).toFixed(1);
    svg.append(el("svg:path", { class: "area", d: `${line} L${last},${H - pad} L${first},${H - pad} Z` }));
    svg.append(el("svg:path", { class: "line", d: line }));
  }
  svg.append(el("svg:text", { x: pad, y: H - 2, text: "−60 min" }), el("svg:text", { x: W - pad - 18, y: H - 2, text: "now" }));
  svg.append(el("svg:text", { x: pad, y: 10, text: `max ${top.toFixed(top < 10 ? 1 : 0)}` }));
  const latest = points.length ? points[points.length - 1][1] : 0;
  return el("div", { class: "chart" }, el("div", { class: "title" }, el("span", { text: title }),
    el("span", { text: points.length ? latest.toFixed(latest < 10 ? 2 : 0) : "no samples" })), svg);
}

// -- a workflow's page -------------------------------------------------------------------------------

function workflowPage(id) {
  document.getElementById("workflow").hidden = false;
  document.title = `fabric · ${id}`;
  setText("wf-id", id);
  setText("wf-name", id);
  const conn = document.getElementById("connection");
  const legend = document.getElementById("legend");
  legend.replaceChildren(...["waiting", "queued", "running", "retrying", "succeeded", "failed", "dead", "escalated", "cancelled", "upstream_failed"].map(badge));
  let timer = null;

  async function load() {
    let response;
    try {
      response = await fetch(`${API}/workflows/${encodeURIComponent(id)}`);
    } catch (err) {
      conn.dataset.state = "down"; conn.textContent = "router unreachable";
      return schedule();
    }
    if (response.status === 404) {
      conn.dataset.state = "missing"; conn.textContent = "not found";
      document.title = `fabric · ${id} not found`;
      const status = document.getElementById("wf-status");
      status.className = "status"; status.textContent = "not found";
      document.getElementById("wf-body").hidden = true;
      document.getElementById("wf-missing").hidden = false;
      setText("wf-error", `The store of this namespace has no workflow ${id}.`);
      return;
    }
    if (!response.ok) { conn.dataset.state = "down"; conn.textContent = `HTTP ${response.status}`; return schedule(); }
    const wf = await response.json();
    conn.dataset.state = "live"; conn.textContent = TERMINAL.has(wf.status) ? "finished" : "following";
    render(wf);
    if (!TERMINAL.has(wf.status)) schedule();
  }

  function schedule() { clearTimeout(timer); timer = setTimeout(load, 1000); }

  function render(wf) {
    const status = document.getElementById("wf-status");
    status.className = `status ${wf.status}`; status.textContent = wf.status;
    const name = workflowName(wf.workflow_id, wf.metadata);
    setText("wf-name", name);
    document.title = `fabric · ${name}`;
    const others = Object.entries(wf.metadata || {}).filter(([k]) => k !== "name").map(([k, v]) => `${k}: ${v}`);
    setText("wf-meta", others.length ? ` · ${others.join(" · ")}` : "");
    const took = wf.finished_at ? ` · took ${duration(wf.finished_at - wf.created_at)}` : "";
    setText("wf-times", `submitted ${new Date(wf.created_at * 1000).toLocaleString()}${took} · ${wf.task_count} tasks`);
    const trace = document.getElementById("wf-trace");
    const url = traceUrl(wf.trace_id);
    trace.replaceChildren(url ? el("a", { id: "trace-link", href: url, target: "_blank", rel: "noopener", text: `trace ${wf.trace_id} in Jaeger` })
      : el("span", { text: wf.trace_id ? `trace ${wf.trace_id}` : "no trace (tracing was off)" }));
    drawDag(wf.tasks);
    renderActions(wf);
    const rows = Object.entries(wf.tasks).sort(([a], [b]) => a.localeCompare(b)).map(([taskId, t]) => {
      const link = traceUrl(wf.trace_id, taskId);
      const errors = distinctErrors(t);
      const errorCell = el("td", { class: errors.length ? "errors error" : "errors" });
      if (errors.length) errorCell.append(...errors.map((text) => el("div", { class: "err", text })));
      else errorCell.textContent = "–";
      const result = resultText(t.result);
      return el("tr", { "data-task": taskId, "data-status": t.status },
        cell(taskId), cell(t.capability), cell(badge(t.status)), cell(`${t.attempts} / ${t.max_attempts}`),
        cell(t.agent || "–"), cell(t.started_at && t.finished_at ? duration(t.finished_at - t.started_at) : "–"),
        cell(result ?? "–", { class: "result", title: result }), errorCell,
        cell(link ? el("a", { href: link, target: "_blank", rel: "noopener", text: "spans" }) : "–"));
    });
    fill(document.querySelector("#tasks tbody"), rows, 9, "no tasks");
  }

  // What an operator can do about each escalated task: resume it (optionally with a new input) or
  // abort it, with the CLI or the REST API.
  function renderActions(wf) {
    const box = document.getElementById("wf-actions");
    const escalated = Object.entries(wf.tasks).filter(([, t]) => t.status === "escalated").sort(([a], [b]) => a.localeCompare(b));
    box.hidden = escalated.length === 0;
    if (box.hidden) return box.replaceChildren();
    const wid = wf.workflow_id;
    box.replaceChildren(el("h2", { text: "Waiting for an operator" }), el("ul", {}, ...escalated.map(([taskId, t]) => {
      const e = t.escalation || {};
      const error = t.error ? `${t.error.type}: ${t.error.message}` : "";
      const api = `${API}/workflows/${encodeURIComponent(wid)}/tasks/${encodeURIComponent(taskId)}`;
      return el("li", { "data-task": taskId },
        el("div", {}, el("span", { class: "what", text: `task ${taskId} is escalated (${e.reason || "requested"})` }),
          el("span", { class: "hint", text: ` after attempt ${e.attempt ?? t.attempts}${e.agent ? " on " + e.agent : ""}${error ? ": " + error : ""}` })),
        el("div", {}, "Resume: ", el("code", { text: `fabric resume ${wid} --task ${taskId} [--input FILE]` }),
          " or ", el("code", { text: `POST ${api}/resume` }), el("span", { class: "hint", text: ' (body {"input": …} to run it with a new input)' })),
        el("div", {}, "Abort: ", el("code", { text: `fabric abort ${wid} --task ${taskId} [--reason TEXT]` }),
          " or ", el("code", { text: `POST ${api}/abort` }), el("span", { class: "hint", text: " (its dependents will not run)" })));
    })));
  }

  load();
}

// Layered drawing (Sugiyama style): a task's column (layer) is the length of the longest dependency
// chain before it. Within each column tasks are ordered by the barycenter of their neighbours, sweeping
// right then left a few times, which removes most edge crossings. Nodes are as wide as their longest
// text. Edges run from a dependency's right side to the task's left side.
function drawDag(tasks) {
  const ids = Object.keys(tasks).sort();
  const depth = {};
  const visit = (id, seen = new Set()) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    const deps = tasks[id].depends_on.filter((d) => tasks[d]);
    depth[id] = deps.length ? 1 + Math.max(...deps.map((d) => visit(d, seen))) : 0;
    return depth[id];
  };
  ids.forEach((id) => visit(id));
  const columns = [];
  for (const id of ids) (columns[depth[id]] ||= []).push(id);
  for (let c = 0; c < columns.length; c++) columns[c] ||= [];
  orderByBarycenter(columns, tasks);

  const texts = {};
  for (const id of ids) {
    const t = tasks[id];
    const attempts = t.attempts > 1 ? `${t.attempts} attempts` : t.attempts === 1 ? "1 attempt" : "not started";
    texts[id] = { label: id.length > 40 ? `${id.slice(0, 39)}…` : id, sub: `${t.status} · ${attempts}`, attempts };
  }
  const PAD = 10;
  const widest = Math.max(0, ...ids.map((id) => Math.max(textWidth(texts[id].label, 12), textWidth(texts[id].sub, 10))));
  const NW = Math.ceil(Math.max(150, widest + 2 * PAD + 4)), NH = 44, GX = 60, GY = 18, M = 16;
  const rows = Math.max(1, ...columns.map((c) => c.length));
  const pos = {};
  columns.forEach((column, c) => {
    // Shorter columns are centred, so edges run as straight as they can.
    const offset = ((rows - column.length) * (NH + GY)) / 2;
    column.forEach((id, r) => { pos[id] = { x: M + c * (NW + GX), y: M + offset + r * (NH + GY) }; });
  });
  const width = M * 2 + columns.length * (NW + GX) - GX;
  const height = M * 2 + rows * (NH + GY) - GY;
  const svg = document.getElementById("dag");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const edges = [], nodes = [];
  for (const id of ids) {
    for (const dep of tasks[id].depends_on) {
      if (!pos[dep]) continue;
      const x1 = pos[dep].x + NW, y1 = pos[dep].y + NH / 2, x2 = pos[id].x, y2 = pos[id].y + NH / 2;
      const mid = (x1 + x2) / 2;
      edges.push(el("svg:path", { class: "edge", "data-from": dep, "data-to": id, d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}` }));
    }
    const t = tasks[id];
    const title = el("svg:title", { text: `${id} (${t.capability}): ${t.status}, ${texts[id].attempts}` });
    nodes.push(el("svg:g", { class: `node ${t.status}`, "data-task": id, "data-status": t.status, "data-attempts": t.attempts,
      "data-column": depth[id], transform: `translate(${pos[id].x},${pos[id].y})` },
    title, el("svg:rect", { width: NW, height: NH, rx: 6 }),
    el("svg:text", { x: PAD, y: 18, text: texts[id].label }),
    el("svg:text", { x: PAD, y: 35, class: "sub", text: texts[id].sub })));
  }
  svg.replaceChildren(...edges, ...nodes);
}

// Reorders each column in place: a task moves to the mean position of its neighbours in the columns
// already placed (dependencies on the way right, dependents on the way left); ties keep their order.
function orderByBarycenter(columns, tasks) {
  const dependents = {};
  for (const [id, t] of Object.entries(tasks)) for (const d of t.depends_on) if (tasks[d]) (dependents[d] ||= []).push(id);
  const rank = {};
  const place = () => columns.forEach((column) => column.forEach((id, r) => { rank[id] = r / Math.max(1, column.length - 1); }));
  const sweep = (c, neighbours) => {
    const keyed = columns[c].map((id, r) => {
      const ns = neighbours(id).filter((n) => rank[n] !== undefined);
      return [ns.length ? ns.reduce((sum, n) => sum + rank[n], 0) / ns.length : rank[id], r, id];
    });
    keyed.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    columns[c] = keyed.map(([, , id]) => id);
    columns[c].forEach((id, r) => { rank[id] = r / Math.max(1, columns[c].length - 1); });
  };
  place();
  for (let round = 0; round < 4; round++) {
    for (let c = 1; c < columns.length; c++) sweep(c, (id) => tasks[id].depends_on);
    for (let c = columns.length - 2; c >= 0; c--) sweep(c, (id) => dependents[id] || []);
  }
}

const measure = document.createElement("canvas").getContext("2d");
// The width in pixels of ``text`` in the page's font at ``size`` px (as the DAG's SVG text draws it).
function textWidth(text, size) {
  measure.font = `${size}px ${getComputedStyle(document.body).fontFamily}`;
  return measure.measureText(text).width;
}

// -- routing -----------------------------------------------------------------------------------------

const match = location.pathname.match(/^\/workflows\/([^/]+)$/);
if (match) workflowPage(decodeURIComponent(match[1]));
else live();
