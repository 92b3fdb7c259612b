// The Titanic dashboard. It holds no data of its own: it draws the JSON snapshots that
// GET /v1/events streams (server/observe/dashboard.py), each the admin API's answers to
// /v1/status, /v1/clients, /v1/plan and /v1/runs/ID. Text from the network is only ever
// set as textContent, never parsed as HTML.
"use strict";

// Set once per page load: a reload gives a new value (the browser test checks it does not change).
window.dashboardLoadId = `${Date.now()}-${Math.random().toString(36).slice(2)}`;
window.dashboardUpdates = 0; // snapshots drawn so far

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const LIVE_STATUSES = new Set(["measuring", "ready"]);
const PROFILE_NAMES = {
  flops_per_s: "compute",
  memory_bytes: "memory",
  gpu_memory_bytes: "GPU memory",
  upload_bytes_per_s: "upload",
  download_bytes_per_s: "download",
  rtt_s: "RTT",
};

let source = null; // the EventSource
let chosenRun = null; // run id picked in the selector; null: the newest
let snapshot = null; // the latest snapshot drawn
let snapshotAt = 0; // performance.now() when it arrived (heartbeat ages count on from there)
const charts = {}; // id -> {plot, key}

// ---- small helpers ----

function $(id) {
  return document.getElementById(id);
}

/** An element with attributes (all set with setAttribute, "class" included) and text or node children. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null && value !== false) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child !== undefined && child !== null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fill(parent, ...children) {
  parent.replaceChildren(...children.filter((c) => c !== undefined && c !== null));
}

function bytes(n) {
  if (n === undefined || n === null) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function si(n, unit) {
  if (n === undefined || n === null || !Number.isFinite(n)) return "-";
  for (const [factor, prefix] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (Math.abs(n) >= factor) return `${(n / factor).toFixed(1)} ${prefix}${unit}`;
  }
  return `${n.toFixed(1)} ${unit}`;
}

function seconds(s) {
  if (s === undefined || s === null || !Number.isFinite(s)) return "-";
  if (s < 1) return `${(s * 1000).toFixed(1)} ms`;
  if (s < 120) return `${s.toFixed(2)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function ppl(x) {
  return x === undefined || x === null ? "-" : x.toFixed(2);
}

function byKey(items, key) {
  const out = new Map();
  for (const item of items) {
    const k = key(item);
    if (!out.has(k)) out.set(k, []);
    out.get(k).push(item);
  }
  return out;
}

// ---- the header ----

function drawHeader(snap) {
  const s = snap.status;
  const counts = Object.entries(s.clients).map(([k, v]) => `${v} ${k}`).join(", ") || "no clients";
  $("server-line").textContent =
    `v${s.version} · model ${s.model || "(none)"} · control ${s.control_address}${s.tls ? " (TLS)" : ""} · ${counts}`;
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// ---- clients ----

/** Declared profile fields by their short names, in the table's column order. */
function declaredNames(fields) {
  const known = Object.keys(PROFILE_NAMES).filter((f) => fields.includes(f)).map((f) => PROFILE_NAMES[f]);
  return [...known, ...fields.filter((f) => !(f in PROFILE_NAMES))];
}

function profileCell(profile, field, text) {
  const declared = (profile.declared || []).includes(field);
  return el("td", { class: declared ? "num declared" : "num", title: declared ? "declared" : "measured" }, text);
}

