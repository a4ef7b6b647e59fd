// curate explore: plain JavaScript over the JSON API of curate/explore/app.py (no build step).
"use strict";
const PAGE = 24;
const state = { info: null, filters: [], rid: null, result: null, histFor: null, part: "kept", offset: 0, total: 0 };

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};

function showError(msg) {
  const box = $("#error");
  box.textContent = msg;
  box.hidden = !msg;
}

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" } };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: `error: ${r.status} ${r.statusText}` }));
  if (!r.ok || data.error) throw new Error(data.error || `error: ${r.status}`);
  return data;
}

function fmt(x, digits = 3) {
  return typeof x === "number" ? x.toFixed(digits) : String(x);
}

// -- tabs ----------------------------------------------------------------------------------
function showTab(name) {
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== name;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  // histograms scan the whole pool: drawn when first looked at, never before the grid's page
  if (name === "histograms" && state.result && state.histFor !== state.rid) drawHistograms(state.result);
}

// -- sources: a bundled filter, an own filter file, a typed query, a subset file ----------
function fillSource(box) {
  const sel = $(".src-kind", box);
  sel.innerHTML = "";
  for (const f of state.filters) sel.append(el("option", { value: "filter:" + f.name }, f.name));
  sel.append(el("option", { value: "own" }, "(own filter file)"));
  sel.append(el("option", { value: "sql" }, "(query returning uid)"));
  sel.append(el("option", { value: "subset" }, "(subset file)"));
  sel.addEventListener("change", () => sourceChanged(box));
  $(".src-path", box).addEventListener("change", () => sourceChanged(box, true));
  sourceChanged(box);
}

function paramFields(box, params) {
  const div = $(".params", box);
  div.innerHTML = "";
  for (const [k, v] of Object.entries(params || {})) {
    const lab = el("label", {}, k + " ");
    const inp = el("input", { name: "param-" + k, "data-param": k, "data-default": String(v) });
    inp.value = String(v);
    lab.append(inp);
    div.append(lab);
  }
}

async function sourceChanged(box, pathEdited) {
  const kind = $(".src-kind", box).value;
  const path = $(".src-path", box), sql = $(".src-sql", box);
  path.hidden = !(kind === "own" || kind === "subset");
  sql.hidden = kind !== "sql";
  if (kind.startsWith("filter:")) {
    const f = state.filters.find((x) => "filter:" + x.name === kind);
    paramFields(box, f ? f.params : {});
  } else if (kind === "own" && pathEdited && path.value) {
    try {
      const d = await api("/api/filter-params?path=" + encodeURIComponent(path.value));
      paramFields(box, d.params);
      showError("");
    } catch (e) { showError(e.message); }
  } else if (!pathEdited) {
    paramFields(box, {});
  }
}

function sourceOf(box) {
  const kind = $(".src-kind", box).value;
  const sets = {};
  for (const inp of box.querySelectorAll("[data-param]")) {
    if (inp.value !== inp.dataset.default) sets[inp.dataset.param] = inp.value;
  }
  if (kind.startsWith("filter:")) return { filter: kind.slice(7), sets };
  if (kind === "own") return { filter: $(".src-path", box).value, sets };
  if (kind === "sql") return { sql: $(".src-sql", box).value };
  return { subset: $(".src-path", box).value };
}

// -- query ---------------------------------------------------------------------------------
function summary(r) {
  const pct = r.pool_rows ? (100 * r.count / r.pool_rows).toFixed(2) : "0.00";
  const params = Object.entries(r.params || {}).map(([k, v]) => `${k}=${v}`);
  for (const t of r.thresholds || []) params.push(`threshold=${t.threshold === null ? "NaN" : t.threshold.toPrecision(9)}`);
  return `${r.label}: kept ${r.count.toLocaleString("en")} of ${r.pool_rows.toLocaleString("en")} samples (${pct}%), ` +
    `${r.distinct.toLocaleString("en")} distinct uids` + (params.length ? ` [${params.join(", ")}]` : "") +
    `\nin ${fmt(r.elapsed, 2)}s`;
}

