// Kiln's history UI: the page is chosen by the path, data comes from /api, and the
// server-sent event stream (/api/events) says which build changed, so the page re-reads it.
"use strict";

const main = document.getElementById("main");
const path = window.location.pathname;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") node.setAttribute("style", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function seconds(ms) {
  return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + "s";
}

function duration(build) {
  const end = build.completed || Date.now();
  return seconds(end - build.started);
}

async function json(url) {
  const response = await fetch(url);
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("a token is needed");
  }
  if (!response.ok) throw new Error(url + ": " + response.status + " " + (await response.text()));
  return response.json();
}

// Replaces the page's content (absent parts, null, left out).
function show(...parts) {
  main.replaceChildren(...parts.filter((part) => part !== null && part !== undefined));
}

// One render at a time, at most every `interval` ms, however many events arrive: an event
// during a render runs one more after it, so the page ends on the latest state.
function throttled(render, interval) {
  let running = false, again = false;
  const run = async () => {
    running = true;
    again = false;
    try { await render(); } catch (error) { main.replaceChildren(el("p", { class: "error" }, String(error))); }
    setTimeout(() => { running = false; if (again) run(); }, interval);
  };
  return () => { if (running) again = true; else run(); };
}

// Calls `onChange(id)` for the events named (`builds`: the list changed; `build`: a build
// progressed), and `onChange(null)` when the page should read everything again.
function live(names, onChange) {
  const indicator = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.onopen = () => indicator.classList.add("on");
  source.onerror = () => indicator.classList.remove("on");
  for (const name of names) source.addEventListener(name, (event) => onChange(event.data));
  source.addEventListener("reload", () => onChange(null));
  // A page left for another keeps no stream open (a browser allows six connections to a
  // host: streams of pages kept for "back" would use them up); coming back reloads it.
  window.addEventListener("pagehide", () => source.close());
  window.addEventListener("pageshow", (event) => { if (event.persisted) window.location.reload(); });
}

// --- The builds -------------------------------------------------------------------------