function drawClients(snap) {
  const rows = snap.clients.map((c) => {
    const p = c.profile;
    const live = LIVE_STATUSES.has(c.status);
    const declared = p.declared || [];
    return el(
      "tr",
      { "data-client": c.client_id },
      el("td", { class: "name" }, c.client_id),
      el("td", {}, c.info.has_data ? "data owner" : "helper"),
      el(
        "td",
        { class: "status", "data-status": c.status, title: c.status_reason || "" },
        el("span", { class: `badge ${live ? "live" : "lost"}` }, live ? "live" : c.status === "left" ? "left" : "lost"),
        ` ${c.status}`,
      ),
      el("td", { class: "num age", "data-seen": c.seen_s_ago }, `${seconds(c.seen_s_ago)} ago`),
      el(
        "td",
        { class: "profile-kind", title: declared.join(", ") },
        declared.length ? `declared: ${declaredNames(declared).join(", ")}` : "measured",
      ),
      el("td", {}, p.accelerator ? `${p.device} (${p.accelerator})` : p.device),
      profileCell(p, "flops_per_s", si(p.flops_per_s, "FLOP/s")),
      profileCell(p, "memory_bytes", bytes(p.memory_bytes)),
      profileCell(p, "upload_bytes_per_s", `${si(p.upload_bytes_per_s, "B/s")}`),
      profileCell(p, "download_bytes_per_s", `${si(p.download_bytes_per_s, "B/s")}`),
      profileCell(p, "rtt_s", seconds(p.rtt_s)),
      el("td", { class: "num" }, p.capacity),
    );
  });
  fill($("clients").tBodies[0], ...rows);
  $("clients-count").textContent = `(${snap.clients.length})`;
  tickAges();
}

/** Heartbeat ages count on between snapshots (the server sends one only when something changed). */
function tickAges() {
  const elapsed = (performance.now() - snapshotAt) / 1000;
  for (const cell of document.querySelectorAll("#clients td.age")) {
    cell.textContent = `${seconds(Number(cell.dataset.seen) + elapsed)} ago`;
  }
}

// ---- the plan ----

function stageName(row, last) {
  if (row.layer_end > row.layer_start) return `blocks ${row.layer_start}–${row.layer_end - 1}`;
  if (row.partition === 0) return "embeddings";
  return row.partition === last ? "head" : "(no blocks)";
}

/** Measured seconds per stage, from the run's latest round of each pipeline: bridge run id -> stage_seconds. */
function measuredStages(run) {
  const out = new Map();
  if (!run) return out;
  for (const h of run.history) {
    const seen = out.get(h.bridge_run);
    if (h.stage_seconds && (!seen || seen.round <= h.round)) out.set(h.bridge_run, { round: h.round, stages: h.stage_seconds });
  }
  return out;
}

function link(from, to, profiles) {
  if (from.client_id === to.client_id) return el("div", { class: "link local" }, "local");
  const a = profiles.get(from.client_id) || {};
  const b = profiles.get(to.client_id) || {};
  const forward = Math.min(a.upload_bytes_per_s ?? Infinity, b.download_bytes_per_s ?? Infinity);
  const back = Math.min(b.upload_bytes_per_s ?? Infinity, a.download_bytes_per_s ?? Infinity);
  const rtt = Math.max(a.rtt_s || 0, b.rtt_s || 0);
  return el(
    "div",
    { class: "link", title: "activations forward, gradients back; the slower end's rate" },
    el("span", {}, `→ ${si(forward, "B/s")}`),
    el("span", {}, `← ${si(back, "B/s")}`),
    el("span", { class: "muted" }, `rtt ${seconds(rtt)}`),
  );
}

