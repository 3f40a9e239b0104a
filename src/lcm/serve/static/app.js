// lcm serve: every change of a control sends one request over the WebSocket; the server keeps only the newest
// pending request per connection and answers each id once: "image", "dropped" or "error" (docs/serve.md).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null,
  nextId: 1,
  sentAt: new Map(), // id -> performance.now() when sent, for the round trip
  count: 0,
  dropped: 0,
  image: null, // img2img source as a PNG data: URL at the model's size
  imageSize: [32, 32],
  img2img: true,
  isLcm: false,
  configured: false,
  scheduled: false,
  retryMs: 250,
};
const SLIDERS = ["steps", "w", "seed", "batch", "strength", "negative_guidance", "gamma"];

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  state.ws = ws;
  ws.onopen = () => {
    state.retryMs = 250;
    setConnection("connected", "ok");
  };
  ws.onmessage = (event) => handle(JSON.parse(event.data));
  ws.onclose = () => {
    setConnection("disconnected, retrying…", "bad");
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 8000);
  };
}

function setConnection(text, kind) {
  const badge = $("connection");
  badge.textContent = text;
  badge.className = `badge ${kind}`;
}

function handle(msg) {
  if (msg.type === "ready") {
    configure(msg);
    schedule();
  } else if (msg.type === "image") {
    show(msg);
  } else if (msg.type === "dropped") {
    state.sentAt.delete(msg.id);
    $("dropped").textContent = String(++state.dropped);
  } else if (msg.type === "error") {
    state.sentAt.delete(msg.id);
    $("error").textContent = msg.message;
  }
}

function configure(info) {
  const limits = info.limits;
  $("steps").max = limits.max_steps;
  $("batch").max = limits.max_batch;
  $("w").max = Math.min(limits.max_w, 15);
  if (!state.configured) {
    $("steps").value = Math.min(info.defaults.steps, limits.max_steps);
    $("w").value = info.defaults.w;
    if (info.defaults.gamma !== undefined) $("gamma").value = info.defaults.gamma;
    state.configured = true;
  }
  // An LCM ignores the negative prompt unless negative guidance is above 0; it may also be sampled with TCD.
  state.isLcm = Boolean(info.is_lcm);
  $("lcm-only").hidden = !state.isLcm;
  $("negative").placeholder = state.isLcm ? "used with negative guidance > 0" : "what to steer away from";
  state.imageSize = info.image_size;
  const [h, w] = info.image_size;
  const name = info.model.replace(/\/+$/, "").split("/").pop();
  $("model").textContent = `${name} · ${info.sampler} sampler · ${w}×${h} · ${info.device} ${info.dtype}`;
  $("model").title = info.model;
  $("prompt").maxLength = limits.max_prompt_chars;
  $("negative").maxLength = limits.max_prompt_chars;
  state.img2img = info.img2img;
  if (!info.img2img) {
    $("drop-text").textContent = "img2img is not supported by this build";
    $("drop").classList.add("disabled");
  }
  SLIDERS.forEach(showValue);
}

function showValue(name) {
  $(`${name}-value`).textContent = $(name).value;
}

// Several events in one turn of the event loop (a paste, a slider jump) make one request.
function schedule() {
  if (state.scheduled) return;
  state.scheduled = true;
  setTimeout(sendNow, 0);
}

function sendNow() {
  state.scheduled = false;
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN || !state.configured) return;
  const id = state.nextId++;
  const request = {
    id,
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    steps: Number($("steps").value),
    w: Number($("w").value),
    seed: Number($("seed").value),
    batch: Number($("batch").value),
  };
  if (state.isLcm) {
    request.sampler = $("sampler").value;
    request.negative_guidance = Number($("negative_guidance").value);
    if (request.sampler === "tcd") request.gamma = Number($("gamma").value);
  }
  if (state.image) {
    request.image = state.image;
    request.strength = Number($("strength").value);
  }
  state.sentAt.set(id, performance.now());
  ws.send(JSON.stringify(request));
}

function show(msg) {
  const sent = state.sentAt.get(msg.id);
  for (const id of state.sentAt.keys()) if (id <= msg.id) state.sentAt.delete(id);
  const box = $("images");
  while (box.children.length < msg.images.length) {
    const img = document.createElement("img");
    img.className = "result";
    img.alt = "generated image";
    box.appendChild(img);
  }
  while (box.children.length > msg.images.length) box.lastElementChild.remove();
  box.classList.toggle("many", msg.images.length > 1);
  msg.images.forEach((src, i) => (box.children[i].src = src));
  $("count").textContent = String(++state.count);
  $("server-ms").textContent = msg.ms.toFixed(1);
  if (sent !== undefined) $("rtt-ms").textContent = (performance.now() - sent).toFixed(1);
  $("error").textContent = "";
}

// img2img: the dropped image is resized to the model's size here, so each request carries a few hundred bytes.
function useImage(file) {
  if (!file || !state.img2img) return;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    const [h, w] = state.imageSize;
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").drawImage(img, 0, 0, w, h);
    URL.revokeObjectURL(url);
    state.image = canvas.toDataURL("image/png");
    $("source").src = state.image;
    $("source").hidden = false;
    $("clear-image").hidden = false;
    $("strength").disabled = false;
    schedule();
  };
  img.onerror = () => {
    URL.revokeObjectURL(url);
    $("error").textContent = `${file.name} is not an image this browser can read`;
  };
  img.src = url;
}

function clearImage() {
  state.image = null;
  $("source").hidden = true;
  $("clear-image").hidden = true;
  $("strength").disabled = true;
  schedule();
}

function wire() {
  $("prompt").addEventListener("input", schedule);
  $("negative").addEventListener("input", schedule);
  $("sampler").addEventListener("change", () => {
    $("gamma").disabled = $("sampler").value !== "tcd";
    schedule();
  });
  SLIDERS.forEach((name) =>
    $(name).addEventListener("input", () => {
      showValue(name);
      schedule();
    }),
  );
  $("random-seed").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * (Number($("seed").max) + 1));
    showValue("seed");
    schedule();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useImage(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => useImage(e.target.files[0]));
  $("clear-image").addEventListener("click", clearImage);
  SLIDERS.forEach(showValue);
}

wire();
connect();
