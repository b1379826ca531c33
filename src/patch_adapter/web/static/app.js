// Patch-Adapter's page: a canvas to paint the mask, the settings form, plan, queue and results.
// The mask is a bitmap of the picture's own size (one cell per pixel up to 8192 px a side; the
// server says the cell size): what is shown is exactly what runs. Every decision about the
// inpaint (plan, run, checks) is the server's, which calls the package.
"use strict";

const $ = (id) => document.getElementById(id);
const TILE = 256;            // undo granularity of the mask, in cells
const OTILE = 512;           // the overlay is drawn from canvases this large, made where the mask is painted
const PREVIEW_SIDE = 2048;   // zoomed out, the picture is drawn from a copy this large
const MASK_RGBA = 0xd05010ff; // ABGR (little endian): a translucent orange-red overlay is drawn from it

const S = {
  config: null, image: null, full: null, preview: null, previewScale: 1,
  mask: null, overlay: new Map(), version: 0, sending: Promise.resolve(),
  undo: [], redo: [], stroke: null, tool: "brush", brush: 40,
  view: { scale: 1, ox: 0, oy: 0 }, pointer: null, space: false, panning: null,
  mode: "edit", comparing: false, result: null, plan: null, jobs: [], polling: false, shownJob: null,
};

// ------------------------------------------------------------------ server calls

async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let text = `${response.status} ${response.statusText}`;
    try { text = (await response.json()).error || text; } catch (e) { /* not JSON */ }
    throw new Error(text);
  }
  return response;
}
const apiJSON = async (path, body) => (await api(path, body === undefined ? {} : {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
})).json();

function message(text, error = false) {
  const box = $("message");
  box.textContent = text;
  box.className = error ? "error" : "";
  box.hidden = false;
  clearTimeout(message.timer);
  message.timer = setTimeout(() => { box.hidden = true; }, error ? 12000 : 4000);
}
const fail = (err) => message(err.message || String(err), true);

// ------------------------------------------------------------------ settings form

function buildSettings() {
  for (const field of S.config.settings) {
    const row = document.createElement("div");
    row.className = "field";
    const label = document.createElement("label");
    label.textContent = field.name.replace(/_/g, " ");
    label.title = field.help || "";
    let input;
    if (field.choices) {
      input = document.createElement("select");
      if (field.default === null) input.append(new Option("(model default)", ""));
      for (const c of field.choices) input.append(new Option(c, c));
    } else if (field.type === "str") {
      input = document.createElement(field.name.includes("prompt") ? "textarea" : "input");
    } else {
      input = document.createElement("input");
      input.type = "number";
      input.step = field.type === "int" ? "1" : "any";
      if (field.default === null) input.placeholder = "default";
    }
    input.id = `s-${field.name}`;
    input.dataset.kind = field.type;
    input.value = field.default === null ? "" : field.default;
    input.title = field.help || "";
    label.htmlFor = input.id;
    input.addEventListener("change", schedulePlan);
    row.append(label, input);
    if (field.name === "seed") {
      const dice = document.createElement("button");
      dice.textContent = "\u2684";  // a die
      dice.title = "random seed";
      dice.id = "dice";
      dice.onclick = () => { input.value = Math.floor(Math.random() * 2 ** 31); };
      row.append(dice);
    }
    $(field.advanced ? "advanced-settings" : "main-settings").append(row);
  }
}

function readSettings() {
  const out = {};
  for (const field of S.config.settings) {
    const value = $(`s-${field.name}`).value;
    if (value === "") { out[field.name] = field.type === "str" && !field.choices ? "" : null; continue; }
    out[field.name] = field.type === "int" ? parseInt(value, 10) : field.type === "float" ? parseFloat(value) : value;
  }
  if (out.negative_prompt === "") out.negative_prompt = null;
  return out;
}

function writeSettings(settings) {
  for (const field of S.config.settings) {
    if (field.name in settings) {
      const v = settings[field.name];
      $(`s-${field.name}`).value = v === null || v === undefined ? "" : v;
    }
  }
  schedulePlan();
}

