// pacsbridge Statistics page: weekly charts as plain inline SVG (no library, no build step).
// drawWeekly(container, data) takes the object GET /api/stats/weekly serves. Every value from the
// server goes in with textContent or as a number attribute, never as HTML. A week without data is a
// gap in the line (null), never a zero. Each chart has a table of the same figures for screen readers.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { w: 640, h: 250, left: 64, right: 16, top: 30, bottom: 50 };

function svgEl(tag, attrs = {}, text = null) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== null) e.textContent = text;
  return e;
}

function htmlEl(tag, attrs = {}, text = null) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) { if (k === "class") e.className = v; else e.setAttribute(k, v); }
  if (text !== null) e.textContent = text;
  return e;
}

const pctText = (x) => (x === null || x === undefined) ? "no data" : (Math.round(x * 1000) / 10) + "%";

function niceMax(v) {
  for (const m of [0.05, 0.1, 0.2, 0.25, 0.5, 1]) if (v <= m) return m;
  return 1;
}

// One chart: weeks on x, shares on y; series [{name, cls, values, ci}] (ci: [lo, hi] or null per week).
function weeklyChart({ title, weeks, series, yMax = null, errorBars = false }) {
  const { w, h, left, right, top, bottom } = CHART;
  const pw = w - left - right, ph = h - top - bottom;
  let ymax = yMax;
  if (ymax === null) {
    let m = 0;
    for (const s of series) s.values.forEach((v, i) => { m = Math.max(m, v || 0, (s.ci && s.ci[i]) ? s.ci[i][1] : 0); });
    ymax = niceMax(m || 0.05);
  }
  const x = (i) => left + (weeks.length === 1 ? pw / 2 : (i * pw) / (weeks.length - 1));
  const y = (v) => top + ph - (v / ymax) * ph;
  const id = "chart-" + Math.random().toString(36).slice(2, 9);
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, class: "chart", role: "img", "aria-labelledby": id });
  svg.append(svgEl("title", { id }, title + " per ISO week (UTC); the table below has the same figures"));
  drawAxes(svg, weeks, ymax, x, y);
  if (series.every((s) => s.values.every((v) => v === null || v === undefined))) {
    svg.append(svgEl("text", { x: left + pw / 2, y: top + ph / 2, class: "empty-note", "text-anchor": "middle" },
      "no data in these weeks"));
  }
  series.forEach((s, si) => drawSeries(svg, s, si, weeks, x, y, errorBars));
  return svg;
}

function drawAxes(svg, weeks, ymax, x, y) {
  const { w, h, left, right, top, bottom } = CHART;
  const pw = w - left - right, ph = h - top - bottom;
  for (let k = 0; k <= 4; k++) {
    const v = (ymax * k) / 4, yy = y(v);
    svg.append(svgEl("line", { x1: left, x2: w - right, y1: yy, y2: yy, class: k ? "grid" : "axis" }));
    svg.append(svgEl("text", { x: left - 6, y: yy + 4, class: "tick", "text-anchor": "end" }, pctText(v)));
  }
  svg.append(svgEl("line", { x1: left, x2: left, y1: top, y2: top + ph, class: "axis" }));
  svg.append(svgEl("text", { x: 13, y: top + ph / 2, class: "axis-label", "text-anchor": "middle",
    transform: `rotate(-90 13 ${top + ph / 2})` }, "share of images or studies"));
  const every = Math.ceil(weeks.length / 13);
  weeks.forEach((wk, i) => {
    if (i % every && i !== weeks.length - 1) return;
    svg.append(svgEl("text", { x: x(i), y: top + ph + 18, class: "tick", "text-anchor": "middle" }, wk.slice(5)));
  });
  const first = weeks[0].slice(0, 4), last = weeks[weeks.length - 1].slice(0, 4);
  svg.append(svgEl("text", { x: left + pw / 2, y: h - 8, class: "axis-label", "text-anchor": "middle" },
    "ISO week (UTC), " + first + (last !== first ? "–" + last : "")));
}

