// dhf-cache view: the page. Plain JS, no build step; every number comes from the server's /api.
// Coordinates are kept in original image pixels (what eval's predictions and match_points use);
// only drawing converts them to screen pixels.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const collator = new Intl.Collator(undefined, { numeric: true });  // "2-..." before "10-..."
const state = {
  info: null, evalIndex: null, rows: [], shown: [], sort: { key: "name", dir: 1 },
  pairIndex: null, pair: null, clickSeq: 0, lastClick: null, pickers: {}, upload: null, uploadSeq: 0,
};

// ------------------------------------------------------------------ helpers
async function api(path, options) {
  const response = await fetch(path, options);
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function showError(message) {
  $("#error-text").textContent = message;
  $("#error").hidden = false;
}

function hideError() { $("#error").hidden = true; }

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function option(value, label) { return el("option", { value, text: label }); }

// one colour per keypoint: hues a golden angle apart, so neighbours differ
function kpColour(k) { return `hsl(${(k * 137.508) % 360}, 85%, 52%)`; }

function pck(row, alpha) {
  if (!row.n) return null;
  if (row.err.every((e) => e === null)) return null;
  return row.err.filter((e) => e !== null && e <= alpha + 1e-12).length / row.n;
}

function fmt(value, digits = 1) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); }

// ------------------------------------------------------------------ descriptor pickers
// A picker chooses a descriptor key: ckpt:I (a --checkpoint) or raw:SOURCE:LAYER@T (a cached map).
function makePicker(container, onChange) {
  const kind = el("select", { title: "descriptor" });
  const source = el("select", { title: "source" });
  const layer = el("select", { title: "layer" });
  const step = el("select", { title: "timestep (UNet t)" });
  for (const c of state.info.checkpoints) kind.append(option(c.key, `checkpoint ${c.label}`));
  kind.append(option("raw", "raw map…"));
  for (const s of state.info.sources) source.append(option(s.name, s.name));
  const sourceInfo = () => state.info.sources.find((s) => s.name === source.value);
  function fillLayers() {
    const info = sourceInfo();
    layer.replaceChildren(...info.layers.map((l) => option(l.name, `${l.name} (${l.channels}×${l.height}×${l.width})`)));
    step.replaceChildren(...info.timesteps.map((t) => option(String(t), `t=${t}`)));
  }
  function sync() {
    const raw = kind.value === "raw";
    source.hidden = !raw || state.info.sources.length < 2;
    layer.hidden = !raw;
    step.hidden = !raw || sourceInfo().timesteps.length < 2;
  }
  fillLayers();
  container.replaceChildren(kind, source, layer, step);
  const picker = {
    key() {
      if (kind.value !== "raw") return kind.value;
      return `raw:${source.value}:${layer.value}@${step.value}`;
    },
    set(key) {
      if (!key) return;
      if (key.startsWith("raw:")) {
        const rest = key.slice(4);
        const cut = rest.indexOf(":");
        const at = rest.lastIndexOf("@");
        kind.value = "raw";
        source.value = rest.slice(0, cut);
        fillLayers();
        layer.value = rest.slice(cut + 1, at);
        step.value = rest.slice(at + 1);
      } else {
        kind.value = key;
      }
      sync();
    },
    label() {
      if (kind.value !== "raw") return kind.selectedOptions[0].textContent;
      return `raw ${state.info.sources.length > 1 ? source.value + ":" : ""}${layer.value}@${step.value}`;
    },
  };
  for (const node of [kind, layer, step]) node.addEventListener("change", () => { sync(); onChange(); });
  source.addEventListener("change", () => { fillLayers(); sync(); onChange(); });
  if (!state.info.checkpoints.length) kind.value = "raw";
  sync();
  return picker;
}

