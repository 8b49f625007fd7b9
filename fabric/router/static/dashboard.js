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

function workflowLink(id) { return el("a", { href: `/workflows/${encodeURIComponent(id)}`, class: "wf", text: id }); }

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
    setText("throughput", rates.tasks_per_s.toFixed(1));
    setText("error-rate", `${(rates.error_rate * 100).toFixed(1)} %`);
    const queues = Object.entries(stats.queues).sort();
    setText("queued", queues.reduce((sum, [, q]) => sum + q.messages, 0));
    setText("agents-alive", stats.agents.alive);
    setText("agents-lost", `alive · ${stats.agents.unhealthy ?? 0} unhealthy · ${stats.agents.lost} lost · ${stats.agents.stopped ?? 0} stopped`);
    setText("running-count", running.length >= 15 ? "15+" : running.length);
    setText("completed", stats.counters.completed ?? 0);
    setText("dead", stats.dead ? stats.dead.messages : "–");

    fill(document.querySelector("#queues tbody"), queues.map(([capability, q]) =>
      el("tr", { "data-capability": capability }, cell(capability), cell(String(q.messages)), cell(String(q.consumers)))), 3, "no capability queue yet");

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
      el("tr", { "data-workflow": w.workflow_id }, cell(workflowLink(w.workflow_id)),
        cell(`${w.task_count - w.remaining} / ${w.task_count}`), cell(w.capabilities.join(", ")),
        cell(duration(now - w.created_at)))), 4, "nothing running");

    fill(document.querySelector("#recent tbody"), recent.map((w) =>
      el("tr", { "data-workflow": w.workflow_id, "data-status": w.status }, cell(workflowLink(w.workflow_id)),
        cell(badge(w.status)), cell(String(w.task_count)),
        cell(duration((w.finished_at ?? now) - w.created_at)))), 4, "no workflow yet");
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
      conn.dataset.state = "live"; conn.textContent = "loaded";
      const err = document.getElementById("wf-error");
      err.hidden = false; err.textContent = `No workflow ${id} in the store.`;
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
    const took = wf.finished_at ? ` · took ${duration(wf.finished_at - wf.created_at)}` : "";
    setText("wf-times", `submitted ${new Date(wf.created_at * 1000).toLocaleString()}${took} · ${wf.task_count} tasks`);
    const trace = document.getElementById("wf-trace");
    const url = traceUrl(wf.trace_id);
    trace.replaceChildren(url ? el("a", { id: "trace-link", href: url, target: "_blank", rel: "noopener", text: `trace ${wf.trace_id} in Jaeger` })
      : el("span", { text: wf.trace_id ? `trace ${wf.trace_id}` : "no trace (tracing was off)" }));
    drawDag(wf.tasks);
    const rows = Object.entries(wf.tasks).sort(([a], [b]) => a.localeCompare(b)).map(([taskId, t]) => {
      const link = traceUrl(wf.trace_id, taskId);
      const errors = t.history.map((h) => `attempt ${h.attempt}: ${h.error ? h.error.type + ": " + h.error.message : "?"}`);
      if (t.error) errors.push(`${t.error.type}: ${t.error.message}`);
      return el("tr", { "data-task": taskId, "data-status": t.status },
        cell(taskId), cell(t.capability), cell(badge(t.status)), cell(`${t.attempts} / ${t.max_attempts}`),
        cell(t.agent || "–"), cell(t.started_at && t.finished_at ? duration(t.finished_at - t.started_at) : "–"),
        cell(errors.join("; ") || "–", { class: errors.length ? "error" : null }),
        cell(link ? el("a", { href: link, target: "_blank", rel: "noopener", text: "spans" }) : "–"));
    });
    fill(document.querySelector("#tasks tbody"), rows, 8, "no tasks");
  }

  load();
}

// Layered drawing: a task's column is the length of the longest dependency chain before it; tasks of
// one column are stacked in id order. Edges run from a dependency's right side to the task's left side.
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
  const NW = 150, NH = 44, GX = 60, GY = 18, M = 16;
  const pos = {};
  columns.forEach((column, c) => column.forEach((id, r) => { pos[id] = { x: M + c * (NW + GX), y: M + r * (NH + GY) }; }));
  const width = M * 2 + columns.length * (NW + GX) - GX;
  const height = M * 2 + Math.max(...columns.map((c) => c.length)) * (NH + GY) - GY;
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
    const label = id.length > 20 ? `${id.slice(0, 19)}…` : id;
    const attempts = t.attempts > 1 ? `${t.attempts} attempts` : t.attempts === 1 ? "1 attempt" : "not started";
    const title = el("svg:title", { text: `${id} (${t.capability}): ${t.status}, ${attempts}` });
    nodes.push(el("svg:g", { class: `node ${t.status}`, "data-task": id, "data-status": t.status, "data-attempts": t.attempts,
      transform: `translate(${pos[id].x},${pos[id].y})` },
    title, el("svg:rect", { width: NW, height: NH, rx: 6 }),
    el("svg:text", { x: 10, y: 18, text: label }),
    el("svg:text", { x: 10, y: 35, class: "sub", text: `${t.status} · ${attempts}` })));
  }
  svg.replaceChildren(...edges, ...nodes);
}

// -- routing -----------------------------------------------------------------------------------------

const match = location.pathname.match(/^\/workflows\/([^/]+)$/);
if (match) workflowPage(decodeURIComponent(match[1]));
else live();