function drawPlan(snap) {
  const plan = snap.plan;
  $("plan-id").textContent = plan.plan_id ? `${plan.plan_id} · ${plan.state}` : plan.state;
  const s = plan.summary || {};
  $("plan-summary").textContent = plan.error
    ? plan.error
    : plan.rows.length
      ? `solver ${s.solver ?? "-"} in ${s.solve_ms ?? "-"} ms · bottleneck ${seconds(s.bottleneck_s)} · ` +
        `${s.num_stages ?? "-"} stages · blocks per stage ${JSON.stringify(s.block_counts ?? [])}`
      : "";
  const profiles = new Map(snap.clients.map((c) => [c.client_id, c.profile]));
  const measured = measuredStages(snap.run);
  const pipelines = [...byKey(plan.rows, (r) => r.pipeline).entries()].sort((a, b) => a[0] - b[0]);
  const drawn = pipelines.map(([index, rows]) => {
    rows.sort((a, b) => a.partition - b.partition);
    const last = rows[rows.length - 1].partition;
    const seen = measured.get(rows[0].run_id);
    const boxes = [];
    rows.forEach((row, i) => {
      if (i > 0) boxes.push(link(rows[i - 1], row, profiles));
      const took = seen ? seen.stages[row.partition] : undefined;
      boxes.push(
        el(
          "div",
          {
            class: `stage${row.local ? " local" : ""}`,
            "data-pipeline": index,
            "data-partition": row.partition,
            "data-client": row.client_id,
            title: row.why,
          },
          el("div", { class: "holder" }, row.client_id),
          el("div", {}, stageName(row, last)),
          el("div", { class: "muted" }, `est ${seconds(row.est_compute_s + row.est_transfer_s)}`),
          el("div", { class: "muted small" }, `compute ${seconds(row.est_compute_s)} + transfer ${seconds(row.est_transfer_s)}`),
          el(
            "div",
            { class: "measured", "data-seconds": took ?? "" },
            took === undefined ? "measured -" : `measured ${seconds(took)}${seen ? ` (round ${seen.round})` : ""}`,
          ),
        ),
      );
    });
    return el(
      "div",
      { class: "pipeline", "data-pipeline": index },
      el("div", { class: "pipeline-label" }, `pipeline ${index}`, el("br"), el("span", { class: "muted" }, `owner ${rows[0].owner_id}`)),
      el("div", { class: "stages" }, ...boxes),
    );
  });
  fill($("pipelines"), ...drawn);
}

// ---- runs ----

function drawRunSelect(snap) {
  const select = $("run-select");
  const shown = snap.run ? snap.run.run_id : "";
  const options = snap.runs
    .slice()
    .reverse()
    .map((r) => el("option", { value: r.run_id }, `${r.run_id}${r.name ? ` (${r.name})` : ""} · ${r.state}`));
  if (!options.length) options.push(el("option", { value: "" }, "none"));
  fill(select, ...options);
  select.value = shown;
}

function drawRunHead(run) {
  const state = $("run-state");
  state.textContent = run.state;
  state.className = `badge state-${run.state}`;
  const done = run.state === "done" ? run.rounds : Math.max(0, run.round - 1);
  const text = $("round-text");
  text.textContent = `round ${run.round} / ${run.rounds} · ${run.participation}${run.error ? ` · ${run.error}` : ""}`;
  text.dataset.round = run.round;
  text.dataset.rounds = run.rounds;
  $("round-bar").style.width = `${(100 * done) / Math.max(1, run.rounds)}%`;
}

function drawOwners(run) {
  const owners = Object.keys(run.live).sort();
  const rows = owners.map((owner) => {
    const now = run.live[owner];
    const loss = now.losses.length ? now.losses[now.losses.length - 1].toFixed(4) : "-";
    const eta = now.eta_s === null || now.eta_s === undefined ? "-" : seconds(now.eta_s);
    return el(
      "div",
      { class: "progress-line owner", "data-owner": owner, "data-round": now.round, "data-done": now.done, "data-steps": now.steps },
      el("span", { class: "step-text" }, `${owner} · round ${now.round} · step ${now.done} / ${now.steps}`),
      el("div", { class: "bar" }, el("div", { class: "fill" })),
      el("span", { class: "muted" }, `loss ${loss} · ${now.tokens_per_s.toFixed(1)} tok/s · left ${eta}`),
    );
  });
  if (!rows.length) rows.push(el("p", { class: "muted" }, "No steps reported yet."));
  fill($("owners-progress"), ...rows);
  // Widths through CSSOM: the page's Content-Security-Policy refuses style attributes.
  for (const line of document.querySelectorAll("#owners-progress .owner")) {
    line.querySelector(".fill").style.width = `${(100 * line.dataset.done) / Math.max(1, line.dataset.steps)}%`;
  }
}

/** Each owner's losses step by step: its rounds in order, then the live round if it is newer than them. */
function lossCurves(run) {
  const curves = new Map();
  const history = run.history.slice().sort((a, b) => a.round - b.round);
  for (const h of history) {
    if (!curves.has(h.owner)) curves.set(h.owner, { losses: [], last: 0 });
    const c = curves.get(h.owner);
    c.losses.push(...h.losses);
    c.last = h.round;
  }
  for (const [owner, now] of Object.entries(run.live)) {
    if (!curves.has(owner)) curves.set(owner, { losses: [], last: 0 });
    const c = curves.get(owner);
    if (now.round > c.last) c.losses.push(...now.losses);
  }
  return new Map([...curves.entries()].sort((a, b) => a[0].localeCompare(b[0])));
}