// ------------------------------------------------------------------ stages (a photo and its overlay)
function setStage(stage, size, photoUrl) {
  const [w, h] = size;
  stage.style.aspectRatio = `${w} / ${h}`;
  stage.dataset.width = w;
  stage.dataset.height = h;
  const photo = $("img.photo", stage);
  stage.classList.toggle("missing", !photoUrl);
  if (photoUrl) photo.src = photoUrl; else photo.removeAttribute("src");
  const heat = $("img.heat", stage);
  if (heat) heat.removeAttribute("src");
  delete stage.dataset.argmaxX;
  delete stage.dataset.argmaxY;
  delete stage.dataset.state;
}

// a canvas in screen pixels; draw(ctx, sx, sy) gets the scale from image pixels
function draw(stage, painter) {
  const canvas = $("canvas", stage);
  const ratio = window.devicePixelRatio || 1;
  const cw = stage.clientWidth, ch = stage.clientHeight;
  canvas.width = Math.round(cw * ratio);
  canvas.height = Math.round(ch * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cw, ch);
  painter(ctx, cw / Number(stage.dataset.width), ch / Number(stage.dataset.height));
}

function disc(ctx, x, y, r, fill, stroke = "#000", width = 1.5) {
  ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI);
  if (fill) { ctx.fillStyle = fill; ctx.fill(); }
  if (stroke) { ctx.strokeStyle = stroke; ctx.lineWidth = width; ctx.stroke(); }
}

function ring(ctx, x, y, r, colour, width = 2.5) {
  disc(ctx, x, y, r + 1, null, "#000", width + 2);
  disc(ctx, x, y, r, null, colour, width);
}

function square(ctx, x, y, r, fill, stroke) {
  ctx.fillStyle = fill; ctx.fillRect(x - r, y - r, 2 * r, 2 * r);
  ctx.strokeStyle = stroke; ctx.lineWidth = 2.5; ctx.strokeRect(x - r, y - r, 2 * r, 2 * r);
}

function cross(ctx, x, y, r) {
  for (const [colour, width] of [["#000", 4], ["#fff", 2]]) {
    ctx.strokeStyle = colour; ctx.lineWidth = width; ctx.beginPath();
    ctx.moveTo(x - r, y); ctx.lineTo(x + r, y); ctx.moveTo(x, y - r); ctx.lineTo(x, y + r); ctx.stroke();
  }
}

function star(ctx, x, y, r) {
  ctx.beginPath();
  for (let i = 0; i < 10; i++) {
    const radius = i % 2 ? r * 0.45 : r, angle = -Math.PI / 2 + (i * Math.PI) / 5;
    ctx.lineTo(x + radius * Math.cos(angle), y + radius * Math.sin(angle));
  }
  ctx.closePath(); ctx.fillStyle = "#fff"; ctx.fill(); ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5; ctx.stroke();
}

function line(ctx, x1, y1, x2, y2, colour, dashed = false) {
  ctx.save(); if (dashed) ctx.setLineDash([5, 4]);
  ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.beginPath(); ctx.moveTo(x1, y1); ctx.lineTo(x2, y2); ctx.stroke();
  ctx.restore();
}

// where a click landed, in the stage's original image pixels
function imagePoint(stage, event) {
  const rect = stage.getBoundingClientRect();
  return [(event.clientX - rect.left) * (Number(stage.dataset.width) / rect.width),
          (event.clientY - rect.top) * (Number(stage.dataset.height) / rect.height)];
}

