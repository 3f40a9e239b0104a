// lcm serve: every change of a control sends one request over the WebSocket; the server keeps only the newest
// pending request per connection and answers each id once: "image", "dropped" or "error" (docs/serve.md).
// The init image comes from a file (with an optional inpainting mask painted over it), the camera or a sketch;
// the last two stream: a new frame leaves as soon as the previous one was answered, never two at once.
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
  source: "file", // where the init image comes from: "file" (state.image, maybe none), "camera" or "draw"
  masked: false, // a mask has been painted over the file's image
  maskUrl: null, // the mask as a black (keep) / white (repaint) PNG data: URL at the model's size, cached
  strengthTouched: false, // the user moved the strength slider
  strengthBeforeMask: null, // the strength to restore when a mask that set it to 1 is cleared
  camera: null, // the MediaStream while the camera runs
  sketchDirty: false, // the sketch or a setting changed since the last frame left
  frameId: null, // the streamed frame awaiting its answer (at most one)
  lastFrameAt: -Infinity,
  minFrameMs: 0, // frames are spaced to stay within the server's rate limit
  pumpTimer: null,
  arrivals: [], // performance.now() of each image over the last FPS_WINDOW_MS
  fpsSince: null,
};
const SLIDERS = ["steps", "w", "seed", "batch", "strength", "negative_guidance", "gamma", "brush"];
const FPS_WINDOW_MS = 2000;
const STAGE_PX = 256; // canvases are drawn at least this many pixels a side, then resized to the model's size

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
    state.frameId = null; // its answer will never come
    state.sentAt.clear();
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
    frameAnswered(msg.id, 0);
  } else if (msg.type === "error") {
    state.sentAt.delete(msg.id);
    $("error").textContent = msg.message;
    frameAnswered(msg.id, 500); // a stream that keeps failing retries twice a second, not as fast as it can
  }
}

function configure(info) {
  const limits = info.limits;
  $("steps").max = limits.max_steps;
  $("batch").max = limits.max_batch;
  $("w").max = Math.min(limits.max_w, 15);
  state.minFrameMs = 1000 / limits.rate;
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
  const [h, w] = info.image_size;
  if (h !== state.imageSize[0] || w !== state.imageSize[1]) sizeCanvases(h, w);
  const name = info.model.replace(/\/+$/, "").split("/").pop();
  state.modelLine = `${name} · ${info.sampler} sampler · ${w}×${h} · ${info.device} ${info.dtype}`;
  showCompile(info.compile);
  $("model").title = info.model;
  $("prompt").maxLength = limits.max_prompt_chars;
  $("negative").maxLength = limits.max_prompt_chars;
  state.img2img = info.img2img;
  if (!info.img2img) {
    $("drop-text").textContent = "img2img is not supported by this build";
    $("drop").classList.add("disabled");
    $("camera").disabled = $("draw").disabled = true;
  }
  SLIDERS.forEach(showValue);
}

// The mask and the sketch are drawn at a multiple of the model's size (smooth strokes), and resized to it to send.
function sizeCanvases(h, w) {
  state.imageSize = [h, w];
  const k = Math.max(1, Math.ceil(STAGE_PX / Math.max(h, w)));
  for (const id of ["mask", "sketch"]) {
    $(id).width = w * k;
    $(id).height = h * k;
  }
  $("stage").style.aspectRatio = `${w} / ${h}`;
  $("brush").max = Math.max(2, Math.round(Math.max(h, w) / 4)); // in the model's pixels
  $("brush").value = Math.max(1, Math.round(Math.max(h, w) / 10));
  clearMask(false);
  clearSketch(false);
}

function showValue(name) {
  $(`${name}-value`).textContent = $(name).value;
}

// Several events in one turn of the event loop (a paste, a slider jump) make one request; while streaming, the
// next frame carries the change instead.
function schedule() {
  state.sketchDirty = true;
  if (state.scheduled) return;
  state.scheduled = true;
  setTimeout(() => {
    state.scheduled = false;
    if (streaming()) pump();
    else sendNow();
  }, 0);
}

function streaming() {
  return state.source === "camera" || state.source === "draw";
}

function sendNow() {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN || !state.configured) return null;
  const image = initImage();
  if (streaming() && !image) return null; // the camera has no frame yet
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
  if (image) {
    request.image = image;
    request.strength = Number($("strength").value);
    if (state.source === "file" && state.masked) request.mask = maskImage();
  }
  state.sentAt.set(id, performance.now());
  ws.send(JSON.stringify(request));
  return id;
}

function initImage() {
  if (state.source === "camera") return cameraFrame();
  if (state.source === "draw") return toModelSize($("sketch")).toDataURL("image/png");
  return state.image;
}

// --- streaming: one frame in flight; the next leaves when it is answered (image, dropped or error) ---------------

function pump() {
  if (!streaming() || state.frameId !== null || state.pumpTimer !== null) return;
  if (state.source === "draw" && !state.sketchDirty) return; // nothing new to send
  const wait = state.lastFrameAt + state.minFrameMs - performance.now();
  if (wait > 0) {
    pumpLater(wait); // within the server's rate limit
    return;
  }
  const id = sendNow();
  if (id === null) {
    if (state.source === "camera") pumpLater(50); // no video frame yet
    return;
  }
  state.frameId = id;
  state.lastFrameAt = performance.now();
  state.sketchDirty = false;
}