// ------------------------------------------------------------------ opening a picture

async function openPicture(file) {
  if (!file) return;
  if (file.size > S.config.max_upload_bytes) {
    return fail(new Error(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB, more than the server's limit of ` +
      `${(S.config.max_upload_bytes / 1e6).toFixed(0)} MB (start it with --max-upload-mb to change it)`));
  }
  message(`opening ${file.name} ...`);
  const started = performance.now();
  try {
    const [entry, bitmap] = await Promise.all([
      api("/api/images", { method: "POST", body: file, headers: { "X-Filename": encodeURIComponent(file.name) } })
        .then((r) => r.json()),
      createImageBitmap(file, { imageOrientation: "from-image" }).catch(() => null),
    ]);
    const shown = bitmap || await createImageBitmap(await (await api(`/api/images/${entry.id}/display.png`)).blob());
    if (shown.width !== entry.width || shown.height !== entry.height) {
      throw new Error(`the browser decodes ${file.name} as ${shown.width}x${shown.height} but the server as ` +
        `${entry.width}x${entry.height} (EXIF rotation?); save it upright as PNG and open it again`);
    }
    await setPicture(entry, shown);
    window.openMs = performance.now() - started;  // read by the browser test
    message(`${entry.name}: ${entry.width}x${entry.height}, ${entry.bit_depth}-bit, opened in ${Math.round(window.openMs)} ms`);
  } catch (err) { fail(err); }
}

async function setPicture(entry, bitmap) {
  S.image = entry; S.full = bitmap; S.result = null; S.plan = null;
  const shrink = Math.min(1, PREVIEW_SIDE / Math.max(entry.width, entry.height));
  S.previewScale = shrink;
  S.preview = shrink < 1 ? await createImageBitmap(bitmap, {
    resizeWidth: Math.max(1, Math.round(entry.width * shrink)),
    resizeHeight: Math.max(1, Math.round(entry.height * shrink)), resizeQuality: "medium",
  }) : bitmap;
  S.mask = new Uint8Array(entry.mask_width * entry.mask_height);
  S.overlay = new Map();
  S.undo = []; S.redo = []; S.version = 0;
  $("drop-hint").hidden = true;
  $("image-info").textContent = `${entry.name} ${entry.width}x${entry.height}` +
    (entry.cell > 1 ? ` (mask cells of ${entry.cell}x${entry.cell} px)` : "");
  $("run-button").disabled = false;
  setMode("edit");
  setBrush(Math.max(8, Math.max(entry.width, entry.height) / 40));  // 2.5% of the long side
  fit();
  schedulePlan();
}

// ------------------------------------------------------------------ the mask

function tileRect(key) {
  const mw = S.image.mask_width, mh = S.image.mask_height, ntx = Math.ceil(mw / TILE);
  const x = (key % ntx) * TILE, y = Math.floor(key / ntx) * TILE;
  return [x, y, Math.min(TILE, mw - x), Math.min(TILE, mh - y)];
}
function copyTile(key) {
  const [x, y, w, h] = tileRect(key), mw = S.image.mask_width, out = new Uint8Array(w * h);
  for (let r = 0; r < h; r++) out.set(S.mask.subarray((y + r) * mw + x, (y + r) * mw + x + w), r * w);
  return out;
}
function pasteTile(key, data) {
  const [x, y, w, h] = tileRect(key), mw = S.image.mask_width;
  for (let r = 0; r < h; r++) S.mask.set(data.subarray(r * w, (r + 1) * w), (y + r) * mw + x);
  paintOverlay(x, y, w, h);
}