// ------------------------------------------------------------------ the pair browser
async function loadEval(index) {
  state.evalIndex = index;
  const ev = state.info.evals[index];
  const summary = ev.pck["bbox@0.1"];
  $("#eval-summary").textContent = `${ev.n_pairs} pairs of ${ev.dataset} (${ev.split}); ${ev.descriptor}` +
    (summary ? `; PCK@0.1 (bbox, per point) ${fmt(100 * summary.per_point)} %` : "") +
    (ev.unmatched ? `; ${ev.unmatched} pairs not in the data set` : "");
  $("#f-category").replaceChildren(option("", "all"), ...ev.categories.map((c) => option(c, c)));
  $("#f-alpha").replaceChildren(...ev.alphas.map((a) => option(String(a), String(a))));
  $("#f-alpha").value = ev.alphas.includes(0.1) ? "0.1" : String(ev.alphas[0]);
  $("#f-flags").replaceChildren(...ev.flags.map((flag) => el("label", {}, [
    `${flag.replaceAll("_", " ")} `,
    el("select", { className: "flag", dataset: { flag } }, [option("", "any"), ...[0, 1, 2, 3].map((v) => option(String(v), String(v)))]),
  ])));
  for (const select of document.querySelectorAll("#f-flags select")) select.addEventListener("change", renderRows);
  if (ev.default) state.pickers.a.set(ev.default);
  $("#load").value = ev.load_size;
  const data = await api(`/api/pairs?eval=${index}`);
  state.rows = data.pairs;
  renderRows();
  const fromHash = new URLSearchParams(location.hash.slice(1));
  const wanted = fromHash.has("pair") ? Number(fromHash.get("pair")) : NaN;
  const first = Number(fromHash.get("eval")) === index && Number.isInteger(wanted) && state.rows[wanted] ? wanted
    : (state.shown[0] ? state.shown[0].i : null);
  if (first !== null) await selectPair(first);
}

function renderRows() {
  const alpha = Number($("#f-alpha").value);
  const category = $("#f-category").value;
  const low = Number($("#f-min").value) / 100, high = Number($("#f-max").value) / 100;
  const text = $("#f-text").value.trim().toLowerCase();
  const flags = [...document.querySelectorAll("#f-flags select")].filter((s) => s.value !== "");
  let rows = state.rows.map((row) => ({ ...row, pck: pck(row, alpha) }));
  rows = rows.filter((row) => (!category || row.category === category)
    && (row.pck === null ? low <= 0 : row.pck >= low - 1e-9 && row.pck <= high + 1e-9)
    && (!text || row.name.toLowerCase().includes(text))
    && flags.every((s) => String(row.flags[s.dataset.flag]) === s.value));
  const { key, dir } = state.sort;
  rows.sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === null && y === null) return a.i - b.i;
    if (x === null) return 1;
    if (y === null) return -1;
    const order = typeof x === "string" ? collator.compare(x, y) : x - y;
    return (order || a.i - b.i) * dir;
  });
  state.shown = rows;
  for (const th of document.querySelectorAll("#pairs th")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === key && dir > 0);
    th.classList.toggle("sorted-desc", th.dataset.sort === key && dir < 0);
  }
  const body = $("#pairs tbody");
  body.replaceChildren(...rows.map((row) => {
    const tr = el("tr", { dataset: { index: row.i } }, [
      el("td", { className: "name", text: row.name, title: row.problem || row.name }),
      el("td", { text: row.category }),
      el("td", { text: row.pck === null ? "–" : `${Math.round(100 * row.pck)} %` }),
      el("td", { text: row.n }),
    ]);
    if (row.i === state.pairIndex) tr.classList.add("selected");
    tr.addEventListener("click", () => selectPair(row.i));
    return tr;
  }));
  $("#pairs-count").textContent = `${rows.length} of ${state.rows.length} pairs shown`;
}

async function selectPair(index) {
  state.pairIndex = index;
  state.lastClick = null;
  for (const tr of document.querySelectorAll("#pairs tbody tr")) tr.classList.toggle("selected", Number(tr.dataset.index) === index);
  history.replaceState(null, "", `#eval=${state.evalIndex}&pair=${index}`);
  let pair;
  try {
    pair = await api(`/api/pair?eval=${state.evalIndex}&pair=${index}`);
  } catch (error) { showError(error.message); return; }
  if (state.pairIndex !== index) return;
  state.pair = pair;
  $("#pair-title").textContent = `${pair.name} (${pair.category})` +
    (Object.keys(pair.flags).length ? ` · ${Object.entries(pair.flags).map(([k, v]) => `${k.replaceAll("_", " ")} ${v}`).join(", ")}` : "");
  $("#pair-problem").hidden = !pair.problem;
  $("#pair-problem").textContent = pair.problem || "";
  const photo = (id, ok) => (ok ? `/api/photo?id=${encodeURIComponent(id)}` : null);
  const srcSize = pair.src_size || pair.trg_size;
  setStage($("#src-stage"), srcSize, photo(pair.src, pair.photos.src));
  for (const side of ["a", "b"]) setStage($(`#trg-stage-${side}`), pair.trg_size, photo(pair.trg, pair.photos.trg));
  $("#click-info").textContent = pair.problem ? "" : "Click the source to see how similar every pixel of the target is.";
  renderKeypointTable();
  redrawPair();
}

