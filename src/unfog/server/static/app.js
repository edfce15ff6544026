// unfog's page: a thin client of the same /sdapi/v1 routes every A1111 client uses.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "/sdapi/v1";
const SAVED = "unfog.settings";  // form values kept across reloads (localStorage)
let mode = "txt2img";
let results = [];  // [{src, info, seed}] of the last run
let selected = 0;
let maskPainted = false;

async function call(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(API + path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error((data && (data.errors || data.detail)) || `${response.status} ${response.statusText}`);
  return data;
}

async function fetchJSON(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function fillSelect(select, names, current) {
  select.replaceChildren(...names.map((n) => new Option(n, n)));
  if (current !== undefined && names.includes(current)) select.value = current;
}

// ------------------------------------------------------------------ settings kept across reloads

function fields() { return [...$("form").querySelectorAll("input[name], select[name], textarea[name]")]; }

function saveSettings() {
  const values = {};
  for (const el of fields()) values[el.name] = el.type === "checkbox" ? el.checked : el.value;
  localStorage.setItem(SAVED, JSON.stringify(values));
}

function restoreSettings() {
  const values = JSON.parse(localStorage.getItem(SAVED) || "{}");
  for (const el of fields()) {
    if (!(el.name in values)) continue;
    if (el.type === "checkbox") el.checked = values[el.name]; else el.value = values[el.name];
  }
}

// ------------------------------------------------------------------ lists from the server

async function loadLists() {
  const [models, options, samplers, schedulers, loras, upscalers, latent, controlnets, modules] = await Promise.all([
    call("/sd-models"), call("/options"), call("/samplers"), call("/schedulers"), call("/loras"),
    call("/upscalers"), call("/latent-upscale-modes"), fetchJSON("/controlnet/model_list"),
    fetchJSON("/controlnet/module_list")]);
  fillSelect($("cn_model"), controlnets.model_list);
  fillSelect($("cn_module"), modules.module_list, "none");
  $("controlnet-box").hidden = controlnets.model_list.length === 0;
  fillSelect($("model"), models.map((m) => m.title));
  const current = models.find((m) => m.title === options.sd_model_checkpoint ||
                                     m.title.startsWith(options.sd_model_checkpoint));
  if (current) $("model").value = current.title;
  fillSelect($("sampler_name"), samplers.map((s) => s.name), "Euler a");
  fillSelect($("scheduler"), schedulers.map((s) => s.label), "Automatic");
  fillSelect($("lora"), loras.map((l) => l.name));
  $("insert-lora").disabled = loras.length === 0;
  fillSelect($("hr_upscaler"), [...latent.map((m) => m.name), ...upscalers.map((u) => u.name)], "Latent");
}

// ------------------------------------------------------------------ generation

function number(id) { return Number($(id).value); }

function payload() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
    steps: number("steps"), cfg_scale: number("cfg_scale"), width: number("width"), height: number("height"),
    seed: number("seed"), n_iter: number("n_iter"), batch_size: number("batch_size"),
  };
  if (mode === "txt2img" && $("enable_hr").checked) {
    Object.assign(body, { enable_hr: true, hr_upscaler: $("hr_upscaler").value, hr_scale: number("hr_scale"),
                          hr_second_pass_steps: number("hr_second_pass_steps"),
                          denoising_strength: number("hr_denoising_strength") });
  }
  if ($("cn_enabled").checked && !$("controlnet-box").hidden) {
    if (!controlData) throw new Error("choose a control image for the ControlNet unit");
    body.alwayson_scripts = { controlnet: { args: [{
      image: controlData, module: $("cn_module").value, model: $("cn_model").value, weight: number("cn_weight"),
      guidance_start: number("cn_start"), guidance_end: number("cn_end"), control_mode: $("cn_mode").value,
      resize_mode: "Crop and Resize" }] } };
  }
  if (mode === "img2img") {
    if (!initImage) throw new Error("choose an init image first (or send one from the gallery)");
    Object.assign(body, { init_images: [initData], denoising_strength: number("denoising_strength") });
    if (maskPainted) {
      Object.assign(body, { mask: maskDataURL(), mask_blur: number("mask_blur"),
                            inpainting_fill: number("inpainting_fill"),
                            inpaint_full_res: $("inpaint_full_res").value === "1",
                            inpaint_full_res_padding: number("inpaint_full_res_padding") });
    }
  }
  return body;
}