// an edit is a map tile -> [before, after]; undo pastes befores, redo afters
function beginEdit() { S.stroke = { tiles: new Map() }; }
function touch(x0, y0, x1, y1) {
  const ntx = Math.ceil(S.image.mask_width / TILE);
  for (let ty = Math.floor(y0 / TILE); ty <= Math.floor(y1 / TILE); ty++) {
    for (let tx = Math.floor(x0 / TILE); tx <= Math.floor(x1 / TILE); tx++) {
      const key = ty * ntx + tx;
      if (!S.stroke.tiles.has(key)) S.stroke.tiles.set(key, [copyTile(key), null]);
    }
  }
}
function endEdit() {
  const edit = S.stroke;
  S.stroke = null;
  if (!edit || edit.tiles.size === 0) return;
  for (const [key, pair] of edit.tiles) pair[1] = copyTile(key);
  S.undo.push(edit); S.redo = [];
  if (S.undo.length > 100) S.undo.shift();
  maskChanged();
}
function applyEdit(edit, which) { for (const [key, pair] of edit.tiles) pasteTile(key, pair[which]); draw(); }
function undo() { const e = S.undo.pop(); if (e) { applyEdit(e, 0); S.redo.push(e); maskChanged(); } }
function redo() { const e = S.redo.pop(); if (e) { applyEdit(e, 1); S.undo.push(e); maskChanged(); } }

function clearMask() {
  if (!S.image) return;
  beginEdit();
  touch(0, 0, S.image.mask_width - 1, S.image.mask_height - 1);
  S.mask.fill(0);
  paintOverlay(0, 0, S.image.mask_width, S.image.mask_height);
  endEdit(); draw();
}

// a disc of radius r (cells) at (cx, cy): cells whose centre lies inside are set to value
function stamp(cx, cy, r, value) {
  const mw = S.image.mask_width, mh = S.image.mask_height;
  const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(mh - 1, Math.ceil(cy + r));
  const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(mw - 1, Math.ceil(cx + r));
  if (x0 > x1 || y0 > y1) return null;
  touch(x0, y0, x1, y1);
  for (let y = y0; y <= y1; y++) {
    const dy = y + 0.5 - cy, half = r * r - dy * dy;
    if (half < 0) continue;
    const h = Math.sqrt(half);
    const a = Math.max(0, Math.ceil(cx - h - 0.5)), b = Math.min(mw - 1, Math.floor(cx + h - 0.5));
    if (a <= b) S.mask.fill(value, y * mw + a, y * mw + b + 1);
  }
  return [x0, y0, x1, y1];
}

function strokeTo(x, y) {  // x, y in cells
  const r = Math.max(0.5, S.brush / 2 / S.image.cell), value = S.tool === "brush" ? 1 : 0;
  const last = S.stroke.last || [x, y];
  const dist = Math.hypot(x - last[0], y - last[1]), steps = Math.max(1, Math.ceil(dist / Math.max(0.5, r / 3)));
  let box = null;
  for (let i = 1; i <= steps; i++) {  // discs r/3 apart from the last position (one disc when still)
    const t = i / steps;
    const b = stamp(last[0] + (x - last[0]) * t, last[1] + (y - last[1]) * t, r, value);
    if (b) box = box ? [Math.min(box[0], b[0]), Math.min(box[1], b[1]), Math.max(box[2], b[2]), Math.max(box[3], b[3])] : b;
  }
  S.stroke.last = [x, y];
  if (box) paintOverlay(box[0], box[1], box[2] - box[0] + 1, box[3] - box[1] + 1);
  draw();
}