function correctAt(pair, k) {
  const alpha = Number($("#f-alpha").value);
  return pair.err[k] !== null && pair.err[k] <= alpha + 1e-12;
}

function redrawPair() {
  const pair = state.pair;
  if (!pair) return;
  const showGt = $("#show-gt").checked, showPred = $("#show-pred").checked;
  const click = state.lastClick;
  draw($("#src-stage"), (ctx, sx, sy) => {
    if (showGt) pair.src_kps.forEach(([x, y], k) => { if (x !== null) disc(ctx, x * sx, y * sy, 5, kpColour(k)); });
    if (click) cross(ctx, click.click[0] * sx, click.click[1] * sy, 9);
  });
  for (const side of ["a", "b"]) {
    const stage = $(`#trg-stage-${side}`);
    const answer = click && click.answers[side];
    draw(stage, (ctx, sx, sy) => {
      pair.trg_kps.forEach(([x, y], k) => {
        if (x === null) return;
        const [px, py] = pair.pred_kps[k];
        const ok = correctAt(pair, k);
        if (showPred && px !== null) line(ctx, px * sx, py * sy, x * sx, y * sy, ok ? "#1a9a3a" : "#d12b2b");
        if (showGt) ring(ctx, x * sx, y * sy, 5, kpColour(k));
        if (showPred && px !== null) square(ctx, px * sx, py * sy, 4, kpColour(k), ok ? "#1a9a3a" : "#d12b2b");
      });
      if (answer) {
        if (click.near !== null) {
          const [gx, gy] = pair.trg_kps[click.near];
          line(ctx, answer.argmax[0] * sx, answer.argmax[1] * sy, gx * sx, gy * sy, "#fff", true);
          ring(ctx, gx * sx, gy * sy, 10, kpColour(click.near), 3);
        }
        star(ctx, answer.argmax[0] * sx, answer.argmax[1] * sy, 10);
      }
    });
  }
}

function renderKeypointTable() {
  const pair = state.pair;
  $("#kp-table tbody").replaceChildren(...pair.trg_kps.map((_, k) => {
    const swatch = el("span", { className: "swatch" });
    swatch.style.background = kpColour(k);
    const ok = correctAt(pair, k);
    return el("tr", {}, [el("td", {}, [swatch]), el("td", { text: String(k) }), el("td", { text: fmt(pair.dist[k]) }),
      el("td", { text: fmt(pair.err[k], 3) }), el("td", { className: ok ? "ok" : "bad", text: ok ? "yes" : "no" })]);
  }));
}

// the annotated source keypoint nearest the click, if within 4% of the image's longer side
function nearKeypoint(pair, point) {
  const size = pair.src_size || pair.trg_size;
  const limit = 0.04 * Math.max(size[0], size[1]);
  let best = null, bestDistance = Infinity;
  pair.src_kps.forEach(([x, y], k) => {
    if (x === null) return;
    const d = Math.hypot(x - point[0], y - point[1]);
    if (d < bestDistance) { best = k; bestDistance = d; }
  });
  return bestDistance <= limit ? best : null;
}

