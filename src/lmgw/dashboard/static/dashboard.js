// lmgw dashboard: renders the snapshots the gateway sends over /dashboard/ws.
// Plain DOM (textContent only: worker ids and error messages come from the network) and
// small canvas charts; no dependencies.
"use strict";

const HISTORY = 120;
const history = { rate: [], errors: [], ttft50: [], ttft99: [], tpot50: [], tpot99: [] };
const ROLE_ORDER = ["e", "p", "d", "pd"];
const ROLE_NAMES = { e: "encode", p: "prefill", d: "decode", pd: "merged" };
let snapshots = 0;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
  return s.toFixed(2) + " s";
}
function fmtRate(r) { return r === null || r === undefined ? "–" : r < 10 ? r.toFixed(2) : r.toFixed(1); }
function fmtCount(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n));
}
function fmtDuration(s) {
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return (s / 60).toFixed(0) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function pair(p) { return p && p.count ? fmtSeconds(p.p50) + " · " + fmtSeconds(p.p99) : "–"; }

function push(key, value) {
  const h = history[key];
  h.push(value === null || value === undefined ? NaN : value);
  if (h.length > HISTORY) h.shift();
}

function bar(fraction, good) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  const cls = good ? "bar good" : f >= 0.95 ? "bar full" : f >= 0.8 ? "bar hot" : "bar";
  const fill = el("i");
  fill.style.width = (f * 100).toFixed(1) + "%";
  return el("span", { class: cls }, fill);
}

// -- canvas charts ------------------------------------------------------------------------
function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return [ctx, w, h];
}

function drawLines(canvas, series, colors, opts) {
  const [ctx, w, h] = prepare(canvas);
  const pad = opts && opts.axis ? 34 : 2;
  let max = 0, n = 2;
  for (const s of series) {
    n = Math.max(n, s.length);
    for (const v of s) if (isFinite(v) && v > max) max = v;
  }
  if (max <= 0) max = 1;
  if (opts && opts.axis) {
    ctx.strokeStyle = "#263040"; ctx.fillStyle = "#8b98a8"; ctx.font = "11px system-ui";
    for (let i = 0; i <= 2; i++) {
      const y = 4 + (h - 8) * i / 2;
      ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w, y); ctx.stroke();
      const v = max * (1 - i / 2);
      ctx.fillText(v > 0 ? fmtSeconds(v).replace(" ", "") : "0", 0, y + 4);
    }
  }
  series.forEach((s, k) => {
    ctx.strokeStyle = colors[k]; ctx.lineWidth = 1.5; ctx.beginPath();
    let started = false;
    s.forEach((v, i) => {
      if (!isFinite(v)) { started = false; return; }
      const x = pad + (w - pad - 2) * (i / (n - 1));
      const y = 4 + (h - 8) * (1 - v / max);
      if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
    });
    ctx.stroke();
  });
}

// -- sections -----------------------------------------------------------------------------
function renderWorkers(workers) {
  const body = $("workers").tBodies[0];
  const rows = [];
  let n = 0;
  const roles = Object.keys(workers).sort((a, b) => ROLE_ORDER.indexOf(a) - ROLE_ORDER.indexOf(b));
  for (const role of roles) {
    const list = workers[role];
    rows.push(el("tr", { class: "role-head" },
      el("td", { colSpan: 9 }, (ROLE_NAMES[role] || role) + " (" + list.length + ")")));
    for (const w of list) {
      n++;
      rows.push(el("tr", { "data-worker-id": w.id, "data-role": role, title: w.url },
        el("td", {}, ROLE_NAMES[role] || role),
        el("td", { class: "wid" }, w.id),
        el("td", {}, el("span", { class: "badge state-" + w.state }, w.state)),
        el("td", { class: "num" }, w.in_flight),
        el("td", { class: "num" }, fmtCount(w.running)),
        el("td", { class: "num" }, fmtCount(w.waiting)),
        el("td", {}, bar(w.kv_usage), (100 * (w.kv_usage || 0)).toFixed(1) + "%"),
        el("td", { class: "num wreq" }, fmtCount(w.total_requests)),
        el("td", { class: "err", title: w.last_error || "" }, w.last_error || "")));
    }
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 9, class: "empty" }, "no workers")));
  body.replaceChildren(...rows);
  $("worker-count").textContent = "(" + n + ")";
}

function renderStages(stages) {
  const rows = [];
  for (const role of ROLE_ORDER) {
    const s = stages[role];
    if (!s || (!s.duration.count && !s.rate)) continue;
    const t = s.ttft || {}, p = s.tpot || {};
    rows.push(el("tr", { "data-stage": role },
      el("td", {}, s.name),
      el("td", { class: "num" }, fmtRate(s.rate)),
      el("td", { class: "num" }, fmtCount(s.duration.count)),
      el("td", { class: "num" }, fmtSeconds(s.duration.p50)),
      el("td", { class: "num" }, fmtSeconds(s.duration.p90)),
      el("td", { class: "num" }, fmtSeconds(s.duration.p99)),
      el("td", { class: "num" }, fmtSeconds(t.p50)),
      el("td", { class: "num" }, fmtSeconds(t.p99)),
      el("td", { class: "num" }, fmtSeconds(p.p50)),
      el("td", { class: "num" }, fmtSeconds(p.p99))));
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 10, class: "empty" }, "no traffic in the window")));
  $("stages").tBodies[0].replaceChildren(...rows);
}

