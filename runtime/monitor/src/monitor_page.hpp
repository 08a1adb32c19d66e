#pragma once

// The live page rank 0 serves at "/": plain HTML, CSS and JavaScript with no external resources
// (clusters are often offline), polling /api/status once a second and drawing its charts on
// canvases.

#include <string_view>

namespace unimsg::detail {

inline constexpr std::string_view kMonitorPage = R"HTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>unimsg</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bad: #c0362c; --warn: #b54708;
          --ok: #067647; --bg: #f8f9fb; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
  header { display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: baseline;
           padding: 14px 20px; background: #fff; border-bottom: 1px solid var(--line); }
  h1 { margin: 0; font-size: 18px; }
  h2 { font-size: 15px; margin: 20px 20px 8px; }
  .stat { color: var(--muted); } .stat b { color: var(--fg); font-variant-numeric: tabular-nums; }
  main { padding: 0 0 20px; }
  .charts { display: flex; flex-wrap: wrap; gap: 16px; padding: 16px 20px 0; }
  figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px;
           padding: 8px 10px; }
  figcaption { font-weight: 600; margin-bottom: 4px; }
  table { border-collapse: collapse; margin: 0 20px; background: #fff; min-width: 60%;
          border: 1px solid var(--line); }
  th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right;
           font-variant-numeric: tabular-nums; white-space: nowrap; }
  th { background: #f2f4f7; font-weight: 600; }
  td.host, th.host { text-align: left; }
  tr.straggler td { background: #fef3f2; }
  .badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; }
  .badge.ok { color: var(--ok); background: #ecfdf3; }
  .badge.bad { color: var(--bad); background: #fef3f2; }
  .badge.warn { color: var(--warn); background: #fffaeb; }
  .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
            margin-right: 6px; }
  ul#events { margin: 0 20px; padding: 0; list-style: none; }
  ul#events li { padding: 3px 0; border-bottom: 1px dashed var(--line); }
  ul#events .kind { display: inline-block; min-width: 120px; font-weight: 600; }
  footer { color: var(--muted); padding: 12px 20px; }
</style>
</head>
<body data-state="loading">
<header>
  <h1 id="job">unimsg</h1>
  <span class="stat">ranks <b id="world">-</b></span>
  <span class="stat">step <b id="step">-</b></span>
  <span class="stat">throughput <b id="throughput">-</b></span>
  <span class="stat">ETA <b id="eta">-</b></span>
  <span class="stat">launch <b id="restart">-</b></span>
</header>
<main>
  <div class="charts">
    <figure><figcaption>Step time per rank (ms; dashed: compute)</figcaption>
      <canvas id="chart-step" width="560" height="230"></canvas></figure>
    <figure><figcaption>Throughput per rank (samples/s)</figcaption>
      <canvas id="chart-throughput" width="560" height="230"></canvas></figure>
  </div>
  <h2>Ranks</h2>
  <table id="ranks">
    <thead><tr><th>rank</th><th class="host">host</th><th>step</th><th>loss</th>
      <th>samples/s</th><th>step ms</th><th>compute ms</th><th>comm ms</th><th>wait ms</th>
      <th>sent MB</th><th>compression</th><th>memory MB</th><th>heartbeat age</th>
      <th>status</th></tr></thead>
    <tbody></tbody>
  </table>
  <h2>Faults, re-ranks and stragglers</h2>
  <ul id="events"></ul>
</main>
<footer id="updated">waiting for rank 0...</footer>
<script>
"use strict";
const palette = ["#2e90fa", "#f04438", "#12b76a", "#f79009", "#7a5af8", "#06aed4", "#ee46bc",
                 "#667085", "#84cc16", "#0f766e"];
const color = (rank) => palette[rank % palette.length];
const fmt = (v, digits) => (v === null || v === undefined || Number.isNaN(v)) ? "-"
    : Number(v).toLocaleString(undefined, {maximumFractionDigits: digits, minimumFractionDigits: digits});
const significant = (v) => (v === null || v === undefined) ? "-" : Number(v).toPrecision(4);
const duration = (s) => {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
};
const esc = (s) => String(s).replace(/[&<>"]/g,
    (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
const text = (id, value) => { document.getElementById(id).textContent = value; };

function drawChart(canvas, series, now, scale, dashed) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 52, bottom = 20, top = 8, right = 8;
  ctx.clearRect(0, 0, w, h);
  const span = 120;  // seconds shown
  let max = 0;
  for (const points of Object.values(series)) {
    for (const p of points) if (p[0] >= now - span) max = Math.max(max, p[1] * scale);
  }
  for (const points of Object.values(dashed || {})) {
    for (const p of points) if (p[0] >= now - span) max = Math.max(max, p[1] * scale);
  }
  if (max <= 0) max = 1;
  max *= 1.1;
  ctx.strokeStyle = "#e4e7ec"; ctx.fillStyle = "#667085"; ctx.font = "11px system-ui";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + (h - top - bottom) * i / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
    ctx.fillText(fmt(max * (4 - i) / 4, max < 10 ? 2 : 0), 4, y + 4);
  }
  ctx.fillText("-" + span + " s", left, h - 4);
  ctx.fillText("now", w - right - 22, h - 4);
  const x = (t) => left + (w - left - right) * (1 - (now - t) / span);
  const y = (v) => top + (h - top - bottom) * (1 - v * scale / max);
  const lines = (set, dash) => {
    ctx.setLineDash(dash);
    for (const [rank, points] of Object.entries(set || {})) {
      ctx.strokeStyle = color(Number(rank));
      ctx.beginPath();
      let started = false;
      for (const p of points) {
        if (p[0] < now - span) continue;
        if (!started) { ctx.moveTo(x(p[0]), y(p[1])); started = true; } else ctx.lineTo(x(p[0]), y(p[1]));
      }
      ctx.stroke();
    }
    ctx.setLineDash([]);
  };
  ctx.lineWidth = 2;
  lines(series, []);
  lines(dashed, [5, 4]);
}

function render(s) {
  text("job", s.job);
  text("world", s.world_size);
  text("step", s.total_steps ? `${s.step} / ${s.total_steps}` : s.step);
  text("throughput", fmt(s.samples_per_second, 0) + " samples/s");
  text("eta", duration(s.eta_seconds));
  text("restart", s.restart + 1);
  const body = document.querySelector("#ranks tbody");
  const rows = [];
  for (const r of s.ranks) {
    const tr = document.createElement("tr");
    tr.dataset.rank = r.rank;
    if (r.straggler) tr.className = "straggler";
    const age = r.heartbeat_age_seconds;
    const ageBadge = age === null ? "-" :
        `<span class="badge ${age > 5 ? "bad" : age > 2 ? "warn" : "ok"}">${fmt(age, 1)} s</span>`;
    const status = !r.reported ? '<span class="badge warn">no report yet</span>'
        : r.straggler ? '<span class="badge bad">straggler</span>'
        : r.final ? '<span class="badge ok">finished</span>'
        : '<span class="badge ok">training</span>';
    const cells = [
      `<span class="swatch" style="background:${color(r.rank)}"></span>${r.rank}`,
      esc(r.host ?? "-"), r.step ?? "-", significant(r.loss), fmt(r.samples_per_second, 0),
      fmt(r.step_seconds * 1e3, 1), fmt(r.compute_seconds * 1e3, 1),
      fmt(r.communication_seconds * 1e3, 1), fmt(r.wait_seconds * 1e3, 1),
      fmt(r.wire_bytes / 1e6, 1), r.reported ? fmt(r.compression_ratio, 1) + "x" : "-",
      fmt(r.rss_bytes / 1e6, 0), ageBadge, status];
    tr.innerHTML = cells.map((c, i) => `<td${i === 1 ? ' class="host"' : ""}>${c}</td>`).join("");
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const stepSeries = {}, throughputSeries = {}, computeSeries = {};
  for (const [rank, points] of Object.entries(s.history || {})) {
    stepSeries[rank] = points.map((p) => [p[0], p[1]]);
    throughputSeries[rank] = points.map((p) => [p[0], p[2]]);
    computeSeries[rank] = points.map((p) => [p[0], p[3]]);
  }
  drawChart(document.getElementById("chart-step"), stepSeries, s.time, 1e3, computeSeries);
  drawChart(document.getElementById("chart-throughput"), throughputSeries, s.time, 1);
  const events = document.getElementById("events");
  const items = [];
  for (const e of [...s.events].reverse()) {
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    const when = new Date(e.time * 1000).toLocaleTimeString();
    li.innerHTML = `<span class="kind"></span> <span class="when"></span> <span class="what"></span>`;
    li.querySelector(".kind").textContent = e.kind;
    li.querySelector(".when").textContent = when;
    li.querySelector(".what").textContent = e.text;
    items.push(li);
  }
  if (items.length === 0) {
    const li = document.createElement("li");
    li.textContent = "none so far";
    items.push(li);
  }
  events.replaceChildren(...items);
  text("updated", "updated " + new Date(s.time * 1000).toLocaleTimeString() + " (every second)");
}

async function refresh() {
  try {
    const response = await fetch("/api/status", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    document.body.dataset.state = "live";
  } catch (error) {
    document.body.dataset.state = "offline";
    text("updated", "no answer from rank 0 (" + error.message + "): the job may have ended");
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
)HTML";

}  // namespace unimsg::detail