async function clickSource(event) {
  const pair = state.pair;
  if (!pair || pair.problem) return;
  const stage = $("#src-stage");
  const point = imagePoint(stage, event);
  stage.dataset.clickX = point[0];
  stage.dataset.clickY = point[1];
  const seq = ++state.clickSeq;
  const load = Number($("#load").value);
  const sides = $("#compare").checked ? ["a", "b"] : ["a"];
  const click = { click: point, near: nearKeypoint(pair, point), answers: {} };
  state.lastClick = click;
  redrawPair();
  for (const side of sides) $(`#trg-stage-${side}`).classList.add("busy");
  try {
    const answers = await Promise.all(sides.map((side) => api(`/api/click?eval=${state.evalIndex}&pair=${state.pairIndex}` +
      `&desc=${encodeURIComponent(state.pickers[side].key())}&x=${point[0]}&y=${point[1]}&load=${load}`)));
    if (seq !== state.clickSeq) return;
    hideError();
    sides.forEach((side, n) => { click.answers[side] = answers[n]; });
    await Promise.all(sides.map((side) => showHeatmap($(`#trg-stage-${side}`), click.answers[side])));
    redrawPair();
    describeClick(click, sides);
  } catch (error) {
    if (seq !== state.clickSeq) return;
    $("#click-info").replaceChildren(el("span", { className: "bad", text: error.message }));
    showError(error.message);
  } finally {
    if (seq === state.clickSeq) for (const side of sides) $(`#trg-stage-${side}`).classList.remove("busy");
  }
}

function showHeatmap(stage, answer) {
  return new Promise((resolve) => {
    const heat = $("img.heat", stage);
    heat.onload = () => {
      stage.dataset.argmaxX = answer.argmax[0];
      stage.dataset.argmaxY = answer.argmax[1];
      stage.dataset.loadSize = answer.load_size;
      stage.dataset.key = answer.key;
      stage.dataset.state = "drawn";
      resolve();
    };
    heat.onerror = () => { stage.dataset.state = "error"; resolve(); };
    heat.style.opacity = Number($("#opacity").value) / 100;
    heat.src = answer.heatmap;
  });
}

function describeClick(click, sides) {
  const pair = state.pair;
  const parts = [`click (${fmt(click.click[0])}, ${fmt(click.click[1])}) → load pixel (${click.answers.a.load_pixel.join(", ")})`];
  for (const side of sides) {
    const answer = click.answers[side];
    let text = `${state.pickers[side].label()}: argmax (${fmt(answer.argmax[0])}, ${fmt(answer.argmax[1])}), ` +
      `similarity ${fmt(answer.score, 3)} (map ${fmt(answer.range[0], 2)} … ${fmt(answer.range[1], 2)}), ${fmt(answer.ms, 0)} ms`;
    if (click.near !== null) {
      const [gx, gy] = pair.trg_kps[click.near];
      const distance = Math.hypot(answer.argmax[0] - gx, answer.argmax[1] - gy);
      const alpha = Number($("#f-alpha").value);
      const ok = pair.length !== null && distance <= alpha * pair.length;
      text += `; keypoint ${click.near}: ${fmt(distance)} px from its ground truth (${ok ? "correct" : "wrong"} at ${alpha})`;
    }
    parts.push(text);
  }
  $("#click-info").replaceChildren(...parts.map((p) => el("div", { text: p })));
  $("#trg-caption-a").textContent = `target · ${state.pickers.a.label()}`;
  $("#trg-caption-b").textContent = `target · ${state.pickers.b.label()}`;
}

function stepPair(delta) {
  const position = state.shown.findIndex((row) => row.i === state.pairIndex);
  const next = state.shown[position + delta];
  if (next) {
    selectPair(next.i);
    const tr = document.querySelector(`#pairs tbody tr[data-index="${next.i}"]`);
    if (tr) tr.scrollIntoView({ block: "nearest" });
  }
}

// ------------------------------------------------------------------ inside the features
function weightColour(value, min, max) {
  // pale -> deep blue from the table's smallest weight to its largest (weights are often close)
  const t = max > min ? Math.min(1, Math.max(0, (value - min) / (max - min))) : 1;
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return `rgb(${mix(247, 8)}, ${mix(251, 48)}, ${mix(255, 107)})`;
}

