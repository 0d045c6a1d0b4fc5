// The controller's web page: polls /page/summary, streams /page/events, calls the API.
// Plain JavaScript, no build step, nothing loaded from elsewhere. Every value from the server
// is put on the page as text (textContent), never as markup.
"use strict";

const POLL_MS = 2000;          // how often the summary is polled
const FEED_MAX = 200;          // events kept on the page
const WINDOW_S = 300;          // the charts' longest span (what the controller keeps)
const HIT_POINTS = 60;         // the hit-rate chart's steps across its span
const TOKEN_KEY = "lmcache-controller-token";
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY);
let tokenWaiters = [];
let lastEventId = null;
let summary = null;

// --- the API -----------------------------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

// resolves once the user gives a token (after a 401)
function needToken(why) {
  setStatus("token", "token needed");
  $("token-form").hidden = false;
  $("token-error").textContent = why || "";
  $("token-input").focus();
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

async function api(method, path, body) {
  for (;;) {
    const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }), cache: "no-store" };
    if (body !== undefined) init.body = JSON.stringify(body);
    const res = await fetch(path, init);
    if (res.status === 401) {
      await needToken(token ? "the token was refused" : "");
      continue;
    }
    let data;
    const text = await res.text();
    try { data = JSON.parse(text); } catch (e) { data = text; }
    return { status: res.status, ok: res.ok, data };
  }
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token-input").value.trim();
  $("token-input").value = "";
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-form").hidden = true;
  $("forget-token").hidden = false;
  const waiting = tokenWaiters;
  tokenWaiters = [];
  waiting.forEach((resolve) => resolve());
});

$("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
  $("forget-token").hidden = true;
  location.reload();
});

function setStatus(state, text) {
  const pill = $("status");
  pill.dataset.state = state;
  pill.textContent = text;
}

// --- summary: instances, totals, charts ----------------------------------------------------------

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

const fmt = new Intl.NumberFormat("en");
function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function capacityCell(loc) {
  const td = el("td", { class: "capacity" });
  if (loc.capacity_bytes) {
    const share = Math.min(1, loc.used_bytes / loc.capacity_bytes);
    const bar = el("span", { class: share > 0.9 ? "bar high" : "bar" });
    const fill = el("span");
    fill.style.width = (share * 100).toFixed(1) + "%";
    bar.appendChild(fill);
    td.appendChild(bar);
    td.appendChild(document.createTextNode(
      ` ${bytes(loc.used_bytes)} of ${bytes(loc.capacity_bytes)} (${(share * 100).toFixed(1)}%)`));
  } else if (loc.used_bytes !== null && loc.used_bytes !== undefined) {
    td.textContent = bytes(loc.used_bytes) + " (no bound)";
  } else {
    td.textContent = "–";
  }
  return td;
}

function renderInstances(data) {
  const tbody = $("instances").querySelector("tbody");
  const rows = [];
  for (const inst of data.instances) {
    let first = true;
    for (const worker of inst.workers) {
      for (const loc of worker.locations) {
        const tr = el("tr", { "data-instance": inst.instance_id, "data-rank": worker.worker_id, "data-location": loc.name });
        if (first) tr.className = "first";
        tr.appendChild(el("td", { class: "instance" }, first ? inst.instance_id : ""));
        tr.appendChild(el("td", {}, first ? inst.model_name : ""));
        tr.appendChild(el("td", { class: "rank" }, `${worker.worker_id} / ${inst.world_size}`));
        tr.appendChild(el("td", {}, `${worker.host || "?"} pid ${worker.pid}`));
        tr.appendChild(el("td", { class: "location" }, loc.name));
        tr.appendChild(el("td", { class: "num chunks" }, fmt.format(loc.chunks)));
        tr.appendChild(el("td", { class: "num tokens" }, fmt.format(loc.tokens)));
        tr.appendChild(capacityCell(loc));
        const age = worker.seconds_since_heartbeat;
        tr.appendChild(el("td", { class: "num" }, age === null ? "–" : age.toFixed(1) + " s ago"));
        rows.push(tr);
        first = false;
      }
    }
  }
  tbody.replaceChildren(...rows);
  $("no-instances").hidden = data.instances.length > 0;
  const t = data.totals;
  $("totals").textContent =
    `${t.instances} instances · ${t.workers} workers · ${fmt.format(t.chunks)} chunks · ${fmt.format(t.tokens)} tokens`;
}

function fillSelect(select, values) {
  const kept = select.value;
  const same = select.options.length === values.length && values.every((v, i) => select.options[i].value === v);
  if (!same) {
    select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
    if (values.includes(kept)) select.value = kept;
  }
}

