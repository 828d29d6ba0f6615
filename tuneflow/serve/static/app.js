// tuneflow's page: a client of the service's public /v1/* endpoints, nothing more.
// Per image: POST /v1/classify (top classes), POST /v1/explain (Grad-CAM heatmap over the model's
// view), and with an index POST /v1/search plus GET /v1/index/items/{id}/thumbnail (neighbours).
"use strict";

const KEY_STORE = "tuneflow-api-key";
const TOP = 5;
const K = 6;
let info = null;

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const kid of kids) e.append(kid);
  return e;
};

// What a person reads for each refusal the service can give (the server's own message follows).
const TITLES = {
  400: "The request was malformed",
  401: "The service needs an API key: type it in the field at the top right",
  403: "The API key was refused: check the key at the top right",
  404: "Not found",
  413: "Too large for the service",
  415: "Unsupported image type",
  422: "The image cannot be used",
  429: "The service is busy: try again in a moment",
  503: "The service is unavailable right now (starting, shutting down or out of memory): try again shortly",
};

class ApiError extends Error {
  constructor(status, body) {
    const title = TITLES[status] || `The service answered HTTP ${status}`;
    const detail = body && body.error ? body.error : "";
    super(`${title} (HTTP ${status}${body && body.code ? ", " + body.code : ""})${detail ? ": " + detail : "."}`);
    this.status = status;
    this.body = body;
  }
}

function headers() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  let r;
  try {
    r = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  } catch (err) {
    throw new Error(`The service cannot be reached (${err.message}); is \`tuneflow serve\` still running?`);
  }
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    throw new ApiError(r.status, body);
  }
  return r;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function form(file) {
  const f = new FormData();
  f.append("files", file, file.name || "pasted.png");
  return f;
}

// ---- the model card ------------------------------------------------------------------------------
function fmt(x, digits = 4) { return typeof x === "number" ? x.toFixed(digits) : "–"; }

function lineChart(rows, key, title) {
  const W = 320, H = 150, P = 44;
  const series = [[key, "#3b6fb6"], [`val_${key}`, "#d9622b"]];
  const values = rows.flatMap((r) => series.map(([k]) => r[k])).filter((v) => typeof v === "number");
  if (!values.length) return el("p", { class: "sub", text: `no ${key} recorded` });
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const x = (i) => P + (rows.length > 1 ? (i * (W - P - 8)) / (rows.length - 1) : (W - P) / 2);
  const y = (v) => H - 18 - ((v - lo) * (H - 30)) / (hi - lo);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("class", `chart chart-${key}`);
  const text = (tx, ty, s, anchor = "start") => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", tx); t.setAttribute("y", ty); t.setAttribute("text-anchor", anchor); t.textContent = s;
    svg.append(t);
  };
  const axis = document.createElementNS(ns, "path");
  axis.setAttribute("d", `M${P},6 V${H - 18} H${W - 4}`);
  axis.setAttribute("stroke", "#9aa6bd"); axis.setAttribute("fill", "none");
  svg.append(axis);
  text(P - 3, 12, hi.toPrecision(2), "end");
  text(P - 3, H - 18, lo.toPrecision(2), "end");
  text((W + P) / 2, H - 4, `${title} by epoch (blue train, orange val)`, "middle");
  for (const [k, colour] of series) {
    const pts = rows.map((r, i) => [i, r[k]]).filter(([, v]) => typeof v === "number");
    if (!pts.length) continue;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.map(([i, v]) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", colour); line.setAttribute("stroke-width", "2");
    svg.append(line);
    for (const [i, v] of pts) {  // a dot per epoch: a one-epoch stage (L-BFGS) is a single point
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", x(i).toFixed(1)); dot.setAttribute("cy", y(v).toFixed(1));
      dot.setAttribute("r", "3"); dot.setAttribute("fill", colour);
      svg.append(dot);
    }
  }
  return svg;
}

function confusionTable(card) {
  const cm = card.confusion_matrix, classes = card.classes || [];
  if (!cm) return el("p", { class: "sub", text: "(the confusion matrix is in the run's confusion.csv)" });
  const peak = Math.max(1, ...cm.flat());
  const table = el("table", { class: "confusion" });
  const head = el("tr", {}, el("th", { text: "true \\ predicted" }), ...classes.map((c) => el("th", { text: c })));
  table.append(head);
  cm.forEach((row, i) => {
    const tr = el("tr", {}, el("th", { text: classes[i] }));
    row.forEach((v) => {
      const td = el("td", { text: String(v) });
      const shade = Math.round(235 - (150 * v) / peak);
      td.style.background = `rgb(${shade},${shade + 10},255)`;
      tr.append(td);
    });
    table.append(tr);
  });
  return table;
}