async function loadMixing() {
  const target = $("#mixing");
  const key = $("#mix-checkpoint").value;
  if (!key) { target.textContent = "No --checkpoint was given."; return; }
  let data;
  try { data = await api(`/api/mixing?checkpoint=${key.split(":")[1]}`); } catch (error) { showError(error.message); return; }
  target.replaceChildren(...data.tables.map((table) => {
    const max = Math.max(...table.weights.flat()), min = Math.min(...table.weights.flat());
    const head = el("tr", {}, [el("th", { text: table.source ? `${table.source}: t \\ layer` : "t \\ layer" }),
      ...table.layers.map((name) => el("th", { className: "layer", text: name }))]);
    const rows = table.weights.map((row, t) => el("tr", {}, [el("th", { text: String(table.timesteps[t]) }),
      ...row.map((value, l) => {
        const cell = el("td", { className: "cell", dataset: { t: table.timesteps[t], layer: table.layers[l] } });
        cell.style.background = weightColour(value, min, max);
        const note = `${table.layers[l]} @ t=${table.timesteps[t]}: weight ${value.toFixed(4)} (${(100 * value / max).toFixed(0)} % of the largest)`;
        cell.title = note;
        cell.addEventListener("mouseenter", () => { $("#mix-hover").textContent = note; });
        cell.addEventListener("click", () => {
          const raw = table.keys[t][l];
          if (!raw) { showError(`${table.layers[l]} @ t=${table.timesteps[t]}: not a map of this cache`); return; }
          state.pickers.pca.set(raw);
          showPca();
        });
        return cell;
      })]));
    const legend = el("div", { className: "muted small", text: `colour: ${min.toFixed(4)} (pale) to ${max.toFixed(4)} ` +
      `(deep blue); the weights of all tables sum to 1` });
    return el("div", { className: "mixing-table" }, [el("table", {}, [el("thead", {}, [head]), el("tbody", {}, rows)]), legend]);
  }));
}

async function showPca() {
  const id = $("#pca-image").value;
  if (!id) return;
  const photo = $("#pca-photo");
  const known = $("#pca-image").selectedOptions[0].dataset.photo === "1";
  if (known) photo.src = `/api/photo?id=${encodeURIComponent(id)}`; else photo.removeAttribute("src");
  $("#pca-info").textContent = "computing…";
  try {
    const data = await api(`/api/pca?id=${encodeURIComponent(id)}&desc=${encodeURIComponent(state.pickers.pca.key())}`);
    $("#pca-image-out").src = data.pca;
    $("#pca-info").textContent = `${state.pickers.pca.label()} of ${id}: ${data.shape.join(" × ")}; variance explained by ` +
      `the three components: ${data.explained.map((v) => `${(100 * v).toFixed(1)} %`).join(", ")}`;
    hideError();
  } catch (error) {
    $("#pca-info").replaceChildren(el("span", { className: "bad", text: error.message }));
    showError(error.message);
  }
}

// ------------------------------------------------------------------ your own photos
async function submitUpload(event) {
  event.preventDefault();
  const a = $("#up-a").files[0], b = $("#up-b").files[0];
  if (!a || !b) { showError("choose two photos, A and B"); return; }
  const limit = state.info.max_upload_bytes;
  for (const [name, file] of [["A", a], ["B", b]]) {
    if (file.size > limit) { showError(`photo ${name} (${file.name}): ${(file.size / 2 ** 20).toFixed(1)} MiB exceeds the upload limit of ${(limit / 2 ** 20).toFixed(1)} MiB`); return; }
  }
  const form = new FormData();
  form.append("checkpoint", $("#up-checkpoint").value.split(":")[1]);
  form.append("grid", $("#up-grid").value);
  form.append("a", a, a.name);
  form.append("b", b, b.name);
  $("#up-go").disabled = true;
  $("#up-stages").hidden = true;
  const seq = ++state.uploadSeq;
  try {
    let job = await api("/api/upload", { method: "POST", body: form });
    hideError();
    while (job.state === "queued" || job.state === "running") {
      showJob(job);
      await new Promise((resolve) => setTimeout(resolve, 400));
      job = await api(`/api/job?id=${job.id}`);
    }
    if (seq !== state.uploadSeq) return;
    showJob(job);
    if (job.state === "error") throw new Error(job.error);
    showUploadResult(job);
  } catch (error) {
    showError(error.message);
    $("#up-stage").textContent = error.message;
  } finally {
    $("#up-go").disabled = false;
  }
}