async function generate(event) {
  if (event) event.preventDefault();
  if ($("generate").disabled) return;
  $("error").textContent = "";
  let body;
  try { body = payload(); } catch (err) { $("error").textContent = err.message; return; }
  saveSettings();
  $("generate").disabled = true;
  $("progress").value = 0;
  $("status").textContent = "Generating…";
  const polling = setInterval(pollProgress, 250);
  try {
    const r = await call(mode === "txt2img" ? "/txt2img" : "/img2img", body);
    const info = JSON.parse(r.info);
    results = r.images.map((b64, i) => ({ src: "data:image/png;base64," + b64, info: info.infotexts[i],
                                          seed: info.all_seeds[i] }));
    showGallery();
    $("status").textContent = `${results.length} image${results.length === 1 ? "" : "s"}`;
  } catch (err) {
    $("error").textContent = err.message;
    $("status").textContent = "";
  } finally {
    clearInterval(polling);
    $("progress").value = 1;
    $("eta").textContent = "";
    $("preview").hidden = true;
    $("generate").disabled = false;
  }
}

async function pollProgress() {
  try {
    const p = await call("/progress");
    if (p.state.job_count === 0) return;
    $("progress").value = p.progress;
    $("eta").textContent = `${Math.round(p.progress * 100)}%, ${p.eta_relative.toFixed(1)} s left`;
    if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
  } catch (err) { /* the next poll tries again */ }
}

function showGallery() {
  $("gallery").replaceChildren(...results.map((r, i) => {
    const img = new Image();
    img.src = r.src;
    img.alt = `Result ${i + 1}, seed ${r.seed}`;
    img.setAttribute("role", "listitem");
    img.addEventListener("click", () => select(i));
    return img;
  }));
  select(0);
}

function select(i) {
  selected = i;
  [...$("gallery").children].forEach((img, k) => img.setAttribute("aria-selected", String(k === i)));
  const r = results[i];
  $("info").textContent = r ? r.info : "";
  $("download").hidden = !r;
  if (r) { $("download").href = r.src; $("download").download = `unfog-${r.seed}.png`; }
  $("send-img2img").disabled = $("send-inpaint").disabled = !r;
}

// ------------------------------------------------------------------ img2img and the mask brush

let controlData = null;  // the ControlNet unit's hint, as a data URL
let initImage = null;
let initData = null;

function setInitImage(src) {
  const img = new Image();
  img.onload = () => {
    initImage = img;
    for (const c of [$("init-canvas"), $("mask-canvas")]) { c.width = img.width; c.height = img.height; }
    $("init-canvas").getContext("2d").drawImage(img, 0, 0);
    initData = $("init-canvas").toDataURL("image/png");  // what the API takes (a file's blob: URL is not)
    clearMask();
    $("width").value = img.width;
    $("height").value = img.height;
  };
  img.src = src;
}

function clearMask() {
  $("mask-canvas").getContext("2d").clearRect(0, 0, $("mask-canvas").width, $("mask-canvas").height);
  maskPainted = false;
}

function maskDataURL() {
  const c = document.createElement("canvas");
  c.width = $("mask-canvas").width;
  c.height = $("mask-canvas").height;
  const painted = $("mask-canvas").getContext("2d").getImageData(0, 0, c.width, c.height);
  const out = new ImageData(c.width, c.height);
  for (let i = 0; i < out.data.length; i += 4) {  // painted (any alpha) -> white, the rest black, opaque
    const v = painted.data[i + 3] > 0 ? 255 : 0;
    out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
    out.data[i + 3] = 255;
  }
  c.getContext("2d").putImageData(out, 0, 0);
  return c.toDataURL("image/png");
}

function paintAt(event) {
  const c = $("mask-canvas");
  const box = c.getBoundingClientRect();
  const x = (event.clientX - box.left) * c.width / box.width;
  const y = (event.clientY - box.top) * c.height / box.height;
  const g = c.getContext("2d");
  g.fillStyle = "#e0218a";  // shown over the image; sent as white (maskDataURL)
  g.beginPath();
  g.arc(x, y, number("brush") * c.width / box.width / 2, 0, 2 * Math.PI);
  g.fill();
  maskPainted = true;
}