function renderRouting(routing) {
  const rows = routing.map(r => el("tr", {},
    el("td", {}, ROLE_NAMES[r.role] || r.role), el("td", {}, r.policy), el("td", {}, r.reason),
    el("td", { class: "num" }, fmtCount(r.total)), el("td", { class: "num" }, fmtRate(r.rate))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 5, class: "empty" }, "no decisions yet")));
  $("routing").tBodies[0].replaceChildren(...rows);
}

function renderCaches(cache) {
  const units = { encoder: "items", prefix: "tokens" };
  const items = Object.entries(cache).map(([tier, c]) => el("div", { class: "cache", "data-tier": tier },
    el("span", { class: "name" }, tier),
    bar(c.hit_rate || 0, true),
    el("span", {}, c.hit_rate === null ? "–" : (100 * c.hit_rate).toFixed(1) + "%"),
    el("span", { class: "meta" }, fmtCount(c.hits) + " / " + fmtCount(c.queries) + " " + units[tier])));
  $("caches").replaceChildren(...items);
}

function renderPool(pool) {
  const rows = Object.entries(pool).map(([event, p]) => el("tr", {},
    el("td", {}, event), el("td", { class: "num" }, fmtCount(p.total)),
    el("td", { class: "num" }, fmtRate(p.rate))));
  $("pool").tBodies[0].replaceChildren(...rows);
}

function renderErrors(errors, total) {
  const items = errors.map(e => {
    const when = new Date(e.t * 1000).toLocaleTimeString();
    return el("li", {},
      el("span", { class: "when" }, when),
      el("span", { class: "status" }, e.status ? e.status : "worker"),
      e.model ? e.model + ": " : "", e.message,
      e.request_id ? el("span", { class: "rid" }, e.request_id) : null);
  });
  if (!items.length) items.push(el("li", { class: "empty" }, "none"));
  $("errors").replaceChildren(...items);
  $("error-count").textContent = "(" + total + " since start)";
}

function render(s) {
  snapshots++;
  document.body.dataset.snapshots = String(snapshots);
  $("uptime").textContent = fmtDuration(s.uptime_s);
  $("window").textContent = fmtDuration(s.window_s);
  $("updated").textContent = new Date(s.t * 1000).toLocaleTimeString();
  $("kpi-rate").textContent = fmtRate(s.rates.requests_per_s);
  $("kpi-errors").textContent = fmtRate(s.rates.errors_per_s);
  $("kpi-inflight").textContent = s.totals.in_flight;
  $("kpi-queued").textContent = s.totals.queued;
  $("kpi-total").textContent = fmtCount(s.totals.requests);
  $("kpi-ttft").textContent = pair(s.latency.ttft);
  $("kpi-tpot").textContent = pair(s.latency.tpot);
  $("kpi-e2e").textContent = pair(s.latency.e2e);
  $("kpi-queue").textContent = s.latency.queue.count ? fmtSeconds(s.latency.queue.p99) : "–";
  push("rate", s.rates.requests_per_s);
  push("errors", s.rates.errors_per_s);
  push("ttft50", s.latency.ttft.p50); push("ttft99", s.latency.ttft.p99);
  push("tpot50", s.latency.tpot.p50); push("tpot99", s.latency.tpot.p99);
  drawLines($("spark-rate"), [history.rate], ["#58a6ff"]);
  drawLines($("spark-errors"), [history.errors], ["#f85149"]);
  drawLines($("spark-ttft"), [history.ttft50, history.ttft99], ["#58a6ff", "#bc8cff"]);
  drawLines($("spark-tpot"), [history.tpot50, history.tpot99], ["#3fb950", "#bc8cff"]);
  drawLines($("chart-latency"), [history.ttft50, history.ttft99, history.tpot50.map(v => v * 10)],
    ["#58a6ff", "#bc8cff", "#3fb950"], { axis: true });
  renderWorkers(s.workers);
  renderStages(s.stages);
  renderRouting(s.routing);
  renderCaches(s.cache);
  renderPool(s.pool);
  renderErrors(s.errors, s.errors_total);
}

// -- the feed -----------------------------------------------------------------------------
let backoff = 500;
function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(scheme + "//" + location.host + "/dashboard/ws");
  const conn = $("conn");
  ws.onopen = () => { backoff = 500; conn.textContent = "live"; conn.className = "conn conn-on"; };
  ws.onmessage = (ev) => {
    try { render(JSON.parse(ev.data)); } catch (err) { console.error("bad snapshot", err); }
  };
  ws.onclose = (ev) => {
    conn.textContent = "disconnected" + (ev.reason ? ": " + ev.reason : "") + " (retrying)";
    conn.className = "conn conn-off";
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}
connect();