async function renderBuilds() {
  const builds = await json("/api/builds");
  const rows = builds.map((b) =>
    el("tr", { class: "build", "data-id": b.id, "data-status": b.status },
      el("td", {}, el("a", { href: "/builds/" + b.id }, b.id)),
      el("td", { class: "status status-" + b.status }, b.status),
      el("td", {}, b.target || b.file_name || "-"),
      el("td", {}, duration(b)),
      el("td", {}, new Date(b.started).toISOString().replace("T", " ").slice(0, 19)),
      el("td", {}, b.submitted_by || "-"),
      el("td", {}, b.counts.executed),
      el("td", {}, b.counts.cached),
      el("td", {}, b.counts.deduplicated)));
  main.replaceChildren(
    el("h1", {}, "Builds"),
    builds.length === 0 ? el("p", { class: "muted" }, "No builds yet.") :
      el("table", { id: "builds" },
        el("thead", {}, el("tr", {}, ...["Build", "Status", "Target", "Duration", "Started", "By", "Executed", "Cached", "Deduplicated"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
}

// --- One build's timeline ----------------------------------------------------------------

// The steps on the critical path: from the step that ended last, back through the step that
// ended last before each one started (records carry no edges; this is the chain that set
// the build's length).
function criticalPath(vertices) {
  const timed = vertices.filter((v) => v.started && v.completed);
  const path = new Set();
  let current = timed.reduce((a, b) => (!a || b.completed > a.completed ? b : a), null);
  while (current) {
    path.add(current.digest);
    const before = timed.filter((v) => v.completed <= current.started && !path.has(v.digest));
    current = before.reduce((a, b) => (!a || b.completed > a.completed ? b : a), null);
  }
  return path;
}

function failingLine(build) {
  const match = /\(line (\d+)\)/.exec(build.error || "");
  if (!match || !build.dockerfile) return null;
  const line = Number(match[1]);
  const lines = build.dockerfile.split("\n");
  const from = Math.max(1, line - 2), to = Math.min(lines.length, line + 2);
  const shown = [];
  for (let n = from; n <= to; n++) {
    shown.push(el("div", { class: n === line ? "failing-line" : "" }, el("span", { class: "number" }, n), lines[n - 1]));
  }
  return el("div", { class: "dockerfile", id: "failing" }, ...shown);
}

// The step whose output is shown, kept across re-renders.
let shownStep = null;

async function showLogs(id, vertex) {
  shownStep = vertex.digest;
  const target = document.getElementById("logs");
  target.textContent = "…";
  const log = await json("/api/builds/" + id + "/logs/" + vertex.digest);
  const lines = log.lines.map((l) => l.line);
  if (log.dropped > 0) lines.unshift("(" + log.dropped + " earlier lines were not kept)");
  target.textContent = "# " + vertex.name + "\n" + (lines.length ? lines.join("\n") : "(no output)");
}

async function renderBuild(id) {
  const build = await json("/api/builds/" + id);
  const vertices = build.vertices || [];
  const starts = vertices.map((v) => v.started).filter(Boolean);
  const t0 = Math.min(build.started, ...starts);
  const t1 = Math.max(build.completed || Date.now(), ...vertices.map((v) => v.completed || 0));
  const span = Math.max(1, t1 - t0);
  const critical = criticalPath(vertices);
  const stages = new Map();
  for (const v of vertices) {
    const stage = v.stage || "—";
    if (!stages.has(stage)) stages.set(stage, []);
    stages.get(stage).push(v);
  }
  const rows = [];
  for (const [stage, members] of stages) {
    rows.push(el("div", { class: "stage" }, stage));
    for (const v of members) {
      const left = v.started ? ((v.started - t0) / span) * 100 : 0;
      const end = v.completed || (v.started ? Date.now() : v.started);
      const width = v.started ? Math.max(0.2, ((end - v.started) / span) * 100) : 0;
      const phases = v.phases || {};
      const total = (phases.queue_ms || 0) + (phases.fetch_ms || 0) + (phases.execute_ms || 0) + (phases.export_ms || 0);
      // Where the time went, for a step that ran (a cached or deduplicated one is one colour).
      const ran = v.status === "executed" || v.status === "failed";
      const segments = total > 0 && ran
        ? ["queue", "fetch", "execute", "export"].filter((p) => phases[p + "_ms"] > 0).map((p) =>
            el("div", { class: "seg " + p, title: p + " " + phases[p + "_ms"] + " ms", style: "width:" + (phases[p + "_ms"] / total) * 100 + "%" }))
        : [];
      const running = v.started && !v.completed;
      const bar = el("div", {
        class: "bar status-" + v.status + (total > 0 && ran ? " phased" : "") + (running ? " running" : ""),
        "data-digest": v.digest,
        title: v.name + " — " + v.status,
        style: "left:" + left + "%;width:" + width + "%",
        onclick: () => showLogs(id, v),
      }, ...segments);
      const worker = v.started && v.worker
        ? el("span", { class: "worker", style: "left:calc(" + Math.min(left + width, 100) + "% + 0.4em)" }, v.worker)
        : null;
      const dedup = v.deduplicated_from
        ? el("a", { class: "dedup", href: "/builds/" + v.deduplicated_from }, "waited on " + v.deduplicated_from)
        : null;
      rows.push(el("div", { class: "row vertex" + (critical.has(v.digest) ? " critical" : ""), "data-status": v.status, "data-digest": v.digest },
        el("div", { class: "label", title: v.name }, v.name, dedup),
        el("div", { class: "track" }, v.started ? bar : null, worker)));
    }
  }
  const summary = el("div", { class: "summary" },
    el("div", {}, el("b", {}, "Status"), el("span", { class: "status status-" + build.status, id: "build-status" }, build.status)),
    el("div", {}, el("b", {}, "Duration"), duration(build)),
    el("div", {}, el("b", {}, "Dockerfile"), build.file_name || "-"),
    el("div", {}, el("b", {}, "By"), build.submitted_by || "-"),
    el("div", {}, el("b", {}, "Steps"), build.counts.executed + " executed, " + build.counts.cached + " cached, " + build.counts.deduplicated + " deduplicated"));
  const legend = el("div", { class: "legend" },
    ...[["queue", "#cfd8dc"], ["fetch", "#90caf9"], ["execute", "var(--executed)"], ["export", "#a5d6a7"], ["cached", "var(--cached)"], ["deduplicated", "var(--deduplicated)"], ["failed", "var(--failed)"]]
      .map(([name, colour]) => el("span", {}, el("i", { style: "background:" + colour }), name)));
  show(
    el("h1", {}, "Build ", el("code", {}, build.id)),
    summary,
    build.error ? el("div", { class: "error", id: "error" }, build.error) : null,
    failingLine(build),
    legend,
    el("div", { class: "timeline", id: "timeline" }, ...rows),
    el("h2", {}, "Output"),
    el("pre", { id: "logs" }, "Click a step to see its output."));
  const shown = vertices.find((v) => v.digest === shownStep);
  if (shown) await showLogs(id, shown);
}

// --- Workers -------------------------------------------------------------------------------

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) { n /= 1024; unit++; }
  return (unit === 0 ? n : n.toFixed(1)) + " " + units[unit];
}

function ago(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 1 ? "now" : s < 120 ? Math.round(s) + " s ago" : Math.round(s / 60) + " min ago";
}

async function renderWorkers() {
  const workers = await json("/api/workers");
  const rows = workers.map((w) => {
    // Its slots now: an adaptive worker's capacity, within its max-parallelism.
    const slots = w.slots ?? w.max_parallelism;
    const busy = Math.min(w.running, slots);
    const labels = Object.entries(w.labels || {}).map(([k, v]) => el("span", { class: "tag" }, k + "=" + v));
    const steps = (w.steps || []).map((s) => el("div", { class: "running-step", "data-vertex": s.vertex, title: s.vertex },
      s.name, el("span", { class: "muted" }, " · " + seconds(Date.now() - s.since))));
    return el("tr", { class: "worker-row", "data-name": w.name, "data-state": w.state },
      el("td", {}, el("b", {}, w.name)),
      el("td", {}, (w.platforms || []).join(", ")),
      el("td", { class: "labels" }, ...labels),
      el("td", { class: "state state-" + w.state }, w.state),
      el("td", { class: "slots", "data-busy": busy, "data-free": slots - busy },
        el("span", { class: "meter" }, el("i", { style: "width:" + (busy / Math.max(1, slots)) * 100 + "%" })),
        busy + " busy / " + (slots - busy) + " free"),
      el("td", { class: "steps" }, ...(steps.length ? steps : [el("span", { class: "muted" }, "idle")])),
      el("td", { class: "cache", "data-bytes": w.cache_bytes }, w.cache_bytes ? bytes(w.cache_bytes) : "-"),
      el("td", {}, bytes(w.free_disk)),
      el("td", { class: "heartbeat" }, w.last_heartbeat ? ago(w.last_heartbeat) : "-"),
      el("td", { class: "muted" }, w.address || "(this daemon)"));
  });
  main.replaceChildren(
    el("h1", {}, "Workers"),
    workers.length === 0 ? el("p", { class: "muted" }, "No workers are connected.") :
      el("table", { id: "workers" },
        el("thead", {}, el("tr", {}, ...["Name", "Platforms", "Labels", "State", "Slots", "Running steps", "Cache", "Free disk", "Heartbeat", "Address"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows)));
}

// --- The cluster ---------------------------------------------------------------------------

const PALETTE = ["#1e88e5", "#e53935", "#43a047", "#fb8c00", "#8e24aa", "#00897b", "#6d4c41", "#546e7a"];

// Each platform's queued steps over the samples, as an SVG line chart.
function queueChart(samples) {
  const width = 900, height = 220, pad = 32;
  const platforms = [...new Set(samples.flatMap((s) => Object.keys(s.platforms)))].sort();
  const t0 = samples.length ? samples[0].at : 0, t1 = samples.length ? samples[samples.length - 1].at : 1;
  const peak = Math.max(1, ...samples.flatMap((s) => Object.values(s.platforms).map((q) => q.queued)));
  const x = (at) => pad + ((at - t0) / Math.max(1, t1 - t0)) * (width - 2 * pad);
  const y = (n) => height - pad - (n / peak) * (height - 2 * pad);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("id", "queue-chart");
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, class: "axis" });
  add("line", { x1: pad, y1: pad, x2: pad, y2: height - pad, class: "axis" });
  add("text", { x: pad - 6, y: pad + 4, "text-anchor": "end", class: "tick" }, peak);
  add("text", { x: pad - 6, y: height - pad, "text-anchor": "end", class: "tick" }, 0);
  add("text", { x: pad, y: height - 8, class: "tick" }, samples.length ? new Date(t0).toTimeString().slice(0, 8) : "");
  add("text", { x: width - pad, y: height - 8, "text-anchor": "end", class: "tick" }, samples.length ? new Date(t1).toTimeString().slice(0, 8) : "");
  platforms.forEach((platform, i) => {
    const points = samples.map((s) => x(s.at).toFixed(1) + "," + y((s.platforms[platform] || { queued: 0 }).queued).toFixed(1));
    add("polyline", { points: points.join(" "), class: "queue-line", "data-platform": platform, stroke: PALETTE[i % PALETTE.length] });
  });
  const legend = el("div", { class: "legend" }, ...platforms.map((p, i) =>
    el("span", {}, el("i", { style: "background:" + PALETTE[i % PALETTE.length] }), p)));
  return el("div", { class: "chart" }, svg, legend);
}

function percent(rate) {
  return rate === null ? "-" : (rate * 100).toFixed(1) + "%";
}

async function renderCluster() {
  const cluster = await json("/api/cluster");
  const steps = cluster.steps;
  const tiles = el("div", { class: "tiles" },
    el("div", { class: "tile" }, el("b", {}, "Builds"), el("span", { id: "build-count" }, cluster.builds)),
    el("div", { class: "tile" }, el("b", {}, "Cache hit rate"), el("span", { id: "cache-hit-rate" }, percent(cluster.cache_hit_rate)),
      el("small", {}, steps.cached + " of " + (steps.executed + steps.cached + steps.deduplicated + steps.failed) + " steps")),
    el("div", { class: "tile" }, el("b", {}, "Deduplicated"), el("span", { id: "dedup-rate" }, percent(cluster.dedup_rate)),
      el("small", {}, steps.deduplicated + " steps waited on another build")),
    el("div", { class: "tile" }, el("b", {}, "Deduplication saved"),
      el("span", { id: "dedup-saved", "data-ms": cluster.dedup_saved_ms }, (cluster.dedup_saved_ms / 1000).toFixed(1) + " CPU-s"),
      el("small", {}, "execution time not spent twice")));
  show(
    el("h1", {}, "Cluster"),
    tiles,
    cluster.queues === null ? null : el("h2", {}, "Queued steps per platform"),
    cluster.queues === null ? null : queueChart(cluster.queues),
    cluster.queues === null ? null : el("p", { class: "muted" }, "Sampled every " + cluster.sample_every_ms / 1000 + " s; the last " + cluster.queues.length + " samples."));
}

// --- Login -----------------------------------------------------------------------------------

function renderLogin() {
  const input = el("input", { id: "token", type: "password", placeholder: "token", autocomplete: "off" });
  const message = el("p", { id: "login-error", class: "muted" });
  const submit = async (event) => {
    event.preventDefault();
    const response = await fetch("/api/login", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ token: input.value }),
    });
    if (response.ok) window.location.assign("/");
    else message.textContent = "That token is not one of this daemon's.";
  };
  show(
    el("h1", {}, "Log in"),
    el("p", {}, "Give a token of this daemon's (a read token is enough to look)."),
    el("form", { id: "login", onsubmit: submit }, input, " ", el("button", { id: "login-button", type: "submit" }, "Log in")),
    message);
}

// --- Routing -------------------------------------------------------------------------------

const buildMatch = /^\/builds\/([A-Za-z0-9_-]+)$/.exec(path);
if (buildMatch) {
  const id = buildMatch[1];
  const render = throttled(() => renderBuild(id), 250);
  render();
  live(["build", "builds"], (changed) => { if (changed === null || changed === id) render(); });
} else if (path === "/login") {
  renderLogin();
} else if (path === "/workers" || path === "/cluster") {
  // Heartbeats and queue samples change without a build event: read again every 2 s too.
  const render = throttled(path === "/workers" ? renderWorkers : renderCluster, 1000);
  render();
  setInterval(render, 2000);
  live(["builds", "build"], () => render());
} else {
  const render = throttled(renderBuilds, 1000);
  render();
  live(["builds"], () => render());
}