function frameAnswered(id, delayMs) {
  if (state.frameId === null || id === null || id < state.frameId) return;
  state.frameId = null;
  if (delayMs > 0) pumpLater(delayMs);
  else pump();
}

function pumpLater(ms) {
  if (state.pumpTimer !== null) return;
  state.pumpTimer = setTimeout(() => {
    state.pumpTimer = null;
    pump();
  }, ms);
}

function setSource(source) {
  if (state.source === "camera" && source !== "camera") stopCamera();
  state.source = source;
  document.body.dataset.source = source;
  $("camera").textContent = source === "camera" ? "stop camera" : "camera";
  $("draw").textContent = source === "draw" ? "stop drawing" : "draw";
  $("camera").setAttribute("aria-pressed", String(source === "camera"));
  $("draw").setAttribute("aria-pressed", String(source === "draw"));
  const file = source === "file" && state.image !== null;
  $("init").hidden = !(file || streaming());
  $("source").hidden = $("mask").hidden = !file;
  $("video").hidden = source !== "camera";
  $("sketch").hidden = source !== "draw";
  $("brush-tools").hidden = !(file || source === "draw");
  $("clear-mask").hidden = !file;
  $("pen-tools").hidden = source !== "draw";
  $("brush-hint").textContent =
    source === "draw" ? "Sketch: every stroke is sent as the init image." : "Paint over the image what to repaint.";
  $("clear-image").hidden = state.image === null;
  $("strength").disabled = !(file || streaming());
  autoStrength();
  state.arrivals = [];
  state.fpsSince = streaming() ? performance.now() : null;
  schedule();
}

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    $("error").textContent = "this browser offers no camera here (it needs localhost or https)";
    return;
  }
  let stream;
  $("camera").disabled = true; // one request for the camera at a time: a second stream would never be stopped
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 } }, audio: false });
  } catch (err) {
    $("error").textContent = `camera: ${err.message || err.name}`;
    return;
  } finally {
    $("camera").disabled = false;
  }
  state.camera = stream;
  document.body.dataset.camera = "on";
  const video = $("video");
  video.srcObject = stream;
  video.onloadeddata = () => pump();
  setSource("camera");
  try {
    await video.play();
  } catch (err) {
    $("error").textContent = `camera: ${err.message || err.name}`;
  }
}

// Stopping releases the device (its light goes off): every track is stopped.
function stopCamera() {
  if (state.camera) state.camera.getTracks().forEach((track) => track.stop());
  state.camera = null;
  $("video").srcObject = null;
  document.body.dataset.camera = "off";
}

// The video's centre, cropped to the model's aspect ratio and drawn at its size, as a PNG; null before a frame.
function cameraFrame() {
  const video = $("video");
  if (!state.camera || video.readyState < 2 || !video.videoWidth) return null;
  const [h, w] = state.imageSize;
  const canvas = modelCanvas();
  const scale = Math.min(video.videoWidth / w, video.videoHeight / h);
  const [sw, sh] = [w * scale, h * scale];
  const ctx = canvas.getContext("2d");
  ctx.drawImage(video, (video.videoWidth - sw) / 2, (video.videoHeight - sh) / 2, sw, sh, 0, 0, w, h);
  return canvas.toDataURL("image/png");
}

let scratch = null;
function modelCanvas() {
  const [h, w] = state.imageSize;
  if (!scratch) {
    scratch = document.createElement("canvas");
    scratch.getContext("2d", { willReadFrequently: true }); // the mask's pixels are read back on the CPU
  }
  if (scratch.width !== w || scratch.height !== h) [scratch.width, scratch.height] = [w, h];
  return scratch;
}

function toModelSize(canvas) {
  const out = modelCanvas();
  const ctx = out.getContext("2d");
  ctx.clearRect(0, 0, out.width, out.height);
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(canvas, 0, 0, out.width, out.height);
  return out;
}

// --- painting: the inpainting mask over a file's image, and the sketch ------------------------------------------

function paintable(canvas, colour, changed) {
  let last = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [((e.clientX - r.left) * canvas.width) / r.width, ((e.clientY - r.top) * canvas.height) / r.height];
  };
  const stroke = (from, to) => {
    const ctx = canvas.getContext("2d");
    ctx.strokeStyle = ctx.fillStyle = colour();
    ctx.lineWidth = (Number($("brush").value) * canvas.width) / state.imageSize[1];
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (from === to) {
      ctx.arc(to[0], to[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(from[0], from[1]);
      ctx.lineTo(to[0], to[1]);
      ctx.stroke();
    }
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    e.preventDefault();
    try {
      canvas.setPointerCapture(e.pointerId);
    } catch (_) {
      // a synthetic pointer cannot be captured; the stroke still works while it stays over the canvas
    }
    last = at(e);
    stroke(last, last);
    changed();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (last === null) return;
    const point = at(e);
    stroke(last, point);
    last = point;
    changed();
  });
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
    canvas.addEventListener(type, () => (last = null));
  }
}

