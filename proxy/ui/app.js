// ollamux's live page: polls /proxy/status (same origin) and draws it. No library, no build step.
// Everything shown is set with textContent: model names and reasons come from clients, never as HTML.
"use strict";

const STATUS_URL = "/proxy/status";
const POLL_MS = 1500;
const KEY_ITEM = "ollamux.key";
const GIB = 1024 ** 3;

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function gib(bytes) {
  return bytes === null || bytes === undefined ? "?" : (bytes / GIB).toFixed(1);
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

function age(at, now) {
  const s = Math.max(0, now - at);
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.round(s / 60)}m`;
  return `${Math.round(s / 3600)}h`;
}

function bar(label, share, text, className) {
  const row = el("div", "bar-row");
  row.append(el("span", "bar-label", label));
  const track = el("div", `bar ${className}`);
  const fill = el("div", "fill");
  const pct = Math.max(0, Math.min(1, share || 0)) * 100;
  fill.style.width = `${pct.toFixed(1)}%`; // CSSOM, allowed by the page's CSP
  if (pct >= 90) fill.classList.add("high");
  track.append(fill);
  row.append(track, el("span", "bar-text", text));
  return row;
}

function gpuBlock(gpu) {
  const block = el("div", "gpu");
  block.append(el("div", "gpu-name", `GPU ${gpu.gpu} · ${gpu.name || "?"}`));
  const total = gpu.memory_total || 0;
  const used = gpu.memory_used || 0;
  block.append(bar("mem", total ? used / total : 0, `${gib(used)} / ${gib(total)} GiB`, "mem"));
  const util = gpu.utilization || 0;
  block.append(bar("util", util, `${Math.round(util * 100)} %`, "util"));
  return block;
}

function line(label, value) {
  const row = el("div", "line");
  row.append(el("span", "key", label), el("span", "value", value));
  return row;
}

function instanceCard(inst) {
  const card = el("article", `card state-${inst.state}`);
  const head = el("div", "card-head");
  head.append(el("h3", null, inst.name), el("span", `badge state-${inst.state}`, inst.state));
  card.append(head);

  const gpus = inst.gpus || [];
  if (gpus.length === 0 && inst.memory_capacity && inst.free_estimate != null) {
    const used = inst.memory_capacity - inst.free_estimate;
    const label = `~${gib(used)} / ${gib(inst.memory_capacity)} GiB (${inst.memory_source})`;
    card.append(bar("memory", used / inst.memory_capacity, label, "memory"));
  } else if (gpus.length === 0) {
    card.append(el("div", "muted", "no GPU reading"));
  }
  for (const gpu of gpus) card.append(gpuBlock(gpu));
  if ((inst.lacks || []).length) card.append(line("lacks", inst.lacks.join(", ")));

  const busy = inst.inflight_total || 0;
  card.append(bar("slots", inst.slots ? busy / inst.slots : 0, `${busy} / ${inst.slots}`, "slots"));
  const perModel = Object.entries(inst.inflight || {}).filter(([, n]) => n > 0);
  if (perModel.length) {
    card.append(line("in flight", perModel.map(([m, n]) => `${m} ×${n}`).join(", ")));
  }

  const models = el("ul", "models");
  for (const m of inst.loaded || []) {
    models.append(el("li", "model", `${m.name} (${gib(m.size_vram)} GiB)`));
  }
  for (const name of inst.loading || []) models.append(el("li", "model loading", `${name} (loading)`));
  card.append(el("div", "key", "loaded"));
  if (models.children.length) card.append(models);
  else card.append(el("div", "muted", "no model loaded"));

  const t = inst.ttft || {};
  card.append(line("TTFT p50 / p95", `${seconds(t.p50)} / ${seconds(t.p95)} (${t.count || 0})`));
  const reasons = Object.entries(inst.reasons || {});
  if (reasons.length) {
    card.append(line("routed because", reasons.map(([r, n]) => `${r} ${n}`).join(", ")));
  }
  if (inst.ejected && inst.ejected_until) {
    card.append(line("ejected for", seconds(Math.max(0, inst.ejected_until - Date.now() / 1000))));
  }
  return card;
}

function drawQueues(data) {
  const waiting = Object.entries(data.queues || {}).filter(([, n]) => n > 0);
  const node = $("queues");
  node.replaceChildren();
  if (!waiting.length) {
    node.textContent = "none waiting";
    return;
  }
  for (const [model, n] of waiting) node.append(el("span", "chip", `${model}: ${n}`));
}

function drawRecent(data) {
  const body = document.querySelector("#recent tbody");
  const now = Date.now() / 1000;
  const rows = (data.recent || []).map((r) => {
    const tr = el("tr");
    const status = String(r.status ?? "");
    const cls = status.startsWith("2") ? "ok" : status.startsWith("4") ? "warn" : "bad";
    tr.append(
      el("td", null, age(r.at || now, now)),
      el("td", null, r.model),
      el("td", null, r.instance),
      el("td", "why", r.reason),
      el("td", cls, status),
      el("td", null, seconds(r.queue_wait)),
      el("td", null, seconds(r.ttft)),
      el("td", "muted", r.endpoint),
    );
    return tr;
  });
  body.replaceChildren(...rows);
}

function draw(data) {
  const instances = data.instances || [];
  const up = instances.filter((i) => i.state === "up").length;
  $("summary").textContent =
    `v${data.version} · policy ${data.policy} · ${up}/${instances.length} instances up · ` +
    `${data.queued || 0} queued · up ${Math.round(data.uptime_s || 0)} s`;
  $("instances").replaceChildren(...instances.map(instanceCard));
  drawQueues(data);
  drawRecent(data);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function problem(text) {
  const node = $("problem");
  node.textContent = text || "";
  node.hidden = !text;
}

async function poll() {
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  try {
    const response = await fetch(STATUS_URL, { headers, cache: "no-store", credentials: "same-origin" });
    if (response.status === 401 || response.status === 403) {
      if (key) sessionStorage.removeItem(KEY_ITEM);
      $("keyform").hidden = false;
      problem(key ? "that key was refused; type another" : "");
      return;
    }
    if (!response.ok) {
      problem(`/proxy/status answered ${response.status}`);
      return;
    }
    $("keyform").hidden = true;
    problem("");
    draw(await response.json());
  } catch (err) {
    problem(`cannot reach the proxy (${err.message}); retrying`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("keyform").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("key").value.trim();
    if (value) sessionStorage.setItem(KEY_ITEM, value);
    $("key").value = "";
    $("keyform").hidden = true;
  });
  poll();
});
