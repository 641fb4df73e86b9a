// The iterwego serve page: send the album to /api/order and draw the recovered order.
// Plain browser JavaScript, no libraries; everything talks to this server only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { limits: null, modalities: [], result: null, thumbs: new Map(), previews: [] };

const VARIANTS = [
  ["fused", "Fused"],
  ["guided", "Guided"],
  ["image_only", "Images only"],
  ["text_only", "Sentences only"],
];

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function mb(bytes) {
  if (bytes < 1048576) return Math.max(1, Math.round(bytes / 1024)) + " KB";
  return (bytes / 1048576).toFixed(1) + " MB";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function sentences() {
  return $("sentences").value.split(/\r?\n/).map((s) => s.trim()).filter((s) => s.length > 0);
}

async function loadInfo() {
  try {
    const r = await fetch("api/info");
    const info = await r.json();
    state.limits = info.limits;
    state.modalities = info.modalities;
    if (info.capture_time) $("capture-time").value = info.capture_time;
    const mods = info.modalities.map((m) => (m === "image" ? "images" : "sentences")).join(" and ");
    $("run-info").textContent = `Run ${info.run || "(unnamed)"}: orders ${mods}` +
      (info.aligner ? ", aligns images with sentences" : "") + ` (iterwego ${info.version}).`;
    state.fusion = info.fusion;
    const L = info.limits;
    $("exact-option").textContent = `exact (beam above ${L.max_exact} items)`;
    $("limits").textContent = `Up to ${L.max_items} images and ${L.max_items} sentences per request, ${mb(L.max_body_bytes)} in all. ` +
      `Up to ${L.max_exact} items are ordered exactly; larger sets use beam search. ` +
      "With different numbers of images and sentences, each is ordered on its own.";
  } catch (err) {
    $("run-info").textContent = "Could not reach the iterwego server.";
  }
}

function onFilesChosen() {
  for (const u of state.previews) URL.revokeObjectURL(u);
  state.previews = [];
  const files = Array.from($("images").files);
  const box = $("preview");
  box.replaceChildren();
  for (const f of files.slice(0, 64)) {
    const u = URL.createObjectURL(f);
    state.previews.push(u);
    box.append(el("img", { src: u, alt: f.name, title: f.name }));
  }
  const size = files.reduce((a, f) => a + f.size, 0);
  $("image-count").textContent = files.length ? `${files.length} image${files.length > 1 ? "s" : ""} chosen (${mb(size)}).` : "No images chosen.";
}

function onSentencesChanged() {
  const n = sentences().length;
  $("sentence-count").textContent = n ? `${n} sentence${n > 1 ? "s" : ""}.` : "No sentences.";
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(new Error(`${file.name}: cannot read the file`));
    fr.readAsDataURL(file);
  });
}

async function order() {
  const t0 = performance.now();
  const files = Array.from($("images").files);
  const sents = sentences();
  showError("");
  const L = state.limits;
  if (L) {
    if (files.length > L.max_items || sents.length > L.max_items) {
      showError(`Too many items: ${files.length} images and ${sents.length} sentences; the server orders at most ${L.max_items} of each ` +
        `(exact decoding up to ${L.max_exact} items, beam search above).`);
      return;
    }
    const size = files.reduce((a, f) => a + f.size, 0) * 4 / 3;
    if (size > L.max_body_bytes) {
      showError(`The images are too large together (${mb(size)} once encoded; the limit is ${mb(L.max_body_bytes)}). Send fewer or smaller images.`);
      return;
    }
  }
  const button = $("order");
  button.disabled = true;
  $("status").textContent = "Ordering…";
  try {
    const images = await Promise.all(files.map(async (f) => ({ name: f.name, data: await readAsDataURL(f) })));
    const r = await fetch("api/order", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ images, sentences: sents, decoder: $("decoder").value, capture_time: $("capture-time").value }),
    });
    let answer;
    try { answer = await r.json(); } catch (e) { answer = { error: `the server answered ${r.status} without JSON` }; }
    if (!r.ok) {
      $("result").hidden = true;
      showError(answer.error || `the server answered ${r.status}`);
      $("status").textContent = "";
      return;
    }
    render(answer);
    const ms = performance.now() - t0;
    document.body.dataset.orderMs = ms.toFixed(1);
    $("status").textContent = `Ordered ${files.length} image(s) and ${sents.length} sentence(s) in ${(ms / 1000).toFixed(2)} s.`;
  } catch (err) {
    $("result").hidden = true;
    showError(`Could not order: ${err.message}. Is the server still running? Requests are limited to ${L ? mb(L.max_body_bytes) : "50 MB"}.`);
    $("status").textContent = "";
  } finally {
    button.disabled = false;
  }
}

function defaultVariant(res) {
  if (res.mode === "fused") return "fused";
  return res.variants.image_only ? "image_only" : "text_only";
}

function render(answer) {
  const res = answer.result;
  state.result = res;
  state.thumbs = new Map(answer.thumbnails.map((t) => [t.index, t]));
  const notes = $("notes");
  notes.replaceChildren();
  for (const n of [res.note, captureNote(res), ...(answer.notes || [])]) if (n) notes.append(el("p", { text: n }));

  const fs = $("variants");
  fs.replaceChildren(el("legend", { text: "Show the order from" }));
  const pick = defaultVariant(res);
  for (const [key, label] of VARIANTS) {
    if (!res.variants[key]) continue;
    const input = el("input", { type: "radio", name: "variant", id: `variant-${key}`, value: key });
    input.checked = key === pick;
    input.addEventListener("change", () => drawVariant(key));
    fs.append(el("label", { for: `variant-${key}` }, input, " " + label));
  }
  $("result").hidden = false;
  drawVariant(pick);
}