function sendTo(target) {
  const r = results[selected];
  if (!r) return;
  setMode("img2img");
  setInitImage(r.src);
  if (target === "inpaint") $("status").textContent = "Paint the area to repaint, then Generate";
}

// ------------------------------------------------------------------ PNG info

async function readPng(file) {
  const src = await new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.onerror = fail;
    reader.readAsDataURL(file);
  });
  try {
    const r = await call("/png-info", { image: src });
    $("pnginfo-text").textContent = r.info || "(this image carries no generation parameters)";
    pngParameters = r.info ? r.parameters : null;
    $("pnginfo-send").disabled = !pngParameters;
  } catch (err) { $("pnginfo-text").textContent = err.message; }
}

let pngParameters = null;

function sendParameters() {
  const p = pngParameters;
  if (!p) return;
  $("prompt").value = p.Prompt || "";
  $("negative_prompt").value = p["Negative prompt"] || "";
  const set = (id, key) => { if (p[key] !== undefined) $(id).value = p[key]; };
  set("steps", "Steps"); set("cfg_scale", "CFG scale"); set("seed", "Seed");
  set("width", "Size-1"); set("height", "Size-2");
  if (p.Sampler && [...$("sampler_name").options].some((o) => o.value === p.Sampler)) $("sampler_name").value = p.Sampler;
  if (p["Schedule type"]) {
    const label = [...$("scheduler").options].find((o) => o.value.toLowerCase() === p["Schedule type"].toLowerCase());
    if (label) $("scheduler").value = label.value;
  }
  $("enable_hr").checked = "Hires upscaler" in p;
  saveSettings();
  setMode("txt2img");
}

// ------------------------------------------------------------------ wiring

function setMode(next) {
  mode = next;
  document.body.dataset.mode = next;
  for (const tab of document.querySelectorAll("[role=tab]")) tab.setAttribute("aria-selected", String(tab.dataset.mode === next));
  $("pnginfo-panel").hidden = next !== "pnginfo";
}

function wire() {
  for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("input", saveSettings);
  document.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e); });
  $("interrupt").addEventListener("click", () => call("/interrupt", {}));
  $("skip").addEventListener("click", () => call("/skip", {}));
  $("swap-size").addEventListener("click", () => {
    [$("width").value, $("height").value] = [$("height").value, $("width").value];
    saveSettings();
  });
  $("random-seed").addEventListener("click", () => { $("seed").value = -1; saveSettings(); });
  $("reuse-seed").addEventListener("click", () => { if (results[selected]) { $("seed").value = results[selected].seed; saveSettings(); } });
  $("insert-lora").addEventListener("click", () => {
    if ($("lora").value) $("prompt").value = `${$("prompt").value.trimEnd()} <lora:${$("lora").value}:1>`.trimStart();
    saveSettings();
  });
  $("model").addEventListener("change", async () => {
    $("status").textContent = "Loading model…";
    try { await call("/options", { sd_model_checkpoint: $("model").value }); $("status").textContent = "Model loaded"; }
    catch (err) { $("error").textContent = err.message; $("status").textContent = ""; }
  });
  $("cn_image").addEventListener("change", () => {
    const file = $("cn_image").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => { controlData = reader.result; };
    reader.readAsDataURL(file);
  });
  $("init-image").addEventListener("change", () => {
    const file = $("init-image").files[0];
    if (file) setInitImage(URL.createObjectURL(file));
  });
  let painting = false;
  $("mask-canvas").addEventListener("pointerdown", (e) => { painting = true; paintAt(e); });
  $("mask-canvas").addEventListener("pointermove", (e) => { if (painting) paintAt(e); });
  window.addEventListener("pointerup", () => { painting = false; });
  $("clear-mask").addEventListener("click", clearMask);
  $("send-img2img").addEventListener("click", () => sendTo("img2img"));
  $("send-inpaint").addEventListener("click", () => sendTo("inpaint"));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files[0]) readPng(e.dataTransfer.files[0]);
  });
  $("pnginfo-file").addEventListener("change", () => { if ($("pnginfo-file").files[0]) readPng($("pnginfo-file").files[0]); });
  $("pnginfo-send").addEventListener("click", sendParameters);
}

wire();
setMode("txt2img");
loadLists().then(restoreSettings).catch((err) => { $("error").textContent = `could not reach the server: ${err.message}`; });