async function runQuery() {
  const status = $("#run-status");
  status.textContent = "running...";
  status.removeAttribute("data-rid");
  try {
    const r = await api("/api/run", sourceOf($("#src-main")));
    showError("");
    state.rid = r.rid;
    status.textContent = summary(r);
    status.dataset.count = r.count;
    status.dataset.distinct = r.distinct;
    status.dataset.rid = r.rid;
    $("#exports").hidden = false;
    $("#export-npy").href = `/api/export/${r.rid}/kept.npy`;
    $("#export-csv").href = `/api/export/${r.rid}/kept.csv`;
    state.part = $("#part-select").value = "kept";
    state.offset = 0;
    state.result = r;
    state.histFor = null;
    showTab("samples");
    await loadPage();
  } catch (e) {
    status.textContent = "";
    showError(e.message);
  }
}

// -- samples -------------------------------------------------------------------------------
function card(row) {
  const c = el("div", { class: "card", "data-uid": row.uid });
  if (row.image) {
    c.append(el("img", { class: "thumb", src: `/api/image/${row.uid}?thumb=200`, alt: row.text || "" }));
  } else {
    c.append(el("div", { class: "noimg" }, "no image (metadata only)"));
  }
  c.append(el("div", { class: "caption" }, row.text || ""));
  c.append(el("div", { class: "uid" }, row.uid));
  if ("clip_l14_similarity_score" in row) {
    c.append(el("div", { class: "scores" },
      `L14 ${fmt(row.clip_l14_similarity_score)} · B32 ${fmt(row.clip_b32_similarity_score)} · ` +
      `${row.original_width}×${row.original_height}`));
  }
  c.addEventListener("click", () => openSample(row.uid));
  return c;
}

async function fillGrid(grid, rid, part, offset, limit) {
  grid.removeAttribute("data-loaded");
  const d = await api(`/api/page?rid=${rid}&part=${part}&offset=${offset}&limit=${limit}`);
  grid.innerHTML = "";
  for (const row of d.rows) grid.append(card(row));
  grid.dataset.total = d.total;
  grid.dataset.loaded = `${rid}:${part}:${offset}`;
  return d;
}

async function loadPage() {
  if (!state.rid) return;
  try {
    const d = await fillGrid($("#grid"), state.rid, state.part, state.offset, PAGE);
    state.total = d.total;
    const last = Math.min(d.total, state.offset + d.rows.length);
    $("#page-info").textContent = `${state.part}: ${d.total ? state.offset + 1 : 0}-${last} of ${d.total.toLocaleString("en")}` +
      (d.shards ? "" : " (no shards: metadata only)");
    showError("");
  } catch (e) { showError(e.message); }
}

async function openSample(uid) {
  try {
    const d = await api(`/api/sample/${uid}`);
    const modal = $("#detail");
    const img = $("#full-image");
    img.hidden = !d.image;
    if (d.image) img.src = `/api/image/${uid}`;
    for (const [id, obj] of [["#meta-table", d.meta], ["#feature-table", d.features]]) {
      const t = $(id);
      t.innerHTML = "";
      for (const [k, v] of Object.entries(obj)) {
        const tr = el("tr", { "data-key": k });
        tr.append(el("td", {}, k), el("td", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)));
        t.append(tr);
      }
    }
    const nn = $("#neighbours");
    nn.innerHTML = "";
    for (const n of d.neighbours) {
      nn.append(card({ uid: n.uid, image: n.image, text: `similarity ${fmt(n.score, 4)}` }));
    }
    $("#nn-note").textContent = d.neighbours_note ? `(${d.neighbours_note})` : `(${d.neighbours_key || ""})`;
    modal.dataset.uid = uid;
    modal.hidden = false;
    showError("");
  } catch (e) { showError(e.message); }
}

