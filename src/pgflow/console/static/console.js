// pgflow console: live updates (instance list, instance page) and the graph drawing. No dependencies: the
// graph is laid out in layers (longest path from the sources), ordered by the parents' positions, and drawn
// as SVG. The server sends a map as one node and collapses wide composites, so graphs stay small.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 180, NODE_H = 46, GAP_X = 48, GAP_Y = 14, PAD = 8;
const OPEN = new Set(["pending", "running"]);

function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function layout(graph) {
  const ids = graph.nodes.map((n) => n.id);
  const index = new Map(ids.map((id, i) => [id, i]));
  const parents = ids.map(() => []);
  const children = ids.map(() => []);
  for (const [a, b] of graph.edges) {
    if (!index.has(a) || !index.has(b)) continue;
    parents[index.get(b)].push(index.get(a));
    children[index.get(a)].push(index.get(b));
  }
  // longest path from the sources (Kahn's order)
  const layer = ids.map(() => 0);
  const indegree = parents.map((p) => p.length);
  const queue = ids.map((_, i) => i).filter((i) => indegree[i] === 0);
  for (let head = 0; head < queue.length; head++) {
    const i = queue[head];
    for (const c of children[i]) {
      layer[c] = Math.max(layer[c], layer[i] + 1);
      if (--indegree[c] === 0) queue.push(c);
    }
  }
  const layers = [];
  ids.forEach((_, i) => (layers[layer[i]] = layers[layer[i]] || []).push(i));
  const pos = ids.map(() => 0);
  layers.forEach((members, l) => {
    if (l > 0) {
      const key = (i) => (parents[i].length ? parents[i].reduce((s, p) => s + pos[p], 0) / parents[i].length : pos[i]);
      members.sort((a, b) => key(a) - key(b) || a - b);
    }
    members.forEach((i, k) => (pos[i] = k));
  });
  const tallest = Math.max(...layers.map((m) => m.length));
  const xy = ids.map((_, i) => {
    const offset = (tallest - layers[layer[i]].length) * (NODE_H + GAP_Y) / 2;
    return [PAD + layer[i] * (NODE_W + GAP_X), PAD + offset + pos[i] * (NODE_H + GAP_Y)];
  });
  return { xy, width: PAD * 2 + layers.length * (NODE_W + GAP_X) - GAP_X,
           height: PAD * 2 + tallest * (NODE_H + GAP_Y) - GAP_Y, index };
}

function short(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

function drawGraph(container) {
  const source = document.getElementById(container.dataset.graph);
  if (!source) return;
  const graph = JSON.parse(source.textContent);
  container.textContent = "";
  if (!graph.nodes.length) return;
  const { xy, width, height, index } = layout(graph);
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "dag", role: "img" }, container);
  const edges = el("g", { class: "edges" }, svg);
  for (const [a, b] of graph.edges) {
    if (!index.has(a) || !index.has(b)) continue;
    const [x1, y1] = xy[index.get(a)], [x2, y2] = xy[index.get(b)];
    const sx = x1 + NODE_W, sy = y1 + NODE_H / 2, tx = x2, ty = y2 + NODE_H / 2, mx = (sx + tx) / 2;
    el("path", { d: `M${sx},${sy} C${mx},${sy} ${mx},${ty} ${tx},${ty}`, class: "edge" }, edges);
  }
  graph.nodes.forEach((n, i) => {
    const [x, y] = xy[i];
    const g = el("g", { class: `node st-${n.status}`, transform: `translate(${x},${y})`, "data-node": n.id }, svg);
    const tip = [n.label, `${n.kind} · ${n.status}`];
    if (n.attempts) tip.push(`attempts: ${n.attempts}`);
    if (n.tasks) tip.push(`${n.done}/${n.tasks} done, ${n.running} running, ${n.failed} failed`);
    if (n.detail) tip.push(n.detail);
    if (n.error) tip.push(`error: ${n.error}`);
    el("title", {}, g).textContent = tip.join("\n");
    el("rect", { width: NODE_W, height: NODE_H, rx: 6, class: "box" }, g);
    el("text", { x: 8, y: 17, class: "name" }, g).textContent = short(n.label, 26);
    const sub = n.status + (n.attempts > 1 ? ` · ${n.attempts} attempts` : "");
    if (n.tasks) {
      el("rect", { x: 8, y: 27, width: NODE_W - 80, height: 9, rx: 3, class: "track" }, g);
      const w = Math.round((NODE_W - 80) * n.done / n.tasks);
      el("rect", { x: 8, y: 27, width: w, height: 9, rx: 3, class: "fill" }, g);
      if (n.failed) {
        const f = Math.max(2, Math.round((NODE_W - 80) * n.failed / n.tasks));
        el("rect", { x: 8 + w, y: 27, width: f, height: 9, class: "failfill" }, g);
      }
      el("text", { x: NODE_W - 66, y: 36, class: "sub progress-text" }, g).textContent = `${n.done}/${n.tasks}`;
    } else {
      el("text", { x: 8, y: 36, class: "sub" }, g).textContent = short(sub, 30);
    }
  });
  container.dataset.drawn = String(graph.nodes.length);
}

function drawAll() {
  document.querySelectorAll(".graph[data-graph]").forEach(drawGraph);
}

async function fetchText(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error(`${response.status}`);
  return response.text();
}

function every(ms, fn) {
  const tick = async () => {
    if (document.visibilityState === "visible") {
      try { if ((await fn()) === false) return; } catch (e) { /* the console or database is away: try again */ }
    }
    setTimeout(tick, ms);
  };
  setTimeout(tick, ms);
}

function liveInstanceList() {
  const body = document.getElementById("instance-rows");
  if (!body || !body.dataset.live) return;
  const url = body.dataset.live + (body.dataset.live.includes("?") ? "&" : "?") + "partial=rows";
  every(3000, async () => { body.innerHTML = await fetchText(url); });
}

function liveInstance() {
  const live = document.getElementById("live");
  if (!live || live.dataset.open !== "1") return;
  const status = () => (document.getElementById("instance-status") || {}).textContent;
  const before = status();
  every(1500, async () => {
    const html = await fetchText(live.dataset.live);
    const probe = document.createElement("div");
    probe.innerHTML = html;
    const now = (probe.querySelector("#instance-status") || {}).textContent;
    if (now !== before) {  // a new state: reload, so that the actions match it too
      window.location.replace(window.location.pathname);
      return false;
    }
    live.innerHTML = html;
    drawAll();
    return OPEN.has(now);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  drawAll();
  liveInstanceList();
  liveInstance();
});