function maskChanged() {
  if (!state.masked && !state.strengthTouched) state.strengthBeforeMask = $("strength").value;
  state.masked = true;
  state.maskUrl = null;
  autoStrength();
  schedule();
}

// Inpainting's usual default strength is 1 (the painted region from pure noise): while a mask is in use and the
// user has not moved the slider, it is 1, and back to what it was otherwise.
function autoStrength() {
  if (state.strengthTouched || state.strengthBeforeMask === null) return;
  $("strength").value = state.source === "file" && state.masked ? 1 : state.strengthBeforeMask;
  showValue("strength");
}

// Painted pixels (any colour, over half opaque) → white = repaint, the rest black = keep, at the model's size.
function maskImage() {
  if (state.maskUrl) return state.maskUrl;
  const out = toModelSize($("mask"));
  const ctx = out.getContext("2d");
  const pixels = ctx.getImageData(0, 0, out.width, out.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i + 3] >= 128 ? 255 : 0;
    d[i] = d[i + 1] = d[i + 2] = v;
    d[i + 3] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
  state.maskUrl = out.toDataURL("image/png");
  return state.maskUrl;
}

function clearMask(send = true) {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.masked = false;
  state.maskUrl = null;
  autoStrength();
  state.strengthBeforeMask = null;
  if (send) schedule();
}

function clearSketch(send = true) {
  const canvas = $("sketch");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = $("paper").value;
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (send) schedule();
}

// --- replies ------------------------------------------------------------------------------------------------------

// "--compile on" on a CPU: eager while another process compiles, then compiled; every reply says which ran.
const COMPILE_NOTES = {
  building: " · compiling in the background (eager until then)",
  on: " · compiled",
  failed: " · eager (the compile failed)",
};

function showCompile(status) {
  state.compile = status;
  $("model").textContent = state.modelLine + (COMPILE_NOTES[status] || "");
  document.body.dataset.compile = status || "off";
}

function show(msg) {
  if (msg.compile !== undefined && msg.compile !== state.compile) showCompile(msg.compile);
  const now = performance.now();
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
  // what the shown image was made from, for scripts and tests
  box.dataset.id = String(msg.id);
  box.dataset.img2img = String(Boolean(msg.img2img));
  box.dataset.inpaint = String(Boolean(msg.inpaint));
  $("count").textContent = String(++state.count);
  $("server-ms").textContent = msg.ms.toFixed(1);
  if (sent !== undefined) $("rtt-ms").textContent = (now - sent).toFixed(1);
  $("error").textContent = "";
  state.arrivals.push(now);
  if (state.fpsSince === null) state.fpsSince = now;
  if (msg.id === state.frameId && sent !== undefined) $("frame-ms").textContent = (now - sent).toFixed(1);
  showFps();
  frameAnswered(msg.id, 0);
}

// Images answered per second over the last two seconds (or since the stream started, when that is more recent).
function showFps() {
  if (state.fpsSince === null) return;
  const now = performance.now();
  while (state.arrivals.length && state.arrivals[0] < now - FPS_WINDOW_MS) state.arrivals.shift();
  const span = Math.min(FPS_WINDOW_MS, now - state.fpsSince);
  if (span < 250 && state.arrivals.length < 2) return; // too early to say
  $("fps").textContent = ((state.arrivals.length * 1000) / Math.max(span, 1)).toFixed(1);
}

// --- the file's image ---------------------------------------------------------------------------------------------

// img2img: the dropped image is resized to the model's size here, so each request carries a few hundred bytes.
function useImage(file) {
  if (!file || !state.img2img) return;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    const canvas = modelCanvas();
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    URL.revokeObjectURL(url);
    state.image = canvas.toDataURL("image/png");
    $("source").src = state.image;
    clearMask(false);
    setSource("file");
  };
  img.onerror = () => {
    URL.revokeObjectURL(url);
    $("error").textContent = `${file.name} is not an image this browser can read`;
  };
  img.src = url;
}

function clearImage() {
  state.image = null;
  clearMask(false);
  setSource("file");
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
      if (name === "strength") state.strengthTouched = true;
      if (name !== "brush") schedule();
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
  $("camera").addEventListener("click", () => (state.source === "camera" ? setSource("file") : startCamera()));
  $("draw").addEventListener("click", () => setSource(state.source === "draw" ? "file" : "draw"));
  $("clear-mask").addEventListener("click", () => clearMask());
  $("clear-sketch").addEventListener("click", () => clearSketch());
  $("paper").addEventListener("change", () => clearSketch());
  paintable($("mask"), () => "#ff3b6b", maskChanged);
  paintable($("sketch"), () => $("pen").value, schedule);
  window.addEventListener("pagehide", stopCamera);
  setInterval(showFps, 250);
  document.body.dataset.source = "file";
  document.body.dataset.camera = "off";
  sizeCanvases(...state.imageSize);
  SLIDERS.forEach(showValue);
}

wire();
connect();