// -- compare -------------------------------------------------------------------------------
async function runCompare() {
  const t = $("#cmp-counts");
  t.hidden = true;
  t.removeAttribute("data-rid");
  try {
    const c = await api("/api/compare", { a: sourceOf($("#src-a")), b: sourceOf($("#src-b")) });
    showError("");
    for (const part of ["a_only", "both", "b_only"]) {
      $("#cnt-" + part).textContent = c["count_" + part].toLocaleString("en");
      $("#cnt-" + part).dataset.count = c["count_" + part];
      $("#export-" + part).href = `/api/export/${c.rid}/${part}.npy`;
      $("#csv-" + part).href = `/api/export/${c.rid}/${part}.csv`;
      await fillGrid($("#grid-" + part), c.rid, part, 0, 12);
    }
    t.hidden = false;
    t.dataset.rid = c.rid;
  } catch (e) { showError(e.message); }
}

// -- histograms ----------------------------------------------------------------------------
function drawHistograms(r) {
  state.histFor = r.rid;
  const box = $("#hist-plots");
  box.innerHTML = "";
  $("#hist-note").textContent = `${r.label}: pool (grey) with the kept part overlaid, dashed: thresholds`;
  for (const col of ["clip_l14_similarity_score", "clip_b32_similarity_score"]) {
    if (state.info.columns.includes(col)) box.append(el("img", { id: "hist-" + col, src: `/api/hist/${r.rid}/${col}.png`, alt: col }));
  }
  if (state.info.timesplit) {
    box.append(el("img", { id: "keep-rate", src: `/api/keep-rate/${r.rid}.png`, alt: "keep rate" }));
    keepRateTable(r.rid);
  }
}

// TiC catalogs: samples and kept samples per year and month, as a table beside the plot
async function keepRateTable(rid) {
  const t = $("#keep-rate-table");
  t.hidden = true;
  t.removeAttribute("data-rid");
  t.innerHTML = "";
  try {
    const rows = await api(`/api/keep-rate/${rid}`);
    if (state.histFor !== rid) return;
    const head = el("tr");
    for (const h of ["year", "month", "samples", "kept", "keep rate"]) head.append(el("th", {}, h));
    t.append(head);
    for (const r of rows) {
      const tr = el("tr", { class: "keep-rate-row", "data-year": r.year, "data-month": r.month === null ? "" : r.month,
        "data-samples": r.samples, "data-kept": r.kept });
      const pct = r.samples ? (100 * r.kept / r.samples).toFixed(2) + "%" : "-";
      tr.append(el("td", {}, String(r.year)), el("td", {}, r.month === null ? "-" : String(r.month).padStart(2, "0")),
        el("td", {}, r.samples.toLocaleString("en")), el("td", {}, r.kept.toLocaleString("en")), el("td", { class: "rate" }, pct));
      t.append(tr);
    }
    t.hidden = false;
    t.dataset.rid = rid;
  } catch (e) { showError(e.message); }
}

// -- start ---------------------------------------------------------------------------------
async function start() {
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => showTab(t.dataset.tab));
  try {
    state.info = await api("/api/info");
    state.filters = await api("/api/filters");
  } catch (e) { showError(e.message); return; }
  $("#catalog-info").textContent = `${state.info.catalog} · ${state.info.pool_rows.toLocaleString("en")} samples · ` +
    (state.info.shards ? "images from the shards" : "no shards: metadata only");
  for (const id of ["#src-main", "#src-a", "#src-b"]) fillSource($(id));
  $("#run-btn").addEventListener("click", runQuery);
  $("#compare-btn").addEventListener("click", runCompare);
  $("#part-select").addEventListener("change", (e) => { state.part = e.target.value; state.offset = 0; loadPage(); });
  $("#prev-btn").addEventListener("click", () => { if (state.offset > 0) { state.offset = Math.max(0, state.offset - PAGE); loadPage(); } });
  $("#next-btn").addEventListener("click", () => { if (state.offset + PAGE < state.total) { state.offset += PAGE; loadPage(); } });
  $("#detail-close").addEventListener("click", () => { $("#detail").hidden = true; });
  showTab("query");
  document.body.dataset.ready = "1";
}
start();