function chart(id, xLabel, yLabel, labels, data, { xIncrements = undefined, points = false } = {}) {
  const host = $(id);
  const key = JSON.stringify([xLabel, labels]);
  const width = Math.max(300, host.clientWidth || 500);
  const existing = charts[id];
  if (existing && existing.key === key) {
    existing.plot.setData(data);
    if (existing.width !== width) {
      existing.plot.setSize({ width, height: 260 });
      existing.width = width;
    }
    return;
  }
  if (existing) existing.plot.destroy();
  const options = {
    width,
    height: 260,
    scales: { x: { time: false } },
    axes: [xIncrements ? { label: xLabel, incrs: xIncrements } : { label: xLabel }, { label: yLabel, size: 60 }],
    series: [
      { label: xLabel },
      ...labels.map((label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5, points: { show: points } })),
    ],
  };
  charts[id] = { plot: new uPlot(options, data, host), key, width };
}

function drawLoss(run) {
  const curves = lossCurves(run);
  const longest = Math.max(0, ...[...curves.values()].map((c) => c.losses.length));
  const xs = Array.from({ length: longest }, (_, i) => i + 1);
  const ys = [...curves.values()].map((c) => xs.map((_, i) => c.losses[i] ?? null));
  chart("loss-chart", "step", "loss", [...curves.keys()], [xs, ...ys]);
}

function drawPerplexity(run) {
  const rounds = run.per_round.slice().sort((a, b) => a.round - b.round);
  const owners = [...new Set(rounds.flatMap((r) => Object.keys(r.owners)))].sort();
  const xs = rounds.map((r) => r.round);
  const ys = owners.map((o) => rounds.map((r) => r.owners[o] ?? null));
  chart("ppl-chart", "round", "perplexity", [...owners, "weighted"], [xs, ...ys, rounds.map((r) => r.ppl ?? null)], {
    xIncrements: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
    points: true,
  });

  const table = $("ppl-table");
  fill(table.tHead, el("tr", {}, el("th", {}, "round"), ...owners.map((o) => el("th", {}, o)), el("th", {}, "weighted")));
  fill(
    table.tBodies[0],
    ...rounds.map((r) =>
      el(
        "tr",
        { "data-round": r.round },
        el("td", { class: "num" }, r.round),
        ...owners.map((o) => el("td", { class: "num ppl", "data-owner": o, "data-round": r.round }, ppl(r.owners[o]))),
        el("td", { class: "num ppl", "data-owner": "", "data-round": r.round }, ppl(r.ppl)),
      ),
    ),
  );
  if (!rounds.length) fill(table.tBodies[0], el("tr", {}, el("td", { class: "muted" }, "no round finished yet")));
}

function drawTraffic(run) {
  const rounds = [...new Set(run.traffic.map((t) => t.round))].sort((a, b) => a - b);
  const clients = [...new Set(run.traffic.map((t) => t.client))].sort();
  const at = new Map(run.traffic.map((t) => [`${t.client}\u0000${t.round}`, t]));
  const table = $("traffic-table");
  fill(table.tHead, el("tr", {}, el("th", {}, "client"), ...rounds.map((r) => el("th", {}, `round ${r}`))));
  fill(
    table.tBodies[0],
    ...clients.map((client) =>
      el(
        "tr",
        { "data-client": client },
        el("td", { class: "name" }, client),
        ...rounds.map((round) => {
          const t = at.get(`${client}\u0000${round}`);
          if (!t) return el("td", { class: "num muted" }, "-");
          return el(
            "td",
            { class: "num traffic", "data-client": client, "data-round": round, "data-uploaded": t.uploaded, "data-downloaded": t.downloaded },
            el("span", { class: "up" }, `↑ ${bytes(t.uploaded)}`),
            el("br"),
            el("span", { class: "down" }, `↓ ${bytes(t.downloaded)}`),
          );
        }),
      ),
    ),
  );
  if (!clients.length) fill(table.tBodies[0], el("tr", {}, el("td", { class: "muted" }, "no transfers counted yet")));
}