function renderActionChoices(data) {
  fillSelect($("action-instance"), data.instances.map((i) => i.instance_id));
  const inst = data.instances.find((i) => i.instance_id === $("action-instance").value);
  fillSelect($("action-location"), inst ? inst.locations : []);
}
$("action-instance").addEventListener("change", () => summary && renderActionChoices(summary));

// a line chart: series = [{values: [[t, v|null], ...], label}], x over the last `span` seconds
function drawChart(svg, now, span, series, maxHint, unit) {
  const W = 400, H = 120, left = 34, right = 6, top = 14, bottom = 16;
  let max = maxHint || 0;
  for (const s of series) for (const [, v] of s.values) if (v !== null && v > max) max = v;
  max = niceMax(max);
  const x = (t) => left + (W - left - right) * (1 - (now - t) / span);
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  const nodes = [];
  for (const frac of [0, 0.5, 1]) {
    const v = max * frac;
    nodes.push(svgEl("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    nodes.push(svgEl("text", { class: "axis", x: 2, y: y(v) + 3 }, shortNumber(v) + unit));
  }
  nodes.push(svgEl("text", { class: "axis", x: left, y: H - 3 }, span >= 120 ? `-${Math.round(span / 60)} min` : `-${Math.round(span)} s`));
  nodes.push(svgEl("text", { class: "axis", x: W - right - 20, y: H - 3 }, "now"));
  series.forEach((s, i) => {
    let points = [];
    const flush = () => {
      if (points.length > 1) nodes.push(svgEl("polyline", { class: "line" + i, points: points.join(" ") }));
      else if (points.length === 1) {
        const [px, py] = points[0].split(",");
        nodes.push(svgEl("circle", { class: "line" + i, cx: px, cy: py, r: 1.5 }));
      }
      points = [];
    };
    for (const [t, v] of s.values) {
      if (now - t > span) continue;
      if (v === null) { flush(); continue; }
      points.push(x(t).toFixed(1) + "," + y(v).toFixed(1));
    }
    flush();
    nodes.push(svgEl("text", { class: "legend" + i, x: left + 6 + i * 120, y: 10 }, s.label));
  });
  svg.replaceChildren(...nodes);
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function shortNumber(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(v % 1e6 ? 1 : 0) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(v % 1e3 ? 1 : 0) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

function renderCharts(data) {
  const a = data.activity;
  const now = data.time;
  // the span there is history for (a controller that just started has a few seconds)
  const span = Math.max(10, Math.min(WINDOW_S, a.time.length ? now - a.time[0] + (a.seconds[0] || 1) : 0));
  // hit rate in steps (5 s over 5 minutes): hits / lookups of the intervals ending in each step
  const stepS = Math.max(1, Math.round(span / HIT_POINTS));
  const steps = new Map();
  a.time.forEach((t, i) => {
    const step = Math.ceil(t / stepS) * stepS;
    const s = steps.get(step) || { lookups: 0, hits: 0 };
    s.lookups += a.lookups[i];
    s.hits += a.hits[i];
    steps.set(step, s);
  });
  const hitValues = [...steps.entries()].map(([t, s]) => [Math.min(t, now), s.lookups ? (100 * s.hits) / s.lookups : null]);
  drawChart($("chart-hits"), now, span, [{ values: hitValues, label: `hit rate (${stepS} s steps)` }], 100, "%");
  const perSecond = (counts) => a.time.map((t, i) => [t, a.seconds[i] > 0 ? counts[i] / a.seconds[i] : 0]);
  drawChart($("chart-rates"), now, span, [
    { values: perSecond(a.requests), label: "requests/s" },
    { values: perSecond(a.lookups), label: "lookups/s" },
  ], 0, "");
  const routes = Object.entries(a.routes).map(([r, n]) => `${r} ${fmt.format(n)}`).join(" · ");
  $("routes").textContent = routes ? `last ${Math.round(a.route_span_seconds)} s: ${routes}` : "";
}

async function pollSummary() {
  for (;;) {
    try {
      const res = await api("GET", "/page/summary");
      if (res.ok) {
        summary = res.data;
        renderInstances(summary);
        renderCharts(summary);
        renderActionChoices(summary);
        if ($("status").dataset.state === "token") setStatus("connecting", "connecting");
      }
    } catch (e) {
      setStatus("reconnecting", "controller unreachable");
    }
    await sleep(POLL_MS);
  }
}

// --- the live feed: server-sent events read with fetch (EventSource cannot send the token) -----

async function streamEvents() {
  let backoff = 500;
  for (;;) {
    try {
      const path = "/page/events" + (lastEventId === null ? "" : "?since=" + lastEventId);
      const res = await fetch(path, { headers: headers(), cache: "no-store" });
      if (res.status === 401) { await needToken(token ? "the token was refused" : ""); continue; }
      if (!res.ok || !res.body) throw new Error("feed answered " + res.status);
      setStatus("live", "live");
      backoff = 500;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          handleMessage(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (e) {
      // the controller went away or the connection dropped: try again below
    }
    setStatus("reconnecting", "reconnecting");
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

function handleMessage(block) {
  let data = null, kind = "message";
  for (const line of block.split("\n")) {
    if (line.startsWith("data: ")) data = line.slice(6);
    else if (line.startsWith("event: ")) kind = line.slice(7);
  }
  if (data === null || kind === "closed") return;
  const event = JSON.parse(data);
  lastEventId = event.id;
  addEvent(event);
}

function addEvent(event) {
  const feed = $("feed");
  const li = el("li", { "data-kind": event.kind, "data-id": event.id });
  const when = new Date(event.time * 1000);
  li.appendChild(el("time", { datetime: when.toISOString() }, when.toLocaleTimeString([], { hour12: false })));
  li.appendChild(el("span", { class: "kind kind-" + event.kind }, event.kind));
  li.appendChild(el("span", { class: "text" }, event.text));
  feed.prepend(li);
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
}

// --- lookup and actions --------------------------------------------------------------------------

// token ids from text: integers separated by commas and/or whitespace
function parseTokens(text) {
  const parts = text.split(/[\s,]+/).filter((p) => p.length);
  const bad = parts.find((p) => !/^\d+$/.test(p));
  if (bad !== undefined) throw new Error(`'${bad}' is not a token id (token ids are whole numbers >= 0)`);
  return parts.map(Number);
}

function show(pre, res) {
  pre.classList.toggle("error", !res.ok);
  pre.textContent = `${res.status}\n` + (typeof res.data === "string" ? res.data : JSON.stringify(res.data, null, 2));
}

function showError(pre, message) {
  pre.classList.add("error");
  pre.textContent = message;
}

$("lookup-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const pre = $("lookup-result");
  let tokens;
  try { tokens = parseTokens($("lookup-tokens").value); } catch (e) { showError(pre, e.message); return; }
  if (!tokens.length) { showError(pre, "type some token ids first"); return; }
  pre.textContent = "…";
  show(pre, await api("POST", "/lookup", { tokens }));
});

function confirmAction(text, body) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-body").textContent = JSON.stringify(body, null, 2);
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

const ACTIONS = {
  clear: (base) => [base, `Clear everything at ${base.location} on every rank of ${base.instance_id}?`],
  pin: (base) => {
    const own = $("action-tokens").value.trim();
    const tokens = parseTokens(own || $("lookup-tokens").value);
    if (!tokens.length) throw new Error("pin needs token ids: type them in the tokens field or the lookup box");
    return [{ ...base, tokens }, `Pin the chunks of these ${tokens.length} tokens at ${base.location} of ${base.instance_id}?`];
  },
  compress: (base) => {
    const method = $("action-method").value.trim();
    if (!method) throw new Error("compress needs a method");
    return [{ instance_id: base.instance_id, method, location: base.location },
      `Compress what ${base.instance_id} holds at ${base.location} with '${method}'?`];
  },
};

for (const button of document.querySelectorAll("#action-form [data-action]")) {
  button.addEventListener("click", async () => {
    const action = button.dataset.action;
    const pre = $("action-result");
    const base = { instance_id: $("action-instance").value, location: $("action-location").value };
    if (!base.instance_id || !base.location) { showError(pre, "no instance to act on"); return; }
    let body, text;
    try { [body, text] = ACTIONS[action](base); } catch (e) { showError(pre, e.message); return; }
    if (!(await confirmAction(text, body))) { pre.classList.remove("error"); pre.textContent = `${action} cancelled`; return; }
    pre.textContent = "…";
    show(pre, await api("POST", "/" + action, body));
    summaryNow();
  });
}

// --- start -------------------------------------------------------------------------------------

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

async function summaryNow() {
  const res = await api("GET", "/page/summary");
  if (res.ok) { summary = res.data; renderInstances(summary); renderCharts(summary); renderActionChoices(summary); }
}

if (token) $("forget-token").hidden = false;
pollSummary();
streamEvents();