// Which photos their capture time placed (EXIF DateTimeOriginal of photos from one camera), as iterwego order prints it.
function captureNote(res) {
  const ct = res.capture_time;
  if (!ct || ct.mode === "off") return null;
  const timed = ct.photos.map((p, k) => [p, k]).filter(([p]) => p.placed_by === "capture time");
  if (!timed.length) {
    const n = ct.photos.filter((p) => p.time).length;
    return `Capture times: ${n} of ${ct.photos.length} photos carry one; the model placed every photo.`;
  }
  return `Capture times: ${timed.length} of ${ct.photos.length} photos placed by their capture time (` +
    timed.map(([p, k]) => `${res.images[k]} ${when(p)}`).join(", ") + "); the model placed the others.";
}

function when(photo) {
  return photo.time.replace("T", " ");
}

// sentence paired with each image by the aligner (one-to-one), when images and sentences were aligned
function pairing(res) {
  if (!res.pairing) return null;
  const i2t = new Map(), t2i = new Map();
  for (const [i, t] of res.pairing) { i2t.set(i, t); if (t >= 0) t2i.set(t, i); }
  return { i2t, t2i };
}

function drawVariant(key) {
  const res = state.result, v = res.variants[key], pr = pairing(res);
  let rows = [], conf = [], conf2 = null, help = "";
  if (key === "fused") {
    rows = v.image_order.map((i, k) => ({ image: i, sentence: v.sentence_order[k] }));
    conf = v.confidence;
    help = (state.fusion === "sum"
      ? "Images and sentences ordered together on both orderers' summed pair scores"
      : "One order from the fused orderer, which reads each image together with the sentence the aligner paired " +
        "with it") + "; under each image is that paired sentence.";
  } else if (key === "guided") {
    rows = v.image_order.map((i, k) => ({ image: i, sentence: v.sentence_order[k] }));
    conf = v.image_confidence;
    conf2 = v.sentence_confidence;
    help = `Each modality ordered with guidance from the other (rounds: images ${v.rounds.image}, sentences ${v.rounds.text}); ` +
      "sentence k of the guided sentence order is shown under image k. Steps show P for images, then for sentences.";
  } else if (key === "image_only") {
    rows = v.order.map((i) => ({ image: i, sentence: pr ? pr.i2t.get(i) : undefined }));
    conf = v.confidence;
    help = "Images ordered on their own" + (pr ? "; under each image is the sentence the aligner paired with it." : ".");
  } else {
    rows = v.order.map((t) => ({ image: pr ? pr.t2i.get(t) : undefined, sentence: t }));
    conf = v.confidence;
    help = "Sentences ordered on their own" + (pr ? "; above each sentence is the image the aligner paired with it." : ".");
  }
  $("variant-help").textContent = help;
  const strip = $("strip");
  strip.replaceChildren();
  rows.forEach((row, k) => {
    if (k > 0) strip.append(step(conf[k - 1], conf2 ? conf2[k - 1] : null));
    strip.append(card(row, k, key === "text_only"));
  });
  document.body.dataset.variant = key;
}

function card(row, k, textOnly) {
  const res = state.result;
  const data = {};
  const li = el("li", { class: "card" + (textOnly && row.image === undefined ? " text-only" : "") }, el("span", { class: "pos", text: `${k + 1}` }));
  if (row.image !== undefined && row.image !== null) {
    data.imageIndex = String(row.image);
    const t = state.thumbs.get(row.image);
    const img = el("img", { src: t ? t.src : "", alt: res.images[row.image] });
    img.addEventListener("load", () => { if (img.naturalWidth < 96) img.classList.add("small"); });
    li.append(img, el("span", { class: "name", text: res.images[row.image] }));
    // the sentence-only order is not bound by capture times, so its paired photos carry no mark
    const photo = !textOnly && res.capture_time && res.capture_time.used ? res.capture_time.photos[row.image] : null;
    if (photo) {
      const byTime = photo.placed_by === "capture time";
      data.placedBy = byTime ? "time" : "model";
      li.append(el("span", { class: "placed" + (byTime ? " by-time" : ""),
        text: byTime ? `taken ${when(photo)}, placed by capture time` : "placed by the model" }));
    }
  }
  if (row.sentence !== undefined && row.sentence !== null && row.sentence >= 0) {
    data.sentenceIndex = String(row.sentence);
    li.append(el("span", { class: "sentence", text: res.sentences[row.sentence] }));
  }
  Object.assign(li.dataset, data);
  return li;
}

function step(p, p2) {
  const level = p >= 0.75 ? "hi" : p >= 0.55 ? "mid" : "lo";
  const bar = el("i");
  bar.style.width = `${Math.round(p * 100)}%`;
  const s = el("li", { class: `step ${level}`, title: "probability that the left item comes before the right one" },
    el("span", { class: "arrow", text: "→" }), el("span", { class: "p", text: p.toFixed(2) }), el("span", { class: "bar" }, bar));
  if (p2 != null) s.append(el("span", { class: "p2", text: `text ${p2.toFixed(2)}` }));
  return s;
}

function download() {
  if (!state.result) return;
  const blob = new Blob([JSON.stringify(state.result, null, 2) + "\n"], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: "iterwego-order.json" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function clearAll() {
  $("images").value = "";
  $("sentences").value = "";
  onFilesChosen();
  onSentencesChanged();
  showError("");
  $("result").hidden = true;
  $("status").textContent = "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("images").addEventListener("change", onFilesChosen);
  $("sentences").addEventListener("input", onSentencesChanged);
  $("order").addEventListener("click", order);
  $("clear").addEventListener("click", clearAll);
  $("download").addEventListener("click", download);
  onFilesChosen();
  onSentencesChanged();
  loadInfo();
});