// the overlay canvases from the mask bytes, for one rectangle of cells. Small canvases, because
// changing a few pixels of one 8192x5464 canvas costs a frame of ~400 ms in chromium.
function paintOverlay(x, y, w, h) {
  if (w <= 0 || h <= 0) return;
  const mw = S.image.mask_width, mh = S.image.mask_height;
  for (let ty = Math.floor(y / OTILE); ty <= Math.floor((y + h - 1) / OTILE); ty++) {
    for (let tx = Math.floor(x / OTILE); tx <= Math.floor((x + w - 1) / OTILE); tx++) {
      const x0 = Math.max(x, tx * OTILE), y0 = Math.max(y, ty * OTILE);
      const x1 = Math.min(x + w, (tx + 1) * OTILE, mw), y1 = Math.min(y + h, (ty + 1) * OTILE, mh);
      const data = new ImageData(x1 - x0, y1 - y0), px = new Uint32Array(data.data.buffer);
      let any = false;
      for (let r = y0; r < y1; r++) {
        const row = r * mw, out = (r - y0) * (x1 - x0) - x0;
        for (let c = x0; c < x1; c++) if (S.mask[row + c]) { px[out + c] = MASK_RGBA; any = true; }
      }
      const key = `${tx},${ty}`;
      let tile = S.overlay.get(key);
      if (!tile && !any) continue;
      if (!tile) {
        tile = document.createElement("canvas");
        tile.width = Math.min(OTILE, mw - tx * OTILE); tile.height = Math.min(OTILE, mh - ty * OTILE);
        tile.x = tx * OTILE; tile.y = ty * OTILE;
        S.overlay.set(key, tile);
      }
      tile.getContext("2d").putImageData(data, x0 - tile.x, y0 - tile.y);
    }
  }
}

function drawOverlay(w, h) {
  const { scale, ox, oy } = S.view, k = S.image.cell * scale;
  ctx.imageSmoothingEnabled = false;
  ctx.globalAlpha = 0.5;
  for (const tile of S.overlay.values()) {
    const dx = ox + tile.x * k, dy = oy + tile.y * k, dw = tile.width * k, dh = tile.height * k;
    if (dx < w && dy < h && dx + dw > 0 && dy + dh > 0) ctx.drawImage(tile, dx, dy, dw, dh);
  }
  ctx.globalAlpha = 1;
}

function packMask() {  // 1 bit a cell, first cell in the high bit (numpy's packbits)
  const m = S.mask, n = m.length, out = new Uint8Array((n + 7) >> 3), whole = n >> 3;
  for (let j = 0, i = 0; j < whole; j++, i += 8) {
    out[j] = (m[i] << 7) | (m[i + 1] << 6) | (m[i + 2] << 5) | (m[i + 3] << 4) |
      (m[i + 4] << 3) | (m[i + 5] << 2) | (m[i + 6] << 1) | m[i + 7];
  }
  for (let i = whole * 8; i < n; i++) out[whole] |= m[i] << (7 - (i & 7));
  return out;
}
function unpackMask(bits) {
  const m = S.mask;
  for (let i = 0; i < m.length; i++) m[i] = (bits[i >> 3] >> (7 - (i & 7))) & 1;
}

// send the mask after each edit; the run waits for the last send (the server checks the version)
function maskChanged() {
  const image = S.image, version = ++S.version, bits = packMask();
  S.sending = S.sending.then(() => api(`/api/images/${image.id}/mask`, {
    method: "PUT", body: bits, headers: { "X-Mask-Version": String(version), "Content-Type": "application/octet-stream" },
  })).then(() => { if (version === S.version) schedulePlan(); }).catch(fail);
}

async function loadMaskFile(file) {
  if (!S.image || !file) return fail(new Error("open a picture first, then load its mask"));
  try {
    await S.sending;
    const info = await (await api(`/api/images/${S.image.id}/mask-file`, { method: "POST", body: file })).json();
    const bits = new Uint8Array(await (await api(`/api/images/${S.image.id}/mask.bits`)).arrayBuffer());
    beginEdit();
    touch(0, 0, S.image.mask_width - 1, S.image.mask_height - 1);
    unpackMask(bits);
    paintOverlay(0, 0, S.image.mask_width, S.image.mask_height);
    const edit = S.stroke; S.stroke = null;
    for (const [key, pair] of edit.tiles) pair[1] = copyTile(key);
    S.undo.push(edit); S.redo = [];
    S.version = info.version;  // the server already holds this mask
    draw(); schedulePlan();
    message(`mask loaded: ${info.pixels} px to fill` + (info.note ? ` (${info.note})` : ""));
  } catch (err) { fail(err); }
}

// ------------------------------------------------------------------ plan

