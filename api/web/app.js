// The restore page: plain JS over the /v1 API. The token lives in sessionStorage
// (this tab only) and goes in an Authorization header, never in a URL.
// Paths travel as the API's `path_url` (each byte of a name as %XX where needed), so
// a name with a newline or bytes that are not UTF-8 can be opened and downloaded too.
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("vaultsync-token") || "";
let cwd = "/";  // the directory shown, as the API's path_url
let cwdShown = "/";  // the same, as text
let cursor = null;

function showError(msg) { $("error").textContent = msg || ""; }

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).message || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function at() { return $("at").value.trim(); }
function q(extra) {
  const p = new URLSearchParams(extra || {});
  if (at()) p.set("at", at());
  return p.toString();
}
function parts(path) { return path.split("/").filter(Boolean); }
function human(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

async function loadTimeline() {
  const [pts, snaps] = await Promise.all([
    api("/v1/points").then((r) => r.json()),
    api("/v1/snapshots").then((r) => r.json()),
  ]);
  const tl = $("timeline");
  tl.textContent = "";
  const add = (label, value, cls, title) => {
    const b = document.createElement("button");
    b.textContent = label; b.className = cls || ""; b.title = title || value;
    b.dataset.at = value;
    b.onclick = () => { $("at").value = value; for (const x of tl.children) x.classList.remove("sel"); b.classList.add("sel"); open("/"); };
    tl.appendChild(b);
  };
  add("latest", "", "", "the newest point");
  const mine = pts.targets.find((t) => t.target === pts.serving_target) || {};
  for (const s of (mine.by_segment || []).slice(-20)) {
    const t = new Date(s.sealed_ns / 1e6).toISOString();
    add("LSN " + s.last_lsn, String(s.last_lsn), "", t);
  }
  for (const s of snaps) add("★ " + s.name, s.name, "snap", "snapshot at LSN " + s.lsn);
  $("server").textContent = "serving " + pts.serving_target + (pts.live ? " (live, LSN " + pts.live.last_lsn + ")" : "");
}

async function open(path, more) {
  showError("");
  try {
    if (!more) { cwd = path; cursor = null; }
    const params = { limit: "50" };
    if (more && cursor !== null) params.cursor = String(cursor);
    const r = await (await api("/v1/tree" + cwd + "?" + q(params))).json();
    cwdShown = r.path;
    $("pointinfo").textContent = "Showing LSN " + r.point.lsn + (r.point.time ? " (" + r.point.time + ")" : "") + (r.point.live ? ", live" : "");
    crumbs();
    const tb = document.querySelector("#files tbody");
    if (!more) tb.textContent = "";
    for (const e of r.entries) {
      const tr = document.createElement("tr");
      const full = (cwdShown === "/" ? "" : cwdShown) + "/" + e.name;
      const name = document.createElement("td");
      const a = document.createElement("a");
      a.textContent = e.name + (e.type === "dir" ? "/" : e.type === "symlink" ? " → " + e.target : "");
      a.className = "entry " + e.type;
      if (e.type === "dir") a.onclick = () => open(e.path_url);
      else if (e.type === "file") a.onclick = () => download(e.path_url, e.name);
      name.appendChild(a);
      const size = document.createElement("td"); size.className = "size"; size.textContent = e.type === "file" ? human(e.size) : "";
      const mt = document.createElement("td"); mt.textContent = e.mtime.replace("T", " ").slice(0, 19);
      const act = document.createElement("td");
      const pick = document.createElement("a"); pick.textContent = "restore…"; pick.className = "pick";
      pick.onclick = () => { setRestorePath(full, e.path_url); $("rdest").focus(); };
      act.appendChild(pick);
      tr.append(name, size, mt, act);
      tb.appendChild(tr);
    }
    cursor = r.next_cursor;
    $("more").hidden = cursor === null;
    setRestorePath(cwdShown, cwd);
  } catch (e) { showError(e.message); }
}

// The restore field shows the path as text; while it holds what the page put there, the
// request sends the path byte for byte (path_url), else what the user typed.
function setRestorePath(shown, url) {
  const f = $("rpath"); f.value = shown; f.dataset.shown = shown; f.dataset.url = url;
}

function crumbs() {
  const nav = $("crumbs"); nav.textContent = "";
  const urls = parts(cwd), labels = parts(cwdShown);
  const link = (label, path) => { const a = document.createElement("a"); a.textContent = label; a.onclick = () => open(path); nav.append(a, " / "); };
  link("volume", "/");
  urls.forEach((p, i) => link(labels[i] || p, "/" + urls.slice(0, i + 1).join("/")));
}

async function download(path, name) {
  showError("");
  try {
    const blob = await (await api("/v1/content" + path + "?" + q())).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  } catch (e) { showError(e.message); }
}

async function startRestore() {
  showError("");
  try {
    const f = $("rpath");
    const body = { at: at(), destination: $("rdest").value, force: $("rforce").checked };
    if (f.dataset.url && f.value === f.dataset.shown) body.path_url = f.dataset.url; else body.path = f.value;
    const job = await (await api("/v1/restores", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })).json();
    watch(job.id);
  } catch (e) { showError(e.message); }
}

function watch(id) {
  const li = document.createElement("li"); li.id = "job-" + id;
  const bar = document.createElement("progress"); const text = document.createElement("span");
  const cancel = document.createElement("button"); cancel.textContent = "Cancel";
  // A JSON type even without a body: the server refuses a POST without one (see auth.py).
  cancel.onclick = () => api("/v1/restores/" + encodeURIComponent(id) + "/cancel", { method: "POST", headers: { "Content-Type": "application/json" } }).catch((e) => showError(e.message));
  li.append(bar, " ", text, " ", cancel);
  $("jobs").prepend(li);
  const tick = async () => {
    try {
      const j = await (await api("/v1/restores/" + encodeURIComponent(id))).json();
      if (j.bytes_total) { bar.max = j.bytes_total; bar.value = j.bytes_done; }
      text.textContent = j.path + " → " + j.destination + ": " + j.state + " (" + human(j.bytes_done) + (j.bytes_total ? " of " + human(j.bytes_total) : "") + ")" + (j.error ? " — " + j.error : "");
      li.dataset.state = j.state;
      if (j.state === "running") setTimeout(tick, 300); else cancel.remove();
    } catch (e) { showError(e.message); }
  };
  tick();
}

$("login").onsubmit = (ev) => { ev.preventDefault(); token = $("token").value.trim(); sessionStorage.setItem("vaultsync-token", token); start(); };
$("go").onclick = () => open("/");
$("more").onclick = () => open(cwd, true);
$("rstart").onclick = startRestore;

async function start() {
  try { await loadTimeline(); await open("/"); } catch (e) { showError(e.message); }
}
start();
