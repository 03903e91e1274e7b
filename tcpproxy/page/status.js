// The status page: polls /status and updates the table in place.
// Every value from the proxy goes in as text (textContent, SVG attributes of
// numbers), never as markup: an app named "<img src=x onerror=...>" is text.
"use strict";

const POLL_MS = 2000; // how often /status is asked
const TIMEOUT_MS = 5000; // a poll with no answer by then counts as lost contact
const HISTORY_EVERY = 3; // polls between two asks for the 5 minutes' history
const COLLAPSE_ABOVE = 50; // apps start collapsed when there are more than this
const MAX_NAMES_QUERY = 4000; // characters of open apps' names asked by name; beyond: all
const SVG = "http://www.w3.org/2000/svg";

const apps = new Map(); // name -> {body, cells, targets: Map(address -> cells)}
let polls = 0;
let historySoon = false; // an app was opened: its charts at the next poll
let lostSince = null;
let lastOk = null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setText(node, text) {
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

function rate(n) {
  if (n === undefined || n === null) return "";
  if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return n >= 10 || n === 0 ? String(Math.round(n)) : n.toFixed(1);
}

function ms(seconds) {
  if (seconds === undefined || seconds === null) return "–";
  return seconds < 1 ? "≤" + (seconds * 1000).toFixed(1) + " ms" : "≤" + seconds + " s";
}

function duration(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24;
  const m = Math.floor(seconds / 60) % 60, s = Math.floor(seconds % 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + s + "s";
}

function spark(cls) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark " + cls);
  svg.setAttribute("viewBox", "0 0 120 22");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.appendChild(document.createElementNS(SVG, "polyline"));
  const title = document.createElementNS(SVG, "title");
  svg.appendChild(title);
  return svg;
}

function drawSpark(svg, values) {
  const line = svg.firstChild;
  const points = [];
  const max = Math.max(1e-9, ...values.filter((v) => v !== null));
  const n = values.length;
  values.forEach((v, i) => {
    if (v === null) return;
    const x = n > 1 ? (i * 120) / (n - 1) : 0;
    const y = 21 - (v / max) * 20;
    points.push(x.toFixed(1) + "," + y.toFixed(1));
  });
  line.setAttribute("points", points.join(" "));
  svg.lastChild.textContent = "max " + rate(max) + "/s";
}

function cells(row, n) {
  const out = [];
  for (let i = 0; i < n; i++) out.push(row.appendChild(el("td")));
  return out;
}

function makeApp(entry, collapsed) {
  const body = el("tbody", "app" + (collapsed ? " collapsed" : ""));
  body.dataset.app = entry.name;
  const row = body.appendChild(el("tr", "app"));
  const c = cells(row, 11);
  const name = c[0].appendChild(el("span", "name", entry.name));
  const hosts = c[0].appendChild(el("span", "hosts"));
  [2, 3, 4, 5, 6].forEach((i) => c[i].classList.add("num"));
  c[7].classList.add("ended");
  const conn = c[9].appendChild(spark("conn"));
  const bytes = c[10].appendChild(spark("bytes"));
  row.addEventListener("click", () => {
    historySoon = body.classList.toggle("collapsed") === false || historySoon;
  });
  return { body, c, name, hosts, conn, bytes, targets: new Map() };
}

function makeTarget(app, address) {
  const row = el("tr", "target");
  row.dataset.target = address;
  const c = cells(row, 11);
  c[0].textContent = address;
  const state = c[1].appendChild(el("span", "state"));
  const since = c[1].appendChild(el("span", "since"));
  [2, 3].forEach((i) => c[i].classList.add("num"));
  c[7].classList.add("error");
  return { row, c, state, since };
}

function updateApp(app, entry) {
  const c = app.c;
  setText(app.hosts, entry.hostnames && entry.hostnames.length ? entry.hostnames.join(", ") : "");
  setText(c[1], entry.ports);
  setText(c[2], entry.active);
  const total = entry.targets.reduce((sum, t) => sum + (t.total || 0), 0);
  setText(c[3], total);
  const r = entry.rates || {};
  setText(c[4], rate(r.conn));
  setText(c[5], rate(r.up));
  setText(c[6], rate(r.down));
  const ended = Object.entries(entry.ended || {}).map(([k, v]) => k + " " + v);
  setText(c[7], ended.join(", "));
  if (entry.history) {
    drawSpark(app.conn, entry.history.conn);
    drawSpark(app.bytes, entry.history.bytes);
  }
  const seen = new Set();
  let before = null;
  for (const t of entry.targets) {
    seen.add(t.address);
    let cellsOf = app.targets.get(t.address);
    if (!cellsOf) {
      cellsOf = makeTarget(app, t.address);
      app.targets.set(t.address, cellsOf);
    }
    const want = before ? before.nextSibling : app.body.firstChild.nextSibling;
    if (cellsOf.row !== want) app.body.insertBefore(cellsOf.row, want);
    before = cellsOf.row;
    cellsOf.state.className = "state " + t.state;
    setText(cellsOf.state, t.state);
    setText(cellsOf.since, t.since ? " since " + t.since.replace("T", " ") : "");
    setText(cellsOf.c[2], t.active);
    setText(cellsOf.c[3], t.total === undefined ? "" : t.total);
    const error = t.last_error || t.reason || "";
    setText(cellsOf.c[7], error ? error + (t.last_error_at ? " (" + t.last_error_at.replace("T", " ") + ")" : "") : "");
    const conn = t.connect || {};
    setText(cellsOf.c[8], conn.count ? ms(conn.median) + " / " + ms(conn.p99) : "–");
  }
  for (const [address, cellsOf] of app.targets) {
    if (!seen.has(address)) {
      cellsOf.row.remove();
      app.targets.delete(address);
    }
  }
}

function fact(dl, label, value) {
  if (value === undefined || value === null || value === "") return;
  const item = dl.appendChild(el("div"));
  item.appendChild(el("dt", "", label));
  item.appendChild(el("dd", "", value));
}

function updateHeader(s) {
  setText(document.getElementById("title"), s.binary + " status");
  document.title = s.binary + " status";
  const dl = el("dl");
  dl.id = "facts";
  fact(dl, "version", s.version);
  fact(dl, "build", s.build);
  fact(dl, "uptime", s.uptime !== undefined ? duration(s.uptime) : "");
  fact(dl, "processes", s.workers !== undefined ? s.workers + " workers" : "1 (pid " + s.pid + ")");
  fact(dl, "active", s.active_connections);
  fact(dl, "config", s.config.hash + " loaded " + s.config.loaded.replace("T", " "));
  fact(dl, "from", s.config.path);
  if (s.binary === "bpfproxy") fact(dl, "steered ports", s.steered_ports);
  if (s.fleet) {
    fact(dl, "node", s.fleet.node);
    fact(dl, "etcd revision", s.fleet.revision);
    if (s.fleet.lag !== null && s.fleet.lag !== undefined) {
      fact(dl, "lag", s.fleet.lag ? s.fleet.lag + " revisions (seen " + s.fleet.seen + ")" : "none");
    }
    if (s.fleet.lost_since) fact(dl, "etcd", "lost since " + s.fleet.lost_since.replace("T", " "));
  }
  const old = document.getElementById("facts");
  old.replaceWith(dl);
  const reload = document.getElementById("reload");
  setText(reload, "last reload: " + s.last_reload);
  reload.classList.toggle("rejected", /rejected|invalid|failed/.test(s.last_reload));
  const rejected = document.getElementById("rejected");
  rejected.replaceChildren(
    ...Object.entries(s.rejected || {}).map(([name, why]) =>
      el("li", "", "set aside: " + name + " (" + why.key + " at revision " + why.revision + "): " + why.reason)
    )
  );
}

function matches(entry, words) {
  if (!words) return true;
  const hay = [entry.name, entry.ports, ...(entry.hostnames || []),
               ...entry.targets.map((t) => t.address)].join(" ").toLowerCase();
  return hay.includes(words);
}

let lastStatus = null;

function render(s) {
  lastStatus = s;
  updateHeader(s);
  const table = document.getElementById("apps");
  const words = document.getElementById("filter").value.trim().toLowerCase();
  const collapsed = s.apps.length > COLLAPSE_ABOVE;
  const seen = new Set();
  let shown = 0;
  let before = table.tHead;
  for (const entry of s.apps) {
    seen.add(entry.name);
    let app = apps.get(entry.name);
    if (!app) {
      app = makeApp(entry, collapsed);
      apps.set(entry.name, app);
    }
    if (before.nextSibling !== app.body) table.insertBefore(app.body, before.nextSibling);
    before = app.body;
    updateApp(app, entry);
    const visible = matches(entry, words);
    app.body.classList.toggle("hidden", !visible);
    if (visible) shown++;
  }
  for (const [name, app] of apps) {
    if (!seen.has(name)) {
      app.body.remove();
      apps.delete(name);
    }
  }
  setText(document.getElementById("shown"), shown + " of " + s.apps.length + " apps");
}

function contact(ok, why) {
  const box = document.getElementById("contact");
  if (ok) {
    lostSince = null;
    lastOk = new Date();
    box.className = "contact ok";
    setText(box, "live, updated " + lastOk.toLocaleTimeString());
    document.body.classList.remove("stale");
  } else {
    if (lostSince === null) lostSince = new Date();
    box.className = "contact lost";
    setText(box, "lost contact since " + lostSince.toLocaleTimeString() + " (" + why + "), retrying");
    document.body.classList.add("stale");
  }
}

// The charts are asked for the open apps only: with many apps folded, the proxy
// does not send 5 minutes of numbers nobody sees.
function historyQuery() {
  const open = [];
  for (const [name, app] of apps) {
    if (!app.body.classList.contains("collapsed")) open.push(encodeURIComponent(name));
  }
  if (open.length === apps.size) return "&history=1"; // all open, or none known yet
  if (open.length === 0) return "";
  const names = open.join(",");
  return names.length > MAX_NAMES_QUERY ? "&history=1" : "&history_of=" + names;
}

async function poll() {
  const withHistory = polls % HISTORY_EVERY === 0 || historySoon;
  historySoon = false;
  polls++;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const query = "/status?compact=1" + (withHistory ? historyQuery() : "");
    const response = await fetch(query, { signal: abort.signal, cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    contact(true);
  } catch (error) {
    contact(false, error.name === "AbortError" ? "no answer" : String(error.message || error));
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("filter").addEventListener("input", () => {
    if (lastStatus) render(lastStatus);
  });
  document.getElementById("expand").addEventListener("click", () => {
    for (const app of apps.values()) app.body.classList.remove("collapsed");
    historySoon = true;
  });
  document.getElementById("collapse").addEventListener("click", () => {
    for (const app of apps.values()) app.body.classList.add("collapsed");
  });
  poll();
});