/** Idle ratio per device and round, where the history carries it: a number (the owner's device) or {device or stage: ratio}. */
function idleRatios(run, plan) {
  const holders = new Map(plan.rows.map((r) => [`${r.run_id}\u0000${r.partition}`, r.client_id]));
  const out = [];
  for (const h of run.history) {
    if (h.idle_ratio === undefined || h.idle_ratio === null) continue;
    const entries = typeof h.idle_ratio === "number" ? [[h.owner, h.idle_ratio]] : Object.entries(h.idle_ratio);
    for (const [key, ratio] of entries) {
      const device = /^\d+$/.test(key) ? holders.get(`${h.bridge_run}\u0000${key}`) ?? `stage ${key}` : key;
      out.push({ device, round: h.round, ratio });
    }
  }
  return out;
}

function drawIdle(run, plan) {
  const ratios = idleRatios(run, plan);
  const host = $("idle");
  if (!ratios.length) {
    fill(
      host,
      el("p", { class: "idle-none" }, "-"),
      el("p", { class: "note" }, "No turn of this run has finished training yet (idle ratios come when every pipeline of a turn has reported)."),
    );
    return;
  }
  const rounds = [...new Set(ratios.map((r) => r.round))].sort((a, b) => a - b);
  const devices = [...new Set(ratios.map((r) => r.device))].sort();
  const at = new Map(ratios.map((r) => [`${r.device}\u0000${r.round}`, r.ratio]));
  fill(
    host,
    el(
      "table",
      { id: "idle-table" },
      el("thead", {}, el("tr", {}, el("th", {}, "device"), ...rounds.map((r) => el("th", {}, `round ${r}`)))),
      el(
        "tbody",
        {},
        ...devices.map((d) =>
          el(
            "tr",
            { "data-device": d },
            el("td", { class: "name" }, d),
            ...rounds.map((r) => {
              const v = at.get(`${d}\u0000${r}`);
              return el("td", { class: "num", "data-round": r }, v === undefined ? "-" : `${(100 * v).toFixed(1)} %`);
            }),
          ),
        ),
      ),
    ),
  );
}

function drawRun(snap) {
  drawRunSelect(snap);
  const run = snap.run;
  $("no-run").hidden = Boolean(run);
  $("run-body").hidden = !run;
  $("run-state").hidden = !run;
  if (!run) return;
  drawRunHead(run);
  drawOwners(run);
  drawLoss(run);
  drawPerplexity(run);
  drawTraffic(run);
  drawIdle(run, snap.plan);
}

// ---- the stream ----

function draw(snap) {
  snapshot = snap;
  snapshotAt = performance.now();
  drawHeader(snap);
  drawClients(snap);
  drawPlan(snap);
  drawRun(snap);
  window.dashboardUpdates += 1;
}

function setConnection(text, kind) {
  const badge = $("connection");
  badge.textContent = text;
  badge.className = `badge ${kind}`;
}

function connect() {
  if (source) source.close();
  source = new EventSource(`/v1/events${chosenRun ? `?run=${encodeURIComponent(chosenRun)}` : ""}`);
  source.onopen = () => setConnection("live", "live");
  source.onmessage = (event) => draw(JSON.parse(event.data));
  source.onerror = async () => {
    setConnection("reconnecting…", "lost");
    if (source.readyState !== EventSource.CLOSED) return; // the browser retries by itself
    // The server refused the stream: signed out (back to the login form) or too many streams (retry).
    const answer = await fetch("/v1/status", { cache: "no-store" }).catch(() => null);
    if (answer && answer.status === 401) window.location.assign("/");
    else setTimeout(connect, 5000);
  };
}

$("run-select").addEventListener("change", (event) => {
  chosenRun = event.target.value || null;
  connect();
});
window.addEventListener("resize", () => snapshot && drawRun(snapshot));
setInterval(tickAges, 1000);
connect();