function showJob(job) {
  const progress = $("#up-progress");
  progress.hidden = false;
  progress.value = job.step;
  progress.max = job.steps;
  $("#up-stage").textContent = job.state === "done" ? `done in ${job.elapsed} s`
    : job.state === "error" ? "failed" : `${job.stage}… (${job.elapsed} s)`;
  $("#up-notes").replaceChildren(...job.notes.map((n) => el("div", { text: n })));
}

function showUploadResult(job) {
  const result = job.result;
  state.upload = { job: job.id, result, click: null, answer: null };
  $("#up-stages").hidden = false;
  setStage($("#up-stage-a"), result.size_a, result.photo_a);
  setStage($("#up-stage-b"), result.size_b, result.photo_b);
  redrawUpload();
  $("#up-click-info").textContent = `${result.points_a.length} grid points matched at load size ${result.load_size}; click A to see B's similarity.`;
}

function redrawUpload() {
  const up = state.upload;
  if (!up) return;
  const { result } = up;
  draw($("#up-stage-a"), (ctx, sx, sy) => {
    result.points_a.forEach(([x, y], k) => disc(ctx, x * sx, y * sy, 5, kpColour(k)));
    if (up.click) cross(ctx, up.click[0] * sx, up.click[1] * sy, 9);
  });
  draw($("#up-stage-b"), (ctx, sx, sy) => {
    result.points_b.forEach(([x, y], k) => square(ctx, x * sx, y * sy, 4, kpColour(k), "#fff"));
    if (up.answer) star(ctx, up.answer.argmax[0] * sx, up.answer.argmax[1] * sy, 10);
  });
}

async function clickUpload(event) {
  const up = state.upload;
  if (!up) return;
  const stage = $("#up-stage-a");
  const point = imagePoint(stage, event);
  up.click = point;
  up.answer = null;
  redrawUpload();
  $("#up-stage-b").classList.add("busy");
  try {
    const answer = await api(`/api/upload-click?job=${up.job}&x=${point[0]}&y=${point[1]}&load=${up.result.load_size}`);
    if (up !== state.upload || up.click !== point) return;
    up.answer = answer;
    await showHeatmap($("#up-stage-b"), answer);
    redrawUpload();
    $("#up-click-info").textContent = `click (${fmt(point[0])}, ${fmt(point[1])}) → argmax (${fmt(answer.argmax[0])}, ` +
      `${fmt(answer.argmax[1])}) in B, similarity ${fmt(answer.score, 3)}, ${fmt(answer.ms, 0)} ms`;
  } catch (error) {
    showError(error.message);
  } finally {
    $("#up-stage-b").classList.remove("busy");
  }
}

// ------------------------------------------------------------------ start
function showTab(name) {
  for (const button of document.querySelectorAll("nav button")) button.classList.toggle("active", button.dataset.tab === name);
  for (const tab of document.querySelectorAll(".tab")) tab.hidden = tab.id !== `tab-${name}`;
  if (name === "pairs") redrawPair();
  if (name === "photos") redrawUpload();
}