// A legend entry, the line (broken where a week has no value), and a point (with its error bar) per week.
function drawSeries(svg, s, si, weeks, x, y, errorBars) {
  const lx = CHART.left + 8 + si * 190;
  svg.append(svgEl("line", { x1: lx, x2: lx + 18, y1: 14, y2: 14, class: "line " + s.cls }));
  svg.append(svgEl("text", { x: lx + 24, y: 18, class: "legend" }, s.name));
  let d = "", pen = false;
  s.values.forEach((v, i) => {
    if (v === null || v === undefined) { pen = false; return; }
    d += (pen ? " L" : " M") + x(i).toFixed(1) + " " + y(v).toFixed(1);
    pen = true;
  });
  if (d) svg.append(svgEl("path", { d: d.trim(), class: "line " + s.cls }));
  s.values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    const ci = s.ci ? s.ci[i] : null;
    const g = svgEl("g", { class: "point " + s.cls });
    if (errorBars && ci) {
      g.append(svgEl("line", { x1: x(i), x2: x(i), y1: y(ci[0]), y2: y(ci[1]), class: "err" }));
      for (const c of ci) g.append(svgEl("line", { x1: x(i) - 5, x2: x(i) + 5, y1: y(c), y2: y(c), class: "err" }));
    }
    g.append(svgEl("circle", { cx: x(i), cy: y(v), r: 4 }));
    g.append(svgEl("title", {}, weeks[i] + ": " + s.name + " " + pctText(v)
      + (ci ? " (95 % interval " + pctText(ci[0]) + "–" + pctText(ci[1]) + ")" : "")));
    svg.append(g);
  });
}

function figText(f) {
  if (!f || f.value === null) return "no data";
  return pctText(f.value) + " (" + pctText(f.ci[0]) + "–" + pctText(f.ci[1]) + ", " + f.k + " of " + f.n + ")";
}

function weeklyTable(caption, points) {
  const table = htmlEl("table", { class: "sr-only" });
  table.append(htmlEl("caption", {}, caption));
  const head = htmlEl("tr");
  for (const c of ["Week", "Scored", "Flag rate", "Refusal rate", "PPV (95 % interval)", "Sensitivity (95 % interval)"]) {
    head.append(htmlEl("th", { scope: "col" }, c));
  }
  table.append(htmlEl("thead"));
  table.tHead.append(head);
  const body = htmlEl("tbody");
  for (const p of points) {
    const tr = htmlEl("tr");
    tr.append(htmlEl("th", { scope: "row" }, p.week));
    for (const v of [String(p.scored), pctText(p.flag_rate), pctText(p.refusal_rate), figText(p.ppv),
      figText(p.sensitivity)]) tr.append(htmlEl("td", {}, v));
    body.append(tr);
  }
  table.append(body);
  return table;
}

function drawWeekly(container, data) {
  container.replaceChildren();
  if (!data.models.length) {
    container.append(htmlEl("p", { class: "muted" }, "No images scored in the last " + data.weeks.length + " weeks."));
    return;
  }
  for (const m of data.models) {
    const name = m.model_id + (m.calibration && m.calibration !== "model" ? " (" + m.calibration + ")" : "");
    const weeks = m.weeks.map((p) => p.week);
    const box = htmlEl("div", { class: "weekly-model" });
    box.append(htmlEl("h2", {}, name + ": the last " + weeks.length + " weeks"));
    const grid = htmlEl("div", { class: "charts" });
    grid.append(weeklyChart({ title: "Flag rate and refusal rate", weeks, series: [
      { name: "flagged / scored", cls: "s-flag", values: m.weeks.map((p) => p.flag_rate), ci: null },
      { name: "refused / received", cls: "s-refused", values: m.weeks.map((p) => p.refusal_rate), ci: null }] }));
    grid.append(weeklyChart({ title: "PPV of flags read", weeks, yMax: 1, errorBars: true, series: [
      { name: "PPV, 95 % interval", cls: "s-ppv", values: m.weeks.map((p) => p.ppv.value), ci: m.weeks.map((p) => p.ppv.ci) }] }));
    grid.append(weeklyChart({ title: "Sensitivity from RIS labels", weeks, yMax: 1, errorBars: true, series: [
      { name: "sensitivity, 95 % interval", cls: "s-sens", values: m.weeks.map((p) => p.sensitivity.value),
        ci: m.weeks.map((p) => p.sensitivity.ci) }] }));
    box.append(grid, weeklyTable("Weekly figures of " + name + " (ISO weeks, UTC)", m.weeks));
    container.append(box);
  }
}