function schedulePlan() {
  clearTimeout(schedulePlan.timer);
  schedulePlan.timer = setTimeout(refreshPlan, 120);
}
async function refreshPlan() {
  if (!S.image) return;
  try {
    await S.sending;
    const plan = await apiJSON("/api/plan", { image_id: S.image.id, settings: readSettings() });
    S.plan = plan;
    if (plan.empty_mask) {
      $("plan-text").textContent = "the mask is empty: paint the area to fill";
    } else {
      const lines = [];
      if (plan.stage1_size) lines.push(`whole image at ${plan.stage1_size[0]}x${plan.stage1_size[1]}, ${plan.stage1_steps} step(s)`);
      if (plan.patches) lines.push(`${plan.patches} patches in ${plan.groups.length} group(s), ${plan.stage2_steps} step(s) each`);
      lines.push(`${plan.unet_evaluations} UNet evaluations (${plan.unet_forwards} forwards)`);
      $("plan-text").textContent = lines.join("\n");
    }
    $("plan-text").dataset.evaluations = plan.unet_evaluations;
    draw();
  } catch (err) { $("plan-text").textContent = err.message; }
}

// ------------------------------------------------------------------ run, queue, progress

async function run() {
  if (!S.image) return;
  try {
    await S.sending;
    const job = await apiJSON("/api/jobs", { image_id: S.image.id, mask_version: S.version, settings: readSettings() });
    S.shownJob = job.id;
    S.kick = true;  // a poll loop ending right now must look once more
    message("queued");
    poll();
  } catch (err) { fail(err); }
}

async function poll() {
  if (S.polling) return;
  S.polling = true;
  try {
    for (;;) {
      const { jobs, model_state } = await apiJSON("/api/jobs");
      $("model-state").textContent = `model: ${S.config.model} (${model_state})`;
      showJobs(jobs);
      const active = jobs.some((j) => ["queued", "loading model", "running"].includes(j.state));
      if (!active && !S.kick) break;
      S.kick = false;
      await new Promise((r) => setTimeout(r, 250));
    }
  } catch (err) { fail(err); }
  S.polling = false;
}

function showJobs(jobs) {
  const before = new Map(S.jobs.map((j) => [j.id, j.state]));
  S.jobs = jobs;
  const queue = $("queue");
  queue.textContent = "";
  for (const job of jobs.slice(-8)) {
    const li = document.createElement("li");
    li.textContent = `${job.settings.method}, ${job.settings.steps} steps: ${job.state}` + (job.error ? ` (${job.error})` : "");
    if (["queued", "loading model", "running"].includes(job.state)) {
      const b = document.createElement("button");
      b.textContent = "cancel"; b.onclick = () => cancel(job.id);
      li.append(" ", b);
    }
    queue.append(li);
  }
  const active = jobs.find((j) => ["running", "loading model"].includes(j.state)) || jobs.find((j) => j.state === "queued");
  $("cancel-button").disabled = !active;
  $("cancel-button").onclick = () => active && cancel(active.id);
  if (active) {
    const eta = active.eta_s === null ? "" : `, ETA ${Math.ceil(active.eta_s)} s`;
    const group = active.groups > 1 && active.group ? `, group ${active.group}/${active.groups}` : "";
    $("status").textContent = `${active.state}${active.stage ? ": " + active.stage : ""}${group}` +
      `${active.step ? ", " + active.step : ""}${eta}`;
    $("progress").value = active.progress;
  }
  for (const job of jobs) {
    const was = before.get(job.id);
    if (was === job.state || (was === undefined && job.id !== S.shownJob)) continue;  // no change, or an old job
    if (job.state === "done") { $("status").textContent = "done"; $("progress").value = 1; showResultById(job.result_id); }
    if (job.state === "failed") { $("status").textContent = "failed"; fail(new Error(job.error)); }
    if (job.state === "cancelled") { $("status").textContent = "cancelled"; $("progress").value = 0; }
  }
}

async function cancel(jobId) {
  try { await apiJSON(`/api/jobs/${jobId}/cancel`, {}); } catch (err) { fail(err); }
}