async function start() {
  $("#error-close").addEventListener("click", hideError);
  try {
    state.info = await api("/api/info");
  } catch (error) { showError(`the viewer's server did not answer: ${error.message}`); return; }
  const info = state.info;
  $("#cache-name").textContent = `cache ${info.cache} · ${info.images} images · ${info.checkpoints.length} checkpoints · dhf-cache ${info.version}`;
  for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  state.pickers.a = makePicker($("#desc-a"), () => { state.lastClick = null; redrawPair(); });
  state.pickers.b = makePicker($("#desc-b"), () => { state.lastClick = null; redrawPair(); });
  state.pickers.pca = makePicker($("#pca-desc"), () => {});
  if (info.checkpoints.length > 1) state.pickers.b.set(info.checkpoints[1].key);
  else state.pickers.b.set(`raw:${info.sources[0].name}:${info.sources[0].layers[0].name}@${info.sources[0].timesteps[0]}`);
  $("#load").value = info.load_size;
  $("#load").min = info.min_load;
  $("#load").max = info.max_load;
  $("#compare").addEventListener("change", () => {
    $("#trg-figure-b").hidden = !$("#compare").checked;
    state.lastClick = null;
    redrawPair();
  });
  $("#opacity").addEventListener("input", () => {
    for (const heat of document.querySelectorAll("img.heat")) heat.style.opacity = Number($("#opacity").value) / 100;
  });
  for (const id of ["#show-gt", "#show-pred"]) $(id).addEventListener("change", redrawPair);
  for (const id of ["#f-category", "#f-min", "#f-max", "#f-text"]) $(id).addEventListener("input", renderRows);
  $("#f-alpha").addEventListener("change", () => { renderRows(); if (state.pair) { renderKeypointTable(); redrawPair(); } });
  for (const th of document.querySelectorAll("#pairs th")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      renderRows();
    });
  }
  $("#src-stage").addEventListener("click", clickSource);
  $("#up-stage-a").addEventListener("click", clickUpload);
  document.addEventListener("keydown", (event) => {
    if (event.target.matches("input, select, textarea") || $("#tab-pairs").hidden) return;
    if (event.key === "j") stepPair(1);
    if (event.key === "k") stepPair(-1);
  });
  window.addEventListener("resize", () => { redrawPair(); redrawUpload(); });
  // inside the features
  const checkpointOptions = info.checkpoints.map((c) => option(c.key, c.label));
  $("#mix-checkpoint").replaceChildren(...checkpointOptions);
  $("#mix-checkpoint").addEventListener("change", loadMixing);
  $("#up-checkpoint").replaceChildren(...info.checkpoints.map((c) => option(c.key, c.label)));
  $("#upload-form").addEventListener("submit", submitUpload);
  $("#up-go").disabled = !info.checkpoints.length;
  if (!info.checkpoints.length) $("#up-stage").textContent = "Start the viewer with --checkpoint RUN to match photos.";
  $("#pca-go").addEventListener("click", showPca);
  api("/api/images").then((data) => {
    const images = [...data.images.filter((i) => i.photo), ...data.images.filter((i) => !i.photo)];  // photos first
    $("#pca-image").replaceChildren(...images.map((image) => {
      const node = option(image.id, image.photo ? image.id : `${image.id} (no photo)`);
      node.dataset.photo = image.photo ? "1" : "0";
      return node;
    }));
  }).catch((error) => showError(error.message));
  loadMixing();
  // the pair browser
  $("#eval").replaceChildren(...info.evals.map((e) => option(String(e.index), `${e.label} (${e.n_pairs} pairs)`)));
  $("#eval").addEventListener("change", () => loadEval(Number($("#eval").value)).catch((error) => showError(error.message)));
  if (info.evals.length) {
    const fromHash = Number(new URLSearchParams(location.hash.slice(1)).get("eval"));
    const first = Number.isInteger(fromHash) && info.evals[fromHash] ? fromHash : 0;
    $("#eval").value = String(first);
    await loadEval(first).catch((error) => showError(error.message));
  } else {
    $("#pair-title").textContent = "No evaluation given: start the viewer with --eval DIR to browse its pairs.";
  }
  document.body.dataset.ready = "1";
}

start();