function renderCard() {
  const box = $("card");
  box.replaceChildren(el("h2", { text: "Model card" }));
  const facts = el("dl", { class: "facts" });
  const fact = (k, v) => facts.append(el("dt", { text: k }), el("dd", {}, v));
  fact("backbone", `${info.backbone} (input ${info.input_size} px, ${info.resize})`);
  fact("recipe", info.recipe);
  fact("classes", `${info.classes.length}: ${info.classes.join(", ")}`);
  const card = info.card;
  if (card) {
    const verdict = el("span", {
      class: card.beats_majority ? "beats" : "not-beats",
      text: card.beats_majority ? "beats the majority class" : "does not beat the majority class",
    });
    const acc = el("span", { id: "card-accuracy", text: `val accuracy ${fmt(card.val_accuracy)} vs majority rate ${fmt(card.majority_rate)} ('${card.majority_class}') — ` });
    acc.append(verdict);
    fact("validation", acc);
    fact("verdict", `${card.verdict}: ${card.advice || ""}`);
    fact("images", `${card.num_train} train / ${card.num_val} validation; weights ${card.weights}`);
  } else {
    fact("validation", "no report.json next to the served model");
  }
  if (info.index) fact("gallery", `${info.index.count} images indexed (${info.index.layer}, ${info.index.kind})`);
  box.append(facts);
  if (card) {
    box.append(el("div", { class: "row" },
      el("div", {}, el("h3", { text: "Confusion matrix (validation)" }), confusionTable(card)),
      el("div", {}, el("h3", { text: "Curves" }), lineChart(card.curves || [], "loss", "loss"),
        lineChart(card.curves || [], "accuracy", "accuracy"))));
  }
  const s = info.serving || {};
  const b = s.max_request_bytes;
  const size = b >= 2 ** 20 ? `${(b / 2 ** 20).toFixed(0)} MiB` : `${Math.max(1, Math.round(b / 1024))} KiB`;
  $("limits").textContent = `Up to ${s.max_images} images and ${size} a request; ` +
    "JPEG, PNG, GIF or BMP (the formats the model decodes as its report did). Nothing leaves this service.";
  $("model-name").textContent = `· ${info.recipe} · ${info.backbone}`;
}

async function loadInfo() {
  try {
    info = await (await api("/v1/info")).json();
    renderCard();
    showError("");
  } catch (err) {
    $("card-loading").textContent = "the model card could not be loaded.";
    showError(err.message);
  }
}

// ---- one image ----------------------------------------------------------------------------------
function topList(prediction) {
  const list = el("ol", { class: "top" });
  for (const [name, p] of prediction.top) {
    const bar = el("div", { class: "bar" });
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    list.append(el("li", {},
      el("span", { class: "name", text: name, title: name }),
      el("div", { class: "track" }, bar),
      el("span", { class: "prob", "data-class": name, "data-probability": String(p), text: p.toFixed(4) })));
  }
  return list;
}

async function thumbnail(id) {
  const blob = await (await api(`/v1/index/items/${id}/thumbnail`)).blob();
  return URL.createObjectURL(blob);
}

async function neighbours(hits) {
  const box = el("div", { class: "neighbours" });
  for (const hit of hits) {
    const parts = hit.path.split(/[\\/]/);
    const folder = parts.length > 1 ? parts[parts.length - 2] : "";
    const img = el("img", { alt: hit.path, title: hit.path });
    const tile = el("div", { class: "neighbour", "data-id": String(hit.id), "data-score": String(hit.score) },
      img, el("div", { class: "score", text: hit.score.toFixed(4) }), el("div", { class: "folder", text: folder }));
    box.append(tile);
    try {
      img.src = await thumbnail(hit.id);
    } catch (err) {
      img.alt = `no thumbnail: ${err.message}`;
    }
  }
  return box;
}

async function analyse(file) {
  const original = el("img", { alt: file.name || "pasted image" });
  original.src = URL.createObjectURL(file);
  const heat = el("img", { alt: "class evidence (Grad-CAM)", class: "heatmap" });
  const right = el("div", { class: "answer" }, el("p", { class: "status", text: "classifying ..." }));
  const card = el("article", { class: "result", "data-name": file.name || "pasted" },
    el("figure", {}, original, el("figcaption", { text: file.name || "pasted image" })),
    el("figure", {}, heat, el("figcaption", { class: "heat-caption", text: "evidence ..." })),
    right);
  $("results").prepend(card);
  const search = info && info.index ? api(`/v1/search?k=${K}`, { method: "POST", body: form(file) }) : null;
  try {
    const classified = await (await api(`/v1/classify?top=${TOP}`, { method: "POST", body: form(file) })).json();
    const prediction = classified.predictions[0];
    right.replaceChildren(el("h3", { text: "Top classes" }), topList(prediction));
    const explained = await (await api(`/v1/explain?class=${encodeURIComponent(prediction.class)}`,
      { method: "POST", body: form(file) })).json();
    const e = explained.explanations[0];
    heat.src = `data:image/png;base64,${e.overlay_png}`;
    heat.setAttribute("data-class", e.class);
    card.querySelector(".heat-caption").textContent =
      `evidence for '${e.class}' (Grad-CAM, ${e.grid_shape[0]}×${e.grid_shape[1]} grid)`;
    if (search) {
      const found = await (await search).json();
      right.append(el("h3", { text: "Nearest gallery images" }), await neighbours(found.results[0]));
    }
    card.classList.add("done");
  } catch (err) {
    right.append(el("p", { class: "failed", text: err.message }));
    card.classList.add("failed");
    showError(err.message);
  }
}

async function analyseAll(files) {
  const images = [...files].filter((f) => !f.type || f.type.startsWith("image/") || /\.(jpe?g|png|gif|bmp|webp)$/i.test(f.name));
  if (!images.length) {
    showError("None of those is an image: drop JPEG, PNG, GIF or BMP files.");
    return;
  }
  showError("");
  if (!info) await loadInfo();
  for (const f of images) await analyse(f);
}

// ---- wiring -------------------------------------------------------------------------------------
function wire() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    if (key.value) sessionStorage.setItem(KEY_STORE, key.value); else sessionStorage.removeItem(KEY_STORE);
    loadInfo();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    analyseAll(e.dataTransfer.files);
  });
  $("files").addEventListener("change", (e) => { analyseAll(e.target.files); e.target.value = ""; });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) analyseAll(files);
  });
  loadInfo();
}

wire();