// ------------------------------------------------------------------ results and history

async function refreshHistory() {
  const { results } = await apiJSON("/api/results");
  const list = $("history");
  list.textContent = "";
  results.forEach((r, i) => {
    const li = document.createElement("li");
    const s = r.settings;
    li.textContent = `#${i + 1} ${s.method}, ${s.steps} steps, seed ${s.seed}, ${r.seconds} s` + (s.prompt ? `: "${s.prompt}"` : "");
    li.title = "click: show this result and restore its settings";
    li.onclick = () => { writeSettings(s); if (S.image && r.image_id === S.image.id) showResult(r); };
    list.append(li);
  });
  return results;
}

async function showResultById(resultId) {
  const results = await refreshHistory();
  const entry = results.find((r) => r.id === resultId);
  if (entry && S.image && entry.image_id === S.image.id) await showResult(entry);
}

async function showResult(entry) {
  try {
    const blob = await (await api(entry.url)).blob();
    const bitmap = await createImageBitmap(blob);
    const preview = S.previewScale < 1 ? await createImageBitmap(bitmap, {
      resizeWidth: S.preview.width, resizeHeight: S.preview.height, resizeQuality: "medium" }) : bitmap;
    S.result = { entry, bitmap, preview };
    const link = $("download");
    link.href = entry.url; link.download = entry.name; link.hidden = false;
    for (const id of ["view-result", "view-side", "compare"]) $(id).disabled = false;
    setMode("result");
    drawCrop();
    document.body.dataset.result = entry.id;  // read by the browser test
  } catch (err) { fail(err); }
}

function drawCrop() {
  const canvas = $("crop"), ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = "#0f1012"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!S.result) return;
  const [top, left, bottom, right] = S.result.entry.bbox;
  const cx = Math.round((left + right) / 2 - canvas.width / 2), cy = Math.round((top + bottom) / 2 - canvas.height / 2);
  ctx.drawImage(S.comparing ? S.full : S.result.bitmap, cx, cy, canvas.width, canvas.height, 0, 0, canvas.width, canvas.height);
  $("crop-label").textContent = `${S.comparing ? "before" : "the fill"} at 100%, around (${left + (right - left >> 1)}, ${top + (bottom - top >> 1)})`;
}

// ------------------------------------------------------------------ view: zoom, pan, draw

const canvas = $("view"), ctx = canvas.getContext("2d");

function resize() {
  const box = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(box.width)); canvas.height = Math.max(1, Math.round(box.height));
  draw();
}
function fit() {
  if (!S.image) return;
  const w = S.mode === "side" ? canvas.width / 2 : canvas.width;
  const scale = Math.min(w / S.image.width, canvas.height / S.image.height) * 0.96;
  S.view = { scale, ox: (w - S.image.width * scale) / 2, oy: (canvas.height - S.image.height * scale) / 2 };
  draw();
}
function zoomAt(factor, vx, vy) {
  const v = S.view, scale = Math.min(32, Math.max(0.005, v.scale * factor));
  v.ox = vx - (vx - v.ox) * scale / v.scale; v.oy = vy - (vy - v.oy) * scale / v.scale; v.scale = scale;
  draw();
}
function zoom100() {
  const w = S.mode === "side" ? canvas.width / 2 : canvas.width;
  zoomAt(1 / S.view.scale, w / 2, canvas.height / 2);
}

function draw() {
  cancelAnimationFrame(draw.frame);
  draw.frame = requestAnimationFrame(render);
}

// the part of `source` (picture pixels x sourceScale) visible in a pane of size w x h
function drawPicture(source, sourceScale, w, h, smooth) {
  const { scale, ox, oy } = S.view, W = S.image.width, H = S.image.height;
  const x0 = Math.max(0, Math.floor(-ox / scale)), y0 = Math.max(0, Math.floor(-oy / scale));
  const x1 = Math.min(W, Math.ceil((w - ox) / scale)), y1 = Math.min(H, Math.ceil((h - oy) / scale));
  if (x1 <= x0 || y1 <= y0) return;
  ctx.imageSmoothingEnabled = smooth;
  ctx.drawImage(source, x0 * sourceScale, y0 * sourceScale, (x1 - x0) * sourceScale, (y1 - y0) * sourceScale,
    ox + x0 * scale, oy + y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale);
}

function drawPane(which, w, h) {
  const zoomedOut = S.view.scale <= S.previewScale * 1.5;
  const pair = which === "after" && S.result ? [S.result.bitmap, S.result.preview] : [S.full, S.preview];
  if (zoomedOut) drawPicture(pair[1], S.previewScale, w, h, true);
  else drawPicture(pair[0], 1, w, h, S.view.scale < 1);
  if (which === "before" && S.mode === "edit") {
    drawOverlay(w, h);
    if ($("show-plan").checked && S.plan && S.plan.groups) drawPlan();
  }
}

function drawPlan() {
  const { scale, ox, oy } = S.view;
  ctx.lineWidth = 1.5;
  S.plan.groups.forEach((group, g) => {
    ctx.strokeStyle = `hsl(${(g * 67) % 360} 90% 60%)`;
    for (const t of group) ctx.strokeRect(ox + t.left * scale, oy + t.top * scale, t.width * scale, t.height * scale);
  });
}

function render() {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#0f1012"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!S.image) return;
  if (S.mode === "side") {
    const half = Math.floor(canvas.width / 2);
    for (const [which, x] of [["before", 0], ["after", half]]) {
      ctx.save(); ctx.beginPath(); ctx.rect(x, 0, half, canvas.height); ctx.clip(); ctx.translate(x, 0);
      drawPane(which, half, canvas.height);
      ctx.restore();
    }
    ctx.fillStyle = "#5b8fd0"; ctx.fillRect(half - 1, 0, 2, canvas.height);
  } else {
    drawPane(S.mode === "result" && !S.comparing ? "after" : "before", canvas.width, canvas.height);
  }
  if (S.pointer && S.mode === "edit" && !S.space) {
    ctx.strokeStyle = S.tool === "brush" ? "#fff" : "#f66"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.arc(S.pointer[0], S.pointer[1], Math.max(1, S.brush / 2 * S.view.scale), 0, 2 * Math.PI); ctx.stroke();
  }
  $("zoom-value").textContent = `${Math.round(S.view.scale * 1000) / 10}%`;
}

function setMode(mode) {
  S.mode = mode;
  for (const [id, m] of [["view-edit", "edit"], ["view-result", "result"], ["view-side", "side"]]) $(id).classList.toggle("active", m === mode);
  draw();
}

// ------------------------------------------------------------------ input

function toCells(event) {
  const box = canvas.getBoundingClientRect();
  const vx = event.clientX - box.left, vy = event.clientY - box.top;
  return [(vx - S.view.ox) / S.view.scale / S.image.cell, (vy - S.view.oy) / S.view.scale / S.image.cell, vx, vy];
}

canvas.addEventListener("pointerdown", (e) => {
  if (!S.image) return;
  canvas.setPointerCapture(e.pointerId);
  if (S.space || e.button === 1 || S.mode !== "edit") {
    S.panning = [e.clientX, e.clientY, S.view.ox, S.view.oy];
  } else if (e.button === 0) {
    const [x, y] = toCells(e);
    beginEdit(); strokeTo(x, y);
  }
});
canvas.addEventListener("pointermove", (e) => {
  if (!S.image) return;
  const [x, y, vx, vy] = toCells(e);
  S.pointer = [vx, vy];
  if (S.panning) {
    S.view.ox = S.panning[2] + e.clientX - S.panning[0]; S.view.oy = S.panning[3] + e.clientY - S.panning[1];
  } else if (S.stroke) {
    for (const ev of e.getCoalescedEvents ? e.getCoalescedEvents() : [e]) { const [cx, cy] = toCells(ev); strokeTo(cx, cy); }
  }
  draw();
});
const endPointer = () => { S.panning = null; if (S.stroke) endEdit(); };
canvas.addEventListener("pointerup", endPointer);
canvas.addEventListener("pointercancel", endPointer);
canvas.addEventListener("pointerleave", () => { S.pointer = null; draw(); });
canvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  if (!S.image) return;
  const box = canvas.getBoundingClientRect();
  let vx = e.clientX - box.left;
  if (S.mode === "side" && vx > canvas.width / 2) vx -= Math.floor(canvas.width / 2);
  zoomAt(Math.pow(1.0015, -e.deltaY), vx, e.clientY - box.top);
}, { passive: false });

function setBrush(size) {
  S.brush = Math.max(1, Math.min(2000, Math.round(size)));
  $("brush-size").value = Math.round(Math.log(S.brush) / Math.log(2000) * 100);
  $("brush-size-value").textContent = ` ${S.brush} px`;
  draw();
}
$("brush-size").addEventListener("input", (e) => setBrush(Math.pow(2000, e.target.value / 100)));
function setTool(tool) {
  S.tool = tool;
  $("tool-brush").classList.toggle("active", tool === "brush");
  $("tool-eraser").classList.toggle("active", tool === "eraser");
}

document.addEventListener("keydown", (e) => {
  if (e.target.matches("input, textarea, select")) return;
  if (e.code === "Space") { S.space = true; canvas.style.cursor = "grab"; e.preventDefault(); }
  else if (e.key === "[") setBrush(S.brush / 1.25);
  else if (e.key === "]") setBrush(S.brush * 1.25 + 1);
  else if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") { e.shiftKey ? redo() : undo(); e.preventDefault(); }
  else if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "y") { redo(); e.preventDefault(); }
  else if (e.key === "b") setTool("brush");
  else if (e.key === "e") setTool("eraser");
  else if (e.key === "f") fit();
  else if (e.key === "1") zoom100();
});
document.addEventListener("keyup", (e) => { if (e.code === "Space") { S.space = false; canvas.style.cursor = ""; } });

const viewport = $("viewport");
viewport.addEventListener("dragover", (e) => { e.preventDefault(); viewport.classList.add("dragging"); });
viewport.addEventListener("dragleave", () => viewport.classList.remove("dragging"));
viewport.addEventListener("drop", (e) => {
  e.preventDefault(); viewport.classList.remove("dragging");
  openPicture(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) { e.preventDefault(); openPicture(file); }
});

$("open-file").addEventListener("change", (e) => { openPicture(e.target.files[0]); e.target.value = ""; });
$("mask-file").addEventListener("change", (e) => { loadMaskFile(e.target.files[0]); e.target.value = ""; });
$("save-mask").onclick = async () => {
  if (!S.image) return;
  await S.sending;
  const a = document.createElement("a");
  a.href = `/api/images/${S.image.id}/mask.png`; a.download = ""; a.click();
};
$("tool-brush").onclick = () => setTool("brush");
$("tool-eraser").onclick = () => setTool("eraser");
$("undo").onclick = undo;
$("redo").onclick = redo;
$("clear").onclick = clearMask;
$("fit").onclick = fit;
$("zoom-100").onclick = zoom100;
$("view-edit").onclick = () => setMode("edit");
$("view-result").onclick = () => setMode("result");
$("view-side").onclick = () => { setMode("side"); fit(); };
$("run-button").onclick = run;
$("show-plan").onchange = draw;
const compare = (on) => { S.comparing = on; draw(); drawCrop(); };
$("compare").addEventListener("pointerdown", () => compare(true));
for (const ev of ["pointerup", "pointerleave"]) $("compare").addEventListener(ev, () => S.comparing && compare(false));
window.addEventListener("resize", resize);

(async function start() {
  try {
    S.config = await apiJSON("/api/config");
    $("model-state").textContent = `model: ${S.config.model} (${S.config.model_state})`;
    buildSettings();
    setBrush(40);
    resize();
    await refreshHistory();
    poll();
    document.body.dataset.ready = "1";
  } catch (err) { fail(err); }
})();
