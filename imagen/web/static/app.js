/* Imagen's page: a client of the public API only (the same routes a script calls).
 *
 * What the server offers is read from it: the models (/models), the LoRAs (/loras), the request's fields and
 * their ranges, and whether /cancel and /events exist (/openapi.json). Progress comes from GET /events as a
 * fetch() stream (EventSource cannot send the API key), with previews; without it, /status is polled. The
 * API key, the language and the gallery of this browser's jobs are kept in localStorage: the gallery (and the
 * last seed) per key, so that a key never shows another key's prompts and jobs (``mine``).
 */
"use strict";
(() => {
  const I18N = window.IMAGEN_I18N;
  const $ = (id) => document.getElementById(id);
  const KEY = "imagen.apiKey";
  const LANG = "imagen.lang";
  const GALLERY = "imagen.gallery";
  const LAST_SEED = "imagen.lastSeed";
  const SECTIONS = "imagen.sections"; // {size: true, ...}: the folded sections a person opened
  const GALLERY_MAX = 24;
  const POLL_MS = 1000;
  const TERMINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
  // The reference's fields, drawn by the page itself; any other field the server offers gets a control.
  // ``controlnets`` has a section of its own (a unit's image, model, preprocessor and preview); ``hires`` and
  // ``refiner`` (objects) are drawn in the "Finishing" section.
  const CORE = new Set(["prompt", "negative_prompt", "model", "loras", "steps", "guidance_scale", "seed", "controlnets", "hires", "refiner"]);
  const NOT_FOR_PEOPLE = new Set(["webhook", "webhook_events_filter"]);
  const FALLBACK = { steps: { minimum: 10, maximum: 100, default: 30 }, guidance_scale: { minimum: 1, maximum: 30, default: 7.5 } };

  const store = {
    get(name, fallback = null) {
      try {
        const raw = localStorage.getItem(name);
        return raw === null ? fallback : JSON.parse(raw);
      } catch {
        return fallback;
      }
    },
    set(name, value) {
      try {
        if (value === null || value === undefined) localStorage.removeItem(name);
        else localStorage.setItem(name, JSON.stringify(value));
      } catch { /* private mode: nothing is kept */ }
    },
  };

  /** A short, stable tag of a key (cyrb53, 53 bits): names that key's own storage without holding the key.
   * Synchronous, because crypto.subtle exists only on https and localhost. */
  function keyTag(key) {
    let h1 = 0xdeadbeef;
    let h2 = 0x41c6ce57;
    for (let i = 0; i < key.length; i++) {
      const ch = key.charCodeAt(i);
      h1 = Math.imul(h1 ^ ch, 2654435761);
      h2 = Math.imul(h2 ^ ch, 1597334677);
    }
    h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
    h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
    return (4294967296 * (2097151 & h2) + (h1 >>> 0)).toString(36);
  }

  /** The storage name of ``name`` for the key in use: ``imagen.gallery.<tag>``; without a key (a server
   * without keys, where every job is everyone's) the plain name. */
  function mine(name) {
    const key = store.get(KEY);
    return key ? `${name}.${keyTag(key)}` : name;
  }

  // -- words ------------------------------------------------------------------------------------------
  let lang = store.get(LANG) || ((navigator.language || "en").toLowerCase().startsWith("fr") ? "fr" : "en");

  function t(key, vars) {
    let text = (I18N[lang] && I18N[lang][key]) ?? I18N.en[key] ?? key;
    for (const [name, value] of Object.entries(vars || {})) text = text.split(`{${name}}`).join(String(value));
    return text;
  }

  /** Set an element's text from a key; it follows a language switch. */
  function say(el, key, vars) {
    el.dataset.i18n = key;
    if (vars) el.dataset.i18nVars = JSON.stringify(vars);
    else delete el.dataset.i18nVars;
    el.textContent = t(key, vars);
  }

  function applyLang() {
    document.documentElement.lang = lang;
    $("lang").value = lang;
    for (const el of document.querySelectorAll("[data-i18n]")) {
      el.textContent = t(el.dataset.i18n, el.dataset.i18nVars ? JSON.parse(el.dataset.i18nVars) : undefined);
    }
    for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
    for (const el of document.querySelectorAll("[data-i18n-alt]")) el.alt = t(el.dataset.i18nAlt);
    for (const el of document.querySelectorAll("[data-i18n-aria-label]")) {
      el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel, el.dataset.i18nVars ? JSON.parse(el.dataset.i18nVars) : undefined));
    }
    document.title = `Imagen · ${t("title")}`;
  }

  // -- the API ----------------------------------------------------------------------------------------
  class HttpError extends Error {
    constructor(status, body) {
      super(`HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
    get detail() {
      return describeDetail(this.body && this.body.detail, this.status);
    }
  }
  class DownError extends Error {}

  function describeDetail(detail, status) {
    if (detail === undefined || detail === null) return `HTTP ${status}`;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((e) => e.msg || JSON.stringify(e)).join("; ");
    return detail.error || detail.message || JSON.stringify(detail);
  }

  async function api(path, { method = "GET", json, signal, accept } = {}) {
    const headers = {};
    const key = store.get(KEY);
    if (key) headers.Authorization = `Bearer ${key}`;
    if (accept) headers.Accept = accept;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new DownError(String(error));
    }
    if (response.status === 401) {
      const answer = await readJson(response);
      // A refusal of a key already replaced (a request still in flight when the person gave a new one)
      // says nothing about the new key: only a refusal of the key in use opens the box again.
      if (store.get(KEY) === key) askForKey(answer && answer.detail, Boolean(key));
      throw new HttpError(401, answer);
    }
    return response;
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }

  /** JSON of a call; an error status not in ``allow`` throws. */
  async function call(path, options = {}) {
    const response = await api(path, options);
    const body = await readJson(response);
    if (!response.ok && !(options.allow || []).includes(response.status)) throw new HttpError(response.status, body);
    return { status: response.status, body, headers: response.headers };
  }

  // -- state ------------------------------------------------------------------------------------------
  const state = {
    ready: false,
    models: [],
    loras: [],
    maxLoras: 4,
    features: { cancel: false, events: false, preview: false },
    extras: [], // names of the extra fields shown
    job: null, // {id, controller, position}
    shown: null, // the gallery entry on the stage
    blobs: new Map(), // url -> object URL
    sentLoras: [],
    controlnets: null, // GET /controlnets: {controlnets, preprocessors}; null where the server has none
    cnUnit: {}, // the ControlNetUnit schema's fields (ranges, defaults)
    refinerModels: [], // GET /models' refiners (`refiner: true`): never the main model
    upscalers: null, // GET /upscalers' list; null where the server has none
    finishing: { refiner: false, hires: false, upscalerDefault: "latent", model: undefined },
  };

  // -- API keys ---------------------------------------------------------------------------------------
  let keyWaiters = [];

  function askForKey(detail, hadKey) {
    // This server needs a key: a keyless gallery here can only be what an older page kept for some key.
    if (store.get(GALLERY) !== null || store.get(LAST_SEED) !== null) {
      store.set(GALLERY, null);
      store.set(LAST_SEED, null);
      if (!store.get(KEY)) leaveKey();
    }
    $("keybox").hidden = false;
    $("key-button").hidden = false;
    $("key-forget").hidden = !store.get(KEY);
    const error = $("key-error");
    if (hadKey && detail) {
      say(error, "keyRejected", { detail });
      error.hidden = false;
    } else {
      error.hidden = true;
    }
    setHealth("wait", "keyTitle");
    if (!$("keybox").contains(document.activeElement)) $("key-input").focus();
  }

  /** Another key, or none: nothing of the previous key's stays on the screen; that key's gallery shows. */
  function leaveKey() {
    if (state.job) {
      state.job.controller.abort();
      state.job = null;
      setRunning(false);
    }
    state.shown = null;
    for (const url of state.blobs.values()) URL.revokeObjectURL(url);
    state.blobs.clear();
    $("image").hidden = true;
    $("image").removeAttribute("src");
    $("image").alt = "";
    for (const id of ["preview", "overlay", "details", "notice", "variants"]) $(id).hidden = true;
    for (const id of ["params", "variants"]) $(id).replaceChildren();
    $("copied").textContent = "";
    $("download").removeAttribute("href");
    $("empty").hidden = false;
    $("seed-reuse").disabled = store.get(mine(LAST_SEED)) === null;
    renderGallery();
  }

  function forgetPrompt() {
    $("prompt").value = "";
    $("negative_prompt").value = "";
    clearControlImage(); // another person's picture is theirs too
  }

  function keyGiven() {
    return new Promise((resolve) => keyWaiters.push(resolve));
  }

  function onKeySubmit(event) {
    event.preventDefault();
    const value = $("key-input").value.trim();
    if (!value) {
      say($("key-error"), "keyEmpty");
      $("key-error").hidden = false;
      $("key-input").focus();
      return;
    }
    const previous = store.get(KEY);
    store.set(KEY, value);
    if (previous && value !== previous) forgetPrompt(); // another person's key: their prompt is theirs
    if (value !== previous) leaveKey();
    $("key-input").value = "";
    $("keybox").hidden = true;
    $("key-button").hidden = false;
    const waiters = keyWaiters;
    keyWaiters = [];
    for (const resolve of waiters) resolve();
    if (!state.ready) boot();
    else refreshGallery();
    $("prompt").focus();
  }

  // -- health -----------------------------------------------------------------------------------------
  function setHealth(kind, key, vars) {
    const el = $("health");
    el.className = `health ${kind}`;
    say($("health-text"), key, vars);
  }

  let healthTimer = null;
  let healthRun = 0;
  async function checkHealth() {
    clearTimeout(healthTimer);
    const run = ++healthRun;
    let next = 15000;
    try {
      const { body } = await call("/health");
      if (run !== healthRun) return;
      const workers = body.workers || [];
      const ready = workers.filter((w) => w.ready).length;
      if (!state.ready && $("keybox").hidden === false) {
        // the key box says it all
      } else if (workers.length && !ready) {
        setHealth("wait", "noWorker");
        next = 3000;
      } else {
        const gpu = body.gpu_available ? "GPU" : "CPU";
        const count = workers.length ? t("workersReady", { ready, total: workers.length }) : body.queue_broker;
        setHealth("ok", "serverOk", { workers: `${count} · ${gpu}` });
      }
    } catch (error) {
      if (run !== healthRun) return;
      if (error instanceof DownError) {
        setHealth("down", "serverDown");
        next = 3000;
      }
    }
    healthTimer = setTimeout(checkHealth, next);
  }

  // -- the form, built from what the server offers ---------------------------------------------------
  function resolveSchema(doc, schema) {
    if (!schema) return null;
    if (schema.$ref) return resolveSchema(doc, doc.components.schemas[schema.$ref.split("/").pop()]);
    for (const list of [schema.anyOf, schema.oneOf]) {
      if (list) {
        const real = list.filter((s) => s.type !== "null");
        if (real.length === 1) {
          return { ...resolveSchema(doc, real[0]), default: schema.default, description: schema.description, nullable: real.length < list.length };
        }
      }
    }
    return schema;
  }

  function applySchema(doc) {
    const request = doc && doc.components && doc.components.schemas && doc.components.schemas.GenerationRequest;
    const props = (request && request.properties) || {};
    const field = (name) => resolveSchema(doc, props[name]) || FALLBACK[name] || {};
    for (const name of ["steps", "guidance_scale"]) {
      const spec = field(name);
      const input = $(name);
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      if (input.value === "" && spec.default !== undefined) input.value = spec.default;
      $(`${name}-range`).textContent = `${spec.minimum ?? ""}–${spec.maximum ?? ""}`;
    }
    const seed = field("seed");
    if (seed.maximum !== undefined) $("seed").max = seed.maximum;
    // 2^53 - 1 says nothing to a person: the range is shown only when it is a readable one
    $("seed-range").textContent = seed.maximum !== undefined && seed.maximum < 1e10 ? `0–${seed.maximum}` : "";
    const loras = props.loras;
    if (loras && loras.maxItems !== undefined) state.maxLoras = loras.maxItems;
    const paths = (doc && doc.paths) || {};
    state.features.cancel = Boolean(paths["/cancel/{job_id}"]);
    const events = paths["/events/{job_id}"];
    state.features.events = Boolean(events) && typeof ReadableStream !== "undefined";
    state.features.preview = Boolean(events && events.get && (events.get.parameters || []).some((p) => p.name === "preview"));
    buildExtras(doc, props);
    applyControlnetSchema(doc, props);
    applyFinishingSchema(doc, props);
  }

  // Extra fields in this order when the server offers them; any other one after them.
  const EXTRA_ORDER = ["width", "height", "num_images", "scheduler", "sampler", "clip_skip", "init_image", "mask_image", "strength", "ip_strength", "ip_image"];
  // The folded section each extra field goes to: images in "Image inputs", any other in "Size and sampler".
  const IMAGE_INPUTS = new Set(["init_image", "mask_image", "strength", "ip_strength", "ip_image"]);

  function buildExtras(doc, props) {
    const box = $("extras-size");
    const images = $("extras-images");
    box.replaceChildren();
    images.replaceChildren();
    $("extras-size-top").replaceChildren();
    state.extras = [];
    const sizes = [];
    const names = Object.keys(props).sort((a, b) => rank(a) - rank(b));
    for (const name of names) {
      if (CORE.has(name) || NOT_FOR_PEOPLE.has(name)) continue;
      const spec = resolveSchema(doc, props[name]) || {};
      if (name === "ip_strength" && spec.maximum === 0) continue; // no IP-Adapter on this server
      // a text field with a list route (scheduler: GET /schedulers) is a choice among that list
      const listPath = `/${name}s`;
      if (spec.type === "string" && !spec.enum && doc && doc.paths && doc.paths[listPath]) spec.choicesFrom = listPath;
      const control = extraControl(name, spec);
      if (!control) continue;
      state.extras.push(name);
      control.dataset.extra = name;
      if (name === "width" || name === "height") sizes.push(control);
      else if (IMAGE_INPUTS.has(name) || /_image$/.test(name)) images.append(control);
      else box.append(control);
    }
    $("section-images").hidden = images.childElementCount === 0;
    if (sizes.length) {
      const row = document.createElement("div");
      row.className = "grid2";
      row.append(...sizes);
      $("extras-size-top").append(row);
      for (const name of ["width", "height"]) if ($(name)) $(name).addEventListener("input", reserveFromForm);
    }
  }

  function rank(name) {
    const index = EXTRA_ORDER.indexOf(name);
    return index < 0 ? EXTRA_ORDER.length : index;
  }

  async function fillChoices(select, path, name) {
    try {
      const { body } = await call(path);
      const list = Array.isArray(body) ? body : body[`${name}s`] || Object.values(body).find(Array.isArray) || [];
      for (const value of list) {
        const option = document.createElement("option");
        option.value = typeof value === "string" ? value : value.id || value.name;
        option.textContent = typeof value === "string" ? value : value.name || value.id;
        select.append(option);
      }
    } catch { /* the default only */ }
  }

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function extraControl(name, spec) {
    const wrap = document.createElement("div");
    wrap.className = "field";
    const label = document.createElement("label");
    label.htmlFor = name;
    const title = document.createElement("span");
    say(title, name);
    label.append(title);
    let input;
    const enumValues = spec.enum || (spec.items && spec.items.enum);
    if (spec.choicesFrom) {
      input = document.createElement("select");
      const option = document.createElement("option");
      option.value = "";
      say(option, "byDefault");
      input.append(option);
      input.dataset.kind = "string";
      fillChoices(input, spec.choicesFrom, name);
    } else if (spec.type === "string" && /_image$/.test(name)) {
      input = document.createElement("input");
      input.type = "file";
      input.accept = "image/png,image/jpeg,image/webp";
      input.dataset.kind = "file";
    } else if (enumValues) {
      input = document.createElement("select");
      if (spec.nullable || spec.default === undefined || spec.default === null) {
        const option = document.createElement("option");
        option.value = "";
        option.textContent = "—";
        input.append(option);
      }
      for (const value of enumValues) {
        const option = document.createElement("option");
        option.value = String(value);
        option.textContent = String(value);
        input.append(option);
      }
      if (spec.default !== undefined && spec.default !== null) input.value = String(spec.default);
      input.dataset.kind = typeof enumValues[0] === "number" ? "number" : "string";
    } else if (spec.type === "integer" || spec.type === "number") {
      input = document.createElement("input");
      input.type = "number";
      input.dataset.kind = "number";
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      input.step = spec.multipleOf || (spec.type === "integer" ? 1 : 0.05);
      if (spec.default !== undefined && spec.default !== null) input.value = spec.default;
      else input.placeholder = "auto";
      if (spec.minimum !== undefined || spec.maximum !== undefined) {
        const range = document.createElement("span");
        range.className = "range";
        range.textContent = ` ${spec.minimum ?? ""}–${spec.maximum ?? ""}`;
        label.append(range);
      }
    } else if (spec.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.dataset.kind = "boolean";
      input.checked = Boolean(spec.default);
      label.className = "check";
      label.prepend(input);
      input.id = name;
      input.name = name;
      wrap.append(label, fieldError(name));
      return wrap;
    } else {
      return null;
    }
    input.id = name;
    input.name = name;
    input.setAttribute("aria-describedby", `error-${name}`);
    wrap.append(label, input, fieldError(name));
    return wrap;
  }

  function fieldError(name) {
    const p = document.createElement("p");
    p.className = "field-error";
    p.id = `error-${name}`;
    p.hidden = true;
    return p;
  }

  async function extraValue(name) {
    const input = $(name);
    if (!input) return undefined;
    if (input.dataset.kind === "boolean") return input.checked;
    if (input.dataset.kind === "file") return input.files && input.files[0] ? readAsDataURL(input.files[0]) : undefined;
    if (input.value === "") return undefined;
    return input.dataset.kind === "number" ? Number(input.value) : input.value;
  }

  function renderModels() {
    const select = $("model"); // refiners finish other models' pictures: never offered here
    select.replaceChildren();
    for (const model of state.models) {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = model.name || model.id;
      select.append(option);
    }
    onModelChange();
  }

  function onModelChange() {
    const model = state.models.find((m) => m.id === $("model").value);
    $("negative_prompt").placeholder = (model && model.default_negative) || "";
    $("model-desc").textContent = (model && model.description) || "";
    applyModelRanges(model);
    renderControlnets();
    renderFinishing();
  }

  /** A model's own steps and CFG range (a few-step model: 4-8 steps); a value still at the last model's
   * default (or empty) moves to this one's, a value the person typed stays. Servers without them: the schema's. */
  function applyModelRanges(model) {
    for (const name of ["steps", "guidance_scale"]) {
      const range = model && model[name];
      if (!range || typeof range !== "object") continue;
      const input = $(name);
      const previous = input.dataset.modelDefault;
      if (input.value === "" || previous === undefined || Number(input.value) === Number(previous)) {
        input.value = range.default;
      }
      input.dataset.modelDefault = String(range.default);
      input.min = range.min;
      input.max = range.max;
      $(`${name}-range`).textContent = `${range.min}–${range.max}`;
    }
  }

  function renderLoras() {
    const box = $("loras");
    box.replaceChildren();
    $("loras-field").hidden = state.loras.length === 0;
    say($("loras-hint"), "lorasHint", { max: state.maxLoras });
    for (const lora of state.loras) {
      const row = document.createElement("div");
      row.className = "lora";
      row.dataset.lora = lora.id;
      const check = document.createElement("label");
      check.className = "check";
      const box2 = document.createElement("input");
      box2.type = "checkbox";
      box2.id = `lora-${lora.id}`;
      box2.value = lora.id;
      box2.addEventListener("change", onLoraToggle);
      const name = document.createElement("span");
      name.textContent = lora.name || lora.id;
      check.append(box2, name);
      row.append(check);
      if (lora.description) {
        const description = document.createElement("p");
        description.className = "hint";
        description.textContent = lora.description;
        row.append(description);
      }
      const weight = document.createElement("div");
      weight.className = "weight";
      const weightLabel = document.createElement("label");
      weightLabel.htmlFor = `lora-weight-${lora.id}`;
      say(weightLabel, "weight");
      const slider = document.createElement("input");
      slider.type = "range";
      slider.min = "0";
      slider.max = "2";
      slider.step = "0.05";
      slider.value = String(lora.default_weight ?? 0.8);
      slider.id = `lora-weight-${lora.id}`;
      slider.dataset.i18nAriaLabel = "weightOf";
      slider.dataset.i18nVars = JSON.stringify({ name: lora.name || lora.id });
      slider.setAttribute("aria-label", t("weightOf", { name: lora.name || lora.id }));
      slider.setAttribute("aria-describedby", `error-lora-${lora.id}`);
      slider.disabled = true;
      const output = document.createElement("output");
      output.htmlFor = slider.id;
      output.textContent = Number(slider.value).toFixed(2);
      slider.addEventListener("input", () => { output.textContent = Number(slider.value).toFixed(2); });
      weight.append(weightLabel, slider, output);
      row.append(weight);
      if (lora.trigger_words && lora.trigger_words.length) {
        const triggers = document.createElement("p");
        triggers.className = "triggers";
        const lead = document.createElement("span");
        say(lead, "triggers");
        triggers.append(lead, " ");
        for (const word of lora.trigger_words) {
          const tag = document.createElement("span");
          tag.className = "tag";
          tag.textContent = word;
          triggers.append(tag);
        }
        row.append(triggers);
      }
      const error = fieldError(`lora-${lora.id}`);
      error.setAttribute("role", "alert");
      row.append(error);
      box.append(row);
    }
  }

  function onLoraToggle() {
    const boxes = [...document.querySelectorAll("#loras input[type=checkbox]")];
    const chosen = boxes.filter((b) => b.checked).length;
    for (const b of boxes) {
      $(`lora-weight-${b.value}`).disabled = !b.checked;
      b.disabled = !b.checked && chosen >= state.maxLoras;
    }
  }

  // -- the folded sections ----------------------------------------------------------------------------
  /** Each section (a native <details>) opens as this browser left it; folded the first time. */
  function wireSections() {
    const open = store.get(SECTIONS, {}) || {};
    for (const details of document.querySelectorAll("details[data-section]")) {
      details.open = open[details.dataset.section] === true;
      details.addEventListener("toggle", () => {
        const kept = store.get(SECTIONS, {}) || {};
        if (kept[details.dataset.section] === details.open) return;
        kept[details.dataset.section] = details.open;
        store.set(SECTIONS, kept);
      });
    }
  }

  /** Open the section that holds ``el`` (a field the server refused must be seen). */
  function reveal(el) {
    const details = el && el.closest("details");
    if (details && !details.open) details.open = true;
  }

  // -- ControlNet: one unit ---------------------------------------------------------------------------
  // Ranges and defaults come from the document's ControlNetUnit; these only until it says better.
  const CN_FALLBACK = {
    scale: { minimum: 0, maximum: 2, default: 1 },
    start: { minimum: 0, maximum: 1, default: 0 },
    end: { minimum: 0, maximum: 1, default: 1 },
    low_threshold: { minimum: 1, maximum: 255, default: 100 },
    high_threshold: { minimum: 1, maximum: 255, default: 200 },
  };
  const CN_PROCESSOR_RES = 512; // the preview's size (AUTOMATIC1111's default for /controlnet/detect)
  const cn = { image: null, reading: null, run: 0, timer: null };

  function applyControlnetSchema(doc, props) {
    const schemas = (doc && doc.components && doc.components.schemas) || {};
    const unit = (schemas.ControlNetUnit && schemas.ControlNetUnit.properties) || {};
    state.cnUnit = {};
    for (const [name, spec] of Object.entries(unit)) state.cnUnit[name] = resolveSchema(doc, spec) || {};
    const list = props.controlnets ? resolveSchema(doc, props.controlnets) || {} : null;
    state.cnOffered = Boolean(list);
    state.cnMax = list && list.maxItems !== undefined ? list.maxItems : null;
    for (const name of Object.keys(CN_FALLBACK)) {
      const spec = { ...CN_FALLBACK[name] };
      for (const [key, value] of Object.entries(state.cnUnit[name] || {})) if (value !== undefined) spec[key] = value;
      const input = $(`cn-${name}`);
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      // a value left at the previous default takes the server's; one a person typed stays
      if (spec.default !== undefined && spec.default !== null && (input.dataset.default === undefined || input.value === input.dataset.default)) {
        input.value = String(spec.default);
        input.dataset.default = input.value;
      }
      $(`cn-${name}-range`).textContent = `${spec.minimum ?? ""}–${spec.maximum ?? ""}`;
    }
    showScale();
  }

  function showScale() {
    $("cn-scale-out").textContent = Number($("cn-scale").value).toFixed(2);
  }

  /** The section, filled for the model chosen: only the ControlNets that fit it. */
  function renderControlnets() {
    const section = $("section-controlnet");
    const data = state.controlnets;
    section.hidden = !(state.cnOffered && data);
    if (section.hidden) return;
    const preprocessors = $("cn-preprocessor");
    if (!preprocessors.options.length) {
      const spec = state.cnUnit.preprocessor || {};
      const listed = Array.isArray(data.preprocessors) && data.preprocessors.length ? data.preprocessors : (spec.enum || ["none"]).map((name) => ({ name }));
      for (const pre of listed) {
        const option = document.createElement("option");
        option.value = typeof pre === "string" ? pre : pre.name;
        if (I18N.en[`pre_${option.value}`]) say(option, `pre_${option.value}`);
        else option.textContent = option.value;
        if (pre.description) option.dataset.description = plain(pre.description);
        preprocessors.append(option);
      }
      preprocessors.value = spec.default || "none";
      if (!preprocessors.value && preprocessors.options.length) preprocessors.selectedIndex = 0;
      onPreprocessorChange();
    }
    const modelId = $("model").value;
    const model = state.models.find((m) => m.id === modelId);
    const all = state.cnMax === 0 ? [] : data.controlnets;
    const fitting = (c, m) => {
      if (Array.isArray(c.models)) return c.models.includes(m && m.id);
      return m && Array.isArray(m.controlnets) ? m.controlnets.includes(c.id) : true;
    };
    const fits = all.filter((c) => fitting(c, model));
    const select = $("cn-model");
    const before = select.value;
    select.replaceChildren();
    for (const c of fits) {
      const option = document.createElement("option");
      option.value = c.id;
      option.textContent = c.name || c.id;
      select.append(option);
    }
    if (fits.some((c) => c.id === before)) select.value = before;
    const status = $("cn-status");
    if (!all.length) say(status, "cnNoneConfigured");
    else if (!fits.length) {
      const others = state.models.filter((m) => all.some((c) => fitting(c, m)));
      say(status, others.length ? "cnNoneFits" : "cnNoneFitsAny", { model: (model && (model.name || model.id)) || modelId, others: others.map((m) => m.name || m.id).join(", ") });
    } else {
      delete status.dataset.i18n;
      status.textContent = "";
    }
    status.hidden = status.textContent === "";
    $("cn-unit").hidden = fits.length === 0;
    onControlnetChange();
    updateFinishing();
  }

  /** The server's descriptions are Markdown: its `code` marks read as plain text. */
  function plain(text) {
    return String(text).replace(/`/g, "");
  }

  function chosenControlnet() {
    return (state.controlnets && state.controlnets.controlnets.find((c) => c.id === $("cn-model").value)) || null;
  }

  function onControlnetChange() {
    const chosen = chosenControlnet();
    $("cn-model-desc").textContent = plain((chosen && chosen.description) || "");
    const types = (chosen && Array.isArray(chosen.control_types) && chosen.control_types) || [];
    const typeSelect = $("cn-control_type");
    const before = typeSelect.value;
    typeSelect.replaceChildren();
    for (const type of types) {
      const option = document.createElement("option");
      option.value = type;
      option.textContent = type;
      typeSelect.append(option);
    }
    if (types.includes(before)) typeSelect.value = before;
    else if (types.includes($("cn-preprocessor").value)) typeSelect.value = $("cn-preprocessor").value;
    $("cn-control_type-field").hidden = types.length === 0;
  }

  function onPreprocessorChange() {
    const select = $("cn-preprocessor");
    const option = select.selectedOptions[0];
    $("cn-preprocessor-desc").textContent = (option && option.dataset.description) || "";
    $("cn-thresholds").hidden = select.value !== "canny";
    schedulePreview(0);
  }

  async function onControlImage() {
    const input = $("cn-image");
    const file = input.files && input.files[0];
    $("error-cn-image").hidden = true;
    input.removeAttribute("aria-invalid");
    if (!file) {
      clearControlImage();
      return;
    }
    cn.reading = readAsDataURL(file);
    try {
      const image = await cn.reading;
      if (input.files[0] !== file) return; // another file since
      cn.image = image;
    } catch (error) {
      cn.image = null;
      showFieldError("cn-image", String(error));
    } finally {
      cn.reading = null;
    }
    $("cn-clear").hidden = !cn.image;
    schedulePreview(0);
    updateFinishing();
  }

  function clearControlImage() {
    $("cn-image").value = "";
    cn.image = null;
    cn.reading = null;
    $("cn-clear").hidden = true;
    schedulePreview(0);
    updateFinishing();
  }

  function schedulePreview(delay) {
    clearTimeout(cn.timer);
    cn.timer = setTimeout(updatePreview, delay);
  }

  function thresholds() {
    const value = (name) => {
      const raw = $(`cn-${name}`).value.trim();
      return raw === "" ? undefined : Number(raw);
    };
    return { low: value("low_threshold"), high: value("high_threshold") };
  }

  /** The map the ControlNet will follow: the image itself ("none"), else the server's detection of it. */
  async function updatePreview() {
    const run = ++cn.run;
    const box = $("cn-preview-box");
    const img = $("cn-preview");
    const status = $("cn-preview-status");
    if (!cn.image) {
      box.hidden = true;
      img.removeAttribute("src");
      delete img.dataset.preprocessor;
      return;
    }
    box.hidden = false;
    const preprocessor = $("cn-preprocessor").value || "none";
    if (preprocessor === "none") {
      img.src = cn.image;
      img.hidden = false;
      img.dataset.preprocessor = "none";
      say(status, "cnAsIs");
      return;
    }
    delete img.dataset.preprocessor;
    box.setAttribute("aria-busy", "true");
    say(status, "cnDetecting");
    const { low, high } = thresholds();
    const json = { controlnet_module: preprocessor, controlnet_input_images: [cn.image], controlnet_processor_res: CN_PROCESSOR_RES };
    if (low !== undefined) json.controlnet_threshold_a = low;
    if (high !== undefined) json.controlnet_threshold_b = high;
    try {
      const { body } = await call("/controlnet/detect", { method: "POST", json });
      if (run !== cn.run) return;
      const map = body && Array.isArray(body.images) ? body.images[0] : null;
      if (!map) throw new HttpError(200, { detail: (body && body.info) || "no image" });
      img.src = map.startsWith("data:") ? map : `data:image/png;base64,${map}`;
      img.hidden = false;
      img.dataset.preprocessor = preprocessor;
      say(status, "cnDetected", { name: preprocessor });
    } catch (error) {
      if (run !== cn.run) return;
      img.hidden = true;
      const [key, vars] = explain(error);
      say(status, "cnDetectFailed", { detail: t(key, vars) });
    } finally {
      if (run === cn.run) box.removeAttribute("aria-busy");
    }
  }

  /** Whether the job will have a ControlNet unit: a control image, and a ControlNet for this model. */
  function controlnetChosen() {
    return !$("section-controlnet").hidden && !$("cn-unit").hidden && Boolean(cn.image) && Boolean($("cn-model").value);
  }

  /** The unit sent with the job, or null: no image (or no ControlNet for this model) sends none. */
  async function controlnetUnit() {
    if (cn.reading) await cn.reading.catch(() => {});
    if (!controlnetChosen()) return null;
    const unit = { model: $("cn-model").value, image: cn.image, preprocessor: $("cn-preprocessor").value || "none" };
    for (const name of ["scale", "start", "end"]) {
      const raw = $(`cn-${name}`).value.trim();
      if (raw !== "") unit[name] = Number(raw);
    }
    if (unit.preprocessor === "canny") {
      const { low, high } = thresholds();
      if (low !== undefined) unit.low_threshold = low;
      if (high !== undefined) unit.high_threshold = high;
    }
    if (!$("cn-control_type-field").hidden && $("cn-control_type").value) unit.control_type = $("cn-control_type").value;
    return unit;
  }

  /** A job's unit back in the section (the image is not kept with the job: it is chosen again). */
  function reuseControlnet(unit) {
    if (!unit || $("section-controlnet").hidden) return;
    const has = (select, value) => [...$(select).options].some((o) => o.value === value);
    if (has("cn-model", unit.model)) {
      $("cn-model").value = unit.model;
      onControlnetChange();
    }
    if (unit.control_type && has("cn-control_type", unit.control_type)) $("cn-control_type").value = unit.control_type;
    for (const name of Object.keys(CN_FALLBACK)) if (typeof unit[name] === "number") $(`cn-${name}`).value = String(unit[name]);
    showScale();
    if (has("cn-preprocessor", unit.preprocessor)) $("cn-preprocessor").value = unit.preprocessor;
    onPreprocessorChange();
  }

  function wireControlnet() {
    $("cn-image").addEventListener("change", onControlImage);
    $("cn-clear").addEventListener("click", () => {
      clearControlImage();
      $("cn-image").focus();
    });
    $("cn-model").addEventListener("change", onControlnetChange);
    $("cn-preprocessor").addEventListener("change", onPreprocessorChange);
    $("cn-scale").addEventListener("input", showScale);
    for (const name of ["low_threshold", "high_threshold"]) $(`cn-${name}`).addEventListener("input", () => schedulePreview(300));
  }

  // -- Finishing: the SDXL refiner and the hires fix ---------------------------------------------------
  // Ranges and defaults come from the document's RefinerRequest and HiresFix; these only until it says better.
  const FINISH_FALLBACK = {
    refiner: { switch_at: { minimum: 0.5, maximum: 0.95, default: 0.8 } },
    hires: {
      scale: { minimum: 1, maximum: 4, default: 2 },
      denoise: { minimum: 0, maximum: 1, default: 0.5 },
      steps: { minimum: 1 }, // no default: empty is the job's own steps
    },
  };

  /** The fields of the request's ``refiner`` / ``hires`` object (its $ref resolved), else of the named schema. */
  function objectFields(doc, spec, schemaName) {
    const resolved = spec ? resolveSchema(doc, spec) || {} : {};
    const schemas = (doc && doc.components && doc.components.schemas) || {};
    const props = resolved.properties || (schemas[schemaName] && schemas[schemaName].properties) || {};
    const fields = {};
    for (const [name, field] of Object.entries(props)) fields[name] = resolveSchema(doc, field) || {};
    return fields;
  }

  function applyFinishingSchema(doc, props) {
    const paths = (doc && doc.paths) || {};
    state.finishing.refiner = Boolean(props.refiner);
    // the hires fix needs its upscalers' list (GET /upscalers): a server without that route gets none
    state.finishing.hires = Boolean(props.hires) && Boolean(paths["/upscalers"]);
    const own = {
      refiner: objectFields(doc, props.refiner, "RefinerRequest"),
      hires: objectFields(doc, props.hires, "HiresFix"),
    };
    for (const [object, fallbacks] of Object.entries(FINISH_FALLBACK)) {
      for (const [name, fallback] of Object.entries(fallbacks)) {
        const spec = { ...fallback };
        for (const [key, value] of Object.entries(own[object][name] || {})) if (value !== undefined) spec[key] = value;
        const input = $(`${object}-${name}`);
        if (spec.minimum !== undefined) input.min = spec.minimum;
        if (spec.maximum !== undefined) input.max = spec.maximum;
        // a value left at the previous default takes the server's; one a person typed stays
        if (spec.default !== undefined && spec.default !== null && (input.dataset.default === undefined || input.value === input.dataset.default)) {
          input.value = String(spec.default);
          input.dataset.default = input.value;
        }
        $(`${object}-${name}-range`).textContent = spec.minimum !== undefined || spec.maximum !== undefined ? `${spec.minimum ?? ""}–${spec.maximum ?? ""}` : "";
      }
    }
    const upscaler = own.hires.upscaler || {};
    state.finishing.upscalerDefault = typeof upscaler.default === "string" ? upscaler.default : "latent";
    renderUpscalers();
  }

  function renderUpscalers() {
    const select = $("hires-upscaler");
    const before = select.value;
    select.replaceChildren();
    for (const upscaler of state.upscalers || []) {
      const option = document.createElement("option");
      option.value = upscaler.id;
      option.textContent = upscaler.name || upscaler.id;
      if (upscaler.description) option.dataset.description = plain(upscaler.description);
      select.append(option);
    }
    const has = (value) => [...select.options].some((o) => o.value === value);
    if (has(before)) select.value = before;
    else if (has(state.finishing.upscalerDefault)) select.value = state.finishing.upscalerDefault;
    onUpscalerChange();
    $("hires-part").hidden = !(state.finishing.hires && select.options.length);
    showFinishingSection();
  }

  function onUpscalerChange() {
    const option = $("hires-upscaler").selectedOptions[0];
    $("hires-upscaler-desc").textContent = (option && option.dataset.description) || "";
  }

  function onHiresToggle() {
    $("hires-settings").disabled = !$("hires-enabled").checked;
  }

  /** The section shows when either part does. */
  function showFinishingSection() {
    $("section-finishing").hidden = $("refiner-part").hidden && $("hires-part").hidden;
  }

  function chosenModel() {
    return state.models.find((m) => m.id === $("model").value) || null;
  }

  /** The refiners that fit the model chosen; its default one chosen when the model changes. */
  function renderFinishing() {
    const model = chosenModel();
    const select = $("refiner-model");
    const before = select.value;
    const fits = model && Array.isArray(model.refiners) ? [...model.refiners] : [];
    const fallback = model && model.default_refiner;
    if (fallback && !fits.includes(fallback)) fits.push(fallback);
    select.replaceChildren();
    const none = document.createElement("option");
    none.value = "";
    say(none, "refinerNone");
    select.append(none);
    for (const id of fits) {
      const option = document.createElement("option");
      const known = state.refinerModels.find((m) => m.id === id);
      option.value = id;
      option.textContent = (known && known.name) || id;
      select.append(option);
    }
    const changed = state.finishing.model !== (model && model.id);
    state.finishing.model = model && model.id;
    if (changed && fallback) select.value = fallback; // the model's default refiner, as the server would use
    else select.value = fits.includes(before) ? before : "";
    const hint = $("refiner-hint");
    if (fallback) {
      const known = state.refinerModels.find((m) => m.id === fallback);
      say(hint, "refinerDefaultHint", { name: (known && known.name) || fallback });
    } else say(hint, "refinerHint");
    $("refiner-part").hidden = !(state.finishing.refiner && fits.length);
    showFinishingSection();
    updateFinishing();
  }

  /** Finishing is for text-to-image without ControlNet: with a starting image or a control image, its
   * controls are disabled and nothing of it is sent. */
  function finishingBlocked() {
    const init = $("init_image");
    return Boolean((init && init.files && init.files.length) || controlnetChosen());
  }

  function updateFinishing() {
    const blocked = finishingBlocked();
    $("finishing-box").disabled = blocked;
    $("finishing-blocked").hidden = !blocked;
  }

  const refinerChosen = () => (!$("section-finishing").hidden && !$("refiner-part").hidden ? $("refiner-model").value : "");
  const hiresChosen = () => !$("section-finishing").hidden && !$("hires-part").hidden && $("hires-enabled").checked;

  /** A refiner and the hires fix at once: the server runs one or the other. */
  function finishingConflict() {
    return !finishingBlocked() && Boolean(refinerChosen()) && hiresChosen();
  }

  function addFinishing(body) {
    const model = chosenModel();
    // without a word, the server finishes with the model's default refiner: "None" (or a job that cannot
    // have one) says so with "refiner": null
    const offDefault = state.finishing.refiner && model && model.default_refiner;
    if (finishingBlocked()) {
      if (offDefault) body.refiner = null;
      return;
    }
    const number = (id) => {
      const raw = $(id).value.trim();
      return raw === "" ? undefined : Number(raw);
    };
    const refiner = refinerChosen();
    if (refiner) {
      body.refiner = { model: refiner };
      const switchAt = number("refiner-switch_at");
      if (switchAt !== undefined) body.refiner.switch_at = switchAt;
    } else if (offDefault) {
      body.refiner = null;
    }
    if (hiresChosen()) {
      const hires = { upscaler: $("hires-upscaler").value || state.finishing.upscalerDefault };
      for (const name of ["scale", "denoise", "steps"]) {
        const value = number(`hires-${name}`);
        if (value !== undefined) hires[name] = value;
      }
      body.hires = hires;
    }
  }

  /** A job's refiner and hires fix back in the section (none in its metadata: none used). */
  function reuseFinishing(m) {
    const has = (select, value) => [...$(select).options].some((o) => o.value === value);
    if (!$("refiner-part").hidden) {
      const refiner = m.refiner && typeof m.refiner === "object" ? m.refiner : null;
      $("refiner-model").value = refiner && has("refiner-model", refiner.model) ? refiner.model : "";
      if (refiner && typeof refiner.switch_at === "number") $("refiner-switch_at").value = String(refiner.switch_at);
    }
    if (!$("hires-part").hidden) {
      const hires = m.hires && typeof m.hires === "object" ? m.hires : null;
      $("hires-enabled").checked = Boolean(hires);
      if (hires) {
        if (has("hires-upscaler", hires.upscaler)) $("hires-upscaler").value = hires.upscaler;
        if (typeof hires.scale === "number") $("hires-scale").value = String(hires.scale);
        if (typeof hires.denoise === "number") $("hires-denoise").value = String(hires.denoise);
        $("hires-steps").value = hires.steps ? String(hires.steps) : ""; // 0: the job's steps
      }
      onUpscalerChange();
      onHiresToggle();
    }
  }

  function wireFinishing() {
    $("hires-enabled").addEventListener("change", onHiresToggle);
    $("hires-upscaler").addEventListener("change", onUpscalerChange);
    // the starting image is an extra field, drawn from the document: heard from the form
    $("form").addEventListener("change", (event) => {
      if (event.target && event.target.id === "init_image") updateFinishing();
    });
    onHiresToggle();
  }

  function onRandomToggle() {
    $("seed").disabled = $("seed-random").checked;
    if (!$("seed-random").checked) $("seed").focus();
  }

  function reserveFromForm() {
    const w = Number($("width") && $("width").value);
    const h = Number($("height") && $("height").value);
    if (w > 0 && h > 0) reserve(w, h);
  }

  /** The image box keeps the image's shape before it loads: nothing moves when it arrives. */
  function reserve(width, height) {
    if (!(width > 0 && height > 0)) return;
    $("frame").style.setProperty("--arw", String(width));
    $("frame").style.setProperty("--arh", String(height));
  }

  async function buildBody() {
    const body = { prompt: $("prompt").value };
    const negative = $("negative_prompt").value;
    if (negative.trim()) body.negative_prompt = negative;
    if ($("model").value) body.model = $("model").value;
    const loras = [];
    for (const b of document.querySelectorAll("#loras input[type=checkbox]:checked")) {
      loras.push({ name: b.value, weight: Number($(`lora-weight-${b.value}`).value) });
    }
    body.loras = loras;
    state.sentLoras = loras.map((l) => l.name);
    for (const name of ["steps", "guidance_scale"]) {
      const value = $(name).value.trim();
      if (value !== "") body[name] = Number(value);
    }
    if (!$("seed-random").checked && $("seed").value.trim() !== "") body.seed = Number($("seed").value);
    for (const name of state.extras) {
      const value = await extraValue(name);
      if (value !== undefined) body[name] = value;
    }
    const unit = await controlnetUnit();
    if (unit) body.controlnets = [unit];
    addFinishing(body);
    return body;
  }

  // -- errors -----------------------------------------------------------------------------------------
  function clearErrors() {
    for (const el of document.querySelectorAll(".field-error")) if (el.id !== "key-error") el.hidden = true;
    for (const el of document.querySelectorAll("[aria-invalid=true]")) el.removeAttribute("aria-invalid");
    $("form-error").hidden = true;
    hideNotice();
  }

  // A field whose message goes under another control than its own id: the hires fix as a whole, under its box.
  const FIELD_INPUTS = { hires: "hires-enabled" };

  function showFieldError(name, message) {
    const error = $(`error-${name}`);
    if (!error) return false;
    error.textContent = message;
    delete error.dataset.i18n;
    error.hidden = false;
    const input = name.startsWith("lora-") ? $(`lora-weight-${name.slice(5)}`) : $(FIELD_INPUTS[name] || name);
    if (input) input.setAttribute("aria-invalid", "true");
    reveal(error);
    return input || error;
  }

  function showValidation(detail) {
    let first = null;
    const general = [];
    for (const error of Array.isArray(detail) ? detail : [{ msg: describeDetail(detail, 422) }]) {
      const loc = (error.loc || []).filter((part) => part !== "body");
      let name = loc.length ? String(loc[0]) : "";
      if (name === "loras" && typeof loc[1] === "number" && state.sentLoras[loc[1]]) name = `lora-${state.sentLoras[loc[1]]}`;
      // the one unit the page sends: a unit's field under that field, the unit as a whole under the section
      if (name === "controlnets") name = loc.length > 2 && $(`error-cn-${loc[2]}`) ? `cn-${loc[2]}` : "controlnets";
      // the Finishing objects: a field under its control (hires.denoise: #hires-denoise); the object as a whole
      // under the hires box, or under the refiner's select
      if (name === "hires") name = loc.length > 1 && $(`error-hires-${loc[1]}`) ? `hires-${loc[1]}` : "hires";
      if (name === "refiner") name = loc.length > 1 && $(`error-refiner-${loc[1]}`) ? `refiner-${loc[1]}` : "refiner-model";
      const shown = name ? showFieldError(name, error.msg || JSON.stringify(error)) : false;
      if (shown) first = first || shown;
      else general.push(error.msg || JSON.stringify(error));
    }
    const box = $("form-error");
    if (general.length) say(box, "errInvalidGeneral", { detail: general.join("; ") });
    else say(box, "errInvalid");
    box.hidden = false;
    if (first && first.focus) first.focus();
  }

  function showNotice(kind, key, vars) {
    const box = $("notice");
    box.className = `notice ${kind}`;
    say(box, key, vars);
    box.hidden = false;
  }

  function hideNotice() {
    $("notice").hidden = true;
  }

  function explain(error) {
    if (error instanceof DownError) return ["errDown"];
    if (error instanceof HttpError) {
      if (error.status === 503) return ["errQueueFull", { detail: error.detail }];
      if (error.status === 429) return ["errTooMany", { detail: error.detail }];
      if (error.status === 404) return ["errExpired"];
      return ["errServer", { status: error.status, detail: error.detail }];
    }
    return ["errServer", { status: "?", detail: String(error) }];
  }

  // -- running a job ----------------------------------------------------------------------------------
  function setRunning(running) {
    const button = $("generate");
    button.disabled = running;
    button.replaceChildren();
    if (running) {
      const spin = document.createElement("span");
      spin.className = "spinner";
      spin.setAttribute("aria-hidden", "true");
      button.append(spin);
    }
    const label = document.createElement("span");
    say(label, running ? "generating" : "generate");
    button.append(label);
    $("cancel").hidden = !(running && state.features.cancel && state.job);
    $("cancel").disabled = false;
  }

  function showProgress(key, vars, percent, detail) {
    $("overlay").hidden = false;
    $("empty").hidden = true;
    say($("phase"), key, vars);
    const value = Math.max(0, Math.min(100, Math.round(percent || 0)));
    $("bar-fill").style.width = `${value}%`;
    $("bar").setAttribute("aria-valuenow", String(value));
    const eta = $("eta");
    if (detail) say(eta, detail.key, detail.vars);
    else {
      delete eta.dataset.i18n;
      eta.textContent = "";
    }
  }

  async function generate() {
    if (state.job || !state.ready) return;
    clearErrors();
    if (!$("prompt").value.trim()) {
      showFieldError("prompt", t("errPrompt"));
      $("error-prompt").dataset.i18n = "errPrompt";
      $("prompt").focus();
      return;
    }
    if (finishingConflict()) {
      const input = showFieldError("refiner-model", t("errRefinerHires"));
      $("error-refiner-model").dataset.i18n = "errRefinerHires";
      if (input && input.focus) input.focus();
      return;
    }
    state.job = { id: null, controller: new AbortController(), position: null };
    let body;
    try {
      body = await buildBody();
    } catch (error) {
      state.job = null;
      showFieldError(state.extras.find((name) => $(name) && $(name).dataset.kind === "file") || "prompt", String(error));
      return;
    }
    setRunning(true);
    $("details").hidden = true;
    $("image").hidden = true;
    $("preview").hidden = true;
    reserveFromForm();
    showProgress("submitting", null, 0);
    if (window.matchMedia("(max-width: 860px)").matches) $("frame").scrollIntoView({ block: "nearest" });
    let answer;
    try {
      answer = await call("/generate", { method: "POST", json: body, allow: [422] });
    } catch (error) {
      state.job = null;
      setRunning(false);
      $("overlay").hidden = true;
      $("empty").hidden = Boolean(state.shown);
      if (state.shown) showEntry(state.shown);
      if (!(error instanceof HttpError && error.status === 401)) {
        const [key, vars] = explain(error);
        const box = $("form-error");
        say(box, key, vars);
        box.hidden = false;
      }
      return;
    }
    if (answer.status === 422) {
      state.job = null;
      setRunning(false);
      $("overlay").hidden = true;
      $("empty").hidden = Boolean(state.shown);
      if (state.shown) showEntry(state.shown);
      showValidation(answer.body && answer.body.detail);
      return;
    }
    const id = answer.body.job_id;
    const match = /(\d+)\s*$/.exec(answer.body.message || "");
    state.job.id = id;
    state.job.position = match ? Number(match[1]) : null;
    addEntry({ id, prompt: body.prompt, status: "PENDING", created: Date.now() });
    setRunning(true);
    showProgress(state.job.position ? "queuedAt" : "queued", state.job.position ? { position: state.job.position } : null, 0);
    follow(id);
  }

  function isCurrent(id) {
    return state.job !== null && state.job.id === id;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** Follow a job to its end: the event stream when the server has one, else /status every second. */
  async function follow(id) {
    let failures = 0;
    while (isCurrent(id)) {
      const signal = state.job.controller.signal;
      try {
        const final = state.features.events ? await stream(id, signal) : await poll(id, signal);
        failures = 0;
        if (final) {
          await finish(id, final);
          return;
        }
      } catch (error) {
        if (!isCurrent(id)) return;
        if (error instanceof HttpError && error.status === 404) {
          finishExpired(id);
          return;
        }
        if (error instanceof HttpError && error.status === 401) {
          await keyGiven();
          continue;
        }
        failures += 1;
        if (error instanceof DownError || error instanceof TypeError || failures > 1) showNotice("warn", "reconnecting");
        await sleep(Math.min(250 * failures, 2000));
      }
    }
  }

  async function poll(id, signal) {
    for (;;) {
      const { body } = await call(`/status/${encodeURIComponent(id)}`, { signal });
      onStatus(id, body);
      if (TERMINAL.has(body.status)) return body;
      await sleep(POLL_MS);
      if (!isCurrent(id)) return null;
    }
  }

  async function stream(id, signal) {
    const query = state.features.preview ? "?preview=1" : "";
    const response = await api(`/events/${encodeURIComponent(id)}${query}`, { signal, accept: "text/event-stream" });
    if (!response.ok) throw new HttpError(response.status, await readJson(response));
    if (!response.body) return poll(id, signal);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let event = { event: "message", data: [] };
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw new DownError(String(error));
      }
      if (chunk.done) return null; // the server closed the stream before the end: follow again
      buffer += decoder.decode(chunk.value, { stream: true });
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
        if (line === "") {
          if (event.data.length) {
            const data = JSON.parse(event.data.join("\n"));
            if (event.event === "status") {
              onStatus(id, data);
              if (TERMINAL.has(data.status)) {
                reader.cancel().catch(() => {});
                return data;
              }
            } else if (event.event === "preview") {
              onPreview(id, data);
            }
          }
          event = { event: "message", data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event.event = value;
          else if (field === "data") event.data.push(value);
        }
      }
    }
  }

  function onStatus(id, body) {
    if (!isCurrent(id)) return;
    hideNotice();
    updateEntry(id, { status: body.status });
    const meta = body.meta || {};
    if (body.status === "PENDING") {
      const position = state.job.position;
      showProgress(position ? "queuedAt" : "queued", position ? { position } : null, 0);
    } else if (body.status === "STARTED" || body.status === "PROGRESS") {
      const step = meta.step || "starting";
      let detail = null;
      if (meta.current_step !== undefined && meta.current_step !== null && meta.total_steps) {
        const parts = { current: meta.current_step, total: meta.total_steps };
        detail = { key: "stepOf", vars: parts };
        if (meta.eta_s !== undefined && meta.eta_s !== null) {
          detail = { key: "stepEta", vars: { ...parts, seconds: Math.max(1, Math.ceil(meta.eta_s)) } };
        }
      }
      showProgress(`step_${step}`, null, meta.progress, detail);
    }
  }

  function onPreview(id, data) {
    if (!isCurrent(id) || !data.image) return;
    const img = $("preview");
    img.src = data.image;
    img.hidden = false;
  }

  async function finish(id, body) {
    if (body.status === "SUCCESS") {
      const result = body.result || {};
      const metadata = result.metadata || {};
      reserve(metadata.width, metadata.height);
      showProgress("loadingImage", null, 100);
      const entry = updateEntry(id, { status: "SUCCESS", filename: result.filename, url: result.url, metadata, images: result.images || undefined });
      if (typeof metadata.seed === "number") {
        store.set(mine(LAST_SEED), metadata.seed);
        $("seed-reuse").disabled = false;
      }
      try {
        await showEntry(entry || { id, status: "SUCCESS", url: result.url, filename: result.filename, metadata, prompt: metadata.prompt });
      } catch (error) {
        const [key, vars] = explain(error);
        showNotice("", "errImage", { detail: t(key, vars) });
      }
    } else if (body.status === "FAILURE") {
      updateEntry(id, { status: "FAILURE", error: body.error });
      $("overlay").hidden = true;
      $("preview").hidden = true;
      $("empty").hidden = false;
      showNotice("", "errFailed", { detail: body.error || "?" });
    } else {
      updateEntry(id, { status: "REVOKED", error: body.error });
      $("overlay").hidden = true;
      $("preview").hidden = true;
      $("empty").hidden = false;
      showNotice("info", "errCancelled");
    }
    if (isCurrent(id)) {
      state.job = null;
      setRunning(false);
    }
    checkHealth(); // the worker that ran it is surely up by now
  }

  function finishExpired(id) {
    updateEntry(id, { expired: true });
    $("overlay").hidden = true;
    $("empty").hidden = false;
    showNotice("warn", "errExpired");
    state.job = null;
    setRunning(false);
  }

  async function cancel() {
    const job = state.job;
    if (!job || !job.id) return;
    $("cancel").disabled = true;
    try {
      const answer = await call(`/cancel/${encodeURIComponent(job.id)}`, { method: "POST", allow: [409] });
      if (answer.status === 200 && isCurrent(job.id)) {
        job.controller.abort();
        await finish(job.id, { status: "REVOKED", error: null });
      }
    } catch (error) {
      $("cancel").disabled = false;
      if (!(error instanceof HttpError && error.status === 401)) {
        const [key, vars] = explain(error);
        showNotice("", key, vars);
      }
    }
  }

  // -- results ----------------------------------------------------------------------------------------
  async function imageURL(url) {
    if (state.blobs.has(url)) return state.blobs.get(url);
    const response = await api(url);
    if (!response.ok) throw new HttpError(response.status, await readJson(response));
    const objectURL = URL.createObjectURL(await response.blob());
    state.blobs.set(url, objectURL);
    return objectURL;
  }

  function entryURL(entry) {
    return entry.url || (entry.filename ? `/outputs/${encodeURIComponent(entry.filename)}` : `/image/${entry.id}`);
  }

  /** The image ``index`` of a job: jobs with several images (num_images) list them in ``result.images``. */
  function imageOf(entry, index) {
    const metadata = entry.metadata || {};
    const images = Array.isArray(entry.images) && entry.images.length ? entry.images : null;
    if (!images) return { url: entryURL(entry), filename: entry.filename, seed: metadata.seed };
    const image = images[Math.max(0, Math.min(index, images.length - 1))];
    return {
      url: image.url || `/outputs/${encodeURIComponent(image.filename)}`,
      filename: image.filename,
      seed: image.seed ?? metadata.seed,
    };
  }

  async function showEntry(entry, index = 0) {
    state.shown = entry;
    state.shownIndex = index;
    const metadata = entry.metadata || {};
    reserve(metadata.width, metadata.height);
    const chosen = imageOf(entry, index);
    const src = await imageURL(chosen.url);
    if (state.shown !== entry || state.shownIndex !== index) return;
    const img = $("image");
    // shown once decoded (no flash of an empty box), but never held back by a tab the browser throttles
    const loaded = new Promise((resolve) => {
      img.onload = resolve;
      img.onerror = resolve;
    });
    img.src = src;
    await Promise.race([loaded, sleep(1500)]);
    img.alt = entry.prompt || metadata.prompt || "";
    img.hidden = false;
    $("preview").hidden = true;
    $("overlay").hidden = true;
    $("empty").hidden = true;
    state.shownSeed = chosen.seed;
    renderParams(entry, chosen.seed);
    renderVariants(entry, index);
    const link = $("download");
    link.href = src;
    link.download = chosen.filename || `${entry.id}.png`;
    $("details").hidden = false;
    $("copied").textContent = "";
    for (const li of document.querySelectorAll("#gallery li")) li.classList.toggle("current", li.dataset.id === entry.id);
  }

  function renderVariants(entry, index) {
    const box = $("variants");
    box.replaceChildren();
    const images = Array.isArray(entry.images) ? entry.images : [];
    box.hidden = images.length < 2;
    if (images.length < 2) return;
    images.forEach((_, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "variant";
      button.setAttribute("aria-pressed", String(i === index));
      button.dataset.i18nAriaLabel = "imageOf";
      button.dataset.i18nVars = JSON.stringify({ n: i + 1, total: images.length });
      button.setAttribute("aria-label", t("imageOf", { n: i + 1, total: images.length }));
      const thumb = document.createElement("img");
      thumb.alt = "";
      imageURL(imageOf(entry, i).url).then((src) => { thumb.src = src; }).catch(() => {});
      button.append(thumb);
      button.addEventListener("click", () => showEntry(entry, i));
      box.append(button);
    });
  }

  function renderParams(entry, seed) {
    const m = entry.metadata || {};
    const dl = $("params");
    dl.replaceChildren();
    const add = (key, value, wide) => {
      if (value === undefined || value === null || value === "") return null;
      const div = document.createElement("div");
      if (wide) div.className = wide === true ? "wide" : wide;
      const dt = document.createElement("dt");
      say(dt, key);
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      div.append(dt, dd);
      div.dataset.param = key.replace(/^p_/, "");
      dl.append(div);
      return dd;
    };
    add("p_seed", seed ?? m.seed);
    add("p_model", m.model);
    add("p_steps", m.steps);
    add("p_guidance_scale", m.guidance_scale);
    if (m.width && m.height) add("p_size", `${m.width} × ${m.height}`);
    add("p_sampler", m.sampler || m.scheduler);
    if (m.ip_strength) add("p_ip_strength", m.ip_strength);
    if (Array.isArray(m.loras) && m.loras.length) add("p_loras", m.loras.map((l) => `${l.name} × ${l.weight}`).join(", "), "two");
    if (Array.isArray(m.controlnets) && m.controlnets.length) {
      const unit = (c) => `${c.model || c.name || "?"}${c.preprocessor && c.preprocessor !== "none" ? ` (${c.preprocessor})` : ""}${c.scale !== undefined && c.scale !== null ? ` × ${c.scale}` : ""}`;
      add("p_controlnets", m.controlnets.map(unit).join(", "), "two");
    }
    if (m.hires && typeof m.hires === "object") {
      const h = m.hires;
      const dd = add("p_hires", h.upscaler, "two");
      if (dd) say(dd, "hiresParam", { upscaler: h.upscaler, width: h.width, height: h.height, denoise: h.denoise });
    }
    if (m.refiner && typeof m.refiner === "object") add("p_refiner", `${m.refiner.model} · ${m.refiner.switch_at}`);
    if (m.num_images && m.num_images > 1) add("num_images", m.num_images);
    if (m.clip_skip) add("clip_skip", m.clip_skip);
    if (m.strength !== undefined && m.strength !== null && (m.init_image || m.mode === "img2img")) add("strength", m.strength);
    add("p_prompt", m.prompt ?? entry.prompt, true);
    if (m.final_prompt && m.final_prompt !== m.prompt) add("p_final_prompt", m.final_prompt, true);
    add("p_negative_prompt", m.negative_prompt, true);
  }

  function reuseSettings() {
    const entry = state.shown;
    if (!entry) return;
    const m = entry.metadata || {};
    $("prompt").value = m.prompt ?? entry.prompt ?? "";
    const model = state.models.find((x) => x.id === m.model);
    if (model) {
      $("model").value = model.id;
      onModelChange();
    }
    $("negative_prompt").value = m.negative_prompt && (!model || m.negative_prompt !== model.default_negative) ? m.negative_prompt : "";
    const chosen = new Map((m.loras || []).map((l) => [l.name, l.weight]));
    for (const b of document.querySelectorAll("#loras input[type=checkbox]")) {
      b.checked = chosen.has(b.value);
      if (b.checked) {
        const slider = $(`lora-weight-${b.value}`);
        slider.value = String(chosen.get(b.value));
        slider.dispatchEvent(new Event("input"));
      }
    }
    onLoraToggle();
    if (m.steps !== undefined) $("steps").value = m.steps;
    if (m.guidance_scale !== undefined) $("guidance_scale").value = m.guidance_scale;
    const seed = state.shownSeed ?? m.seed;
    if (typeof seed === "number") {
      $("seed-random").checked = false;
      $("seed").value = seed;
      onRandomToggle();
    }
    reuseControlnet(Array.isArray(m.controlnets) ? m.controlnets[0] : null);
    reuseFinishing(m);
    for (const name of state.extras) {
      const input = $(name);
      if (input && input.dataset.kind !== "file" && m[name] !== undefined && m[name] !== null && typeof m[name] !== "object") {
        if (input.dataset.kind === "boolean") input.checked = Boolean(m[name]);
        else input.value = String(m[name]);
      }
    }
    say($("copied"), "reused");
    $("prompt").focus();
  }

  async function copySeed() {
    const seed = state.shownSeed;
    if (seed === undefined || seed === null) return;
    try {
      await navigator.clipboard.writeText(String(seed));
    } catch {
      const area = document.createElement("textarea");
      area.value = String(seed);
      area.setAttribute("aria-hidden", "true");
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    say($("copied"), "copied", { seed });
  }

  function reuseLastSeed() {
    const seed = store.get(mine(LAST_SEED));
    if (seed === null) return;
    $("seed-random").checked = false;
    $("seed").value = seed;
    onRandomToggle();
  }

  // -- the gallery (this browser's jobs, of the key in use) -------------------------------------------
  const entries = () => store.get(mine(GALLERY), []);

  function addEntry(entry) {
    const list = [entry, ...entries().filter((e) => e.id !== entry.id)].slice(0, GALLERY_MAX);
    store.set(mine(GALLERY), list);
    renderGallery();
  }

  function updateEntry(id, changes) {
    const list = entries();
    const entry = list.find((e) => e.id === id);
    if (!entry) return null;
    const before = JSON.stringify(entry);
    Object.assign(entry, changes);
    if (JSON.stringify(entry) !== before) {
      store.set(mine(GALLERY), list);
      renderGallery();
    }
    return entry;
  }

  function badgeFor(entry) {
    if (entry.expired) return ["expired", "expired"];
    if (entry.status === "FAILURE") return ["failed", "failed"];
    if (entry.status === "REVOKED") return ["cancelled", ""];
    if (!TERMINAL.has(entry.status)) return ["running", ""];
    return null;
  }

  function renderGallery() {
    const list = entries();
    const ul = $("gallery");
    ul.replaceChildren();
    $("gallery-empty").hidden = list.length > 0;
    $("gallery-clear").hidden = list.length === 0;
    for (const entry of list) {
      const li = document.createElement("li");
      li.dataset.id = entry.id;
      li.dataset.status = entry.expired ? "expired" : entry.status;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "thumb";
      button.title = entry.prompt || "";
      const pic = document.createElement("span");
      pic.className = "pic";
      const badge = badgeFor(entry);
      if (entry.status === "SUCCESS") {
        const img = document.createElement("img");
        img.alt = "";
        img.loading = "lazy";
        const url = entryURL(entry);
        if (state.blobs.has(url)) img.src = state.blobs.get(url);
        else {
          imageURL(url).then((src) => { img.src = src; }).catch(() => {
            img.remove();
            if (!entry.expired) updateEntry(entry.id, { expired: true });
          });
        }
        pic.append(img);
      }
      if (badge) {
        const span = document.createElement("span");
        span.className = `badge ${badge[1]}`;
        say(span, badge[0]);
        pic.append(span);
      }
      const cap = document.createElement("span");
      cap.className = "cap";
      cap.textContent = entry.prompt || entry.id;
      button.append(pic, cap);
      button.addEventListener("click", () => openEntry(entry.id));
      li.append(button);
      ul.append(li);
    }
  }

  function openEntry(id) {
    const entry = entries().find((e) => e.id === id);
    if (!entry) return;
    clearErrors();
    if (entry.status === "SUCCESS") {
      showEntry(entry).catch((error) => {
        const [key, vars] = explain(error);
        showNotice("warn", key, vars);
      });
      if (entry.expired) showNotice("warn", "expiredLong");
    } else if (entry.expired) {
      showNotice("warn", "expiredLong");
    } else if (entry.status === "FAILURE") {
      showNotice("", "errFailed", { detail: entry.error || "?" });
    } else if (entry.status === "REVOKED") {
      showNotice("info", "errCancelled");
    }
    $("frame").scrollIntoView({ block: "nearest" });
  }

  /** Ask the server about each remembered job: expired ones (404) are marked so; a running one is followed. */
  async function refreshGallery() {
    for (const entry of entries()) {
      if (entry.expired) continue;
      try {
        const { body } = await call(`/status/${encodeURIComponent(entry.id)}`);
        if (!TERMINAL.has(body.status) && !state.job) {
          state.job = { id: entry.id, controller: new AbortController(), position: null };
          setRunning(true);
          $("details").hidden = true;
          follow(entry.id);
        } else if (TERMINAL.has(body.status) && !TERMINAL.has(entry.status)) {
          const result = body.result || {};
          updateEntry(entry.id, { status: body.status, error: body.error, filename: result.filename, url: result.url, metadata: result.metadata, images: result.images || undefined });
        }
      } catch (error) {
        if (error instanceof HttpError && error.status === 404) updateEntry(entry.id, { expired: true });
        else if (!(error instanceof HttpError)) return; // the server is down: try again later
      }
    }
  }

  // -- start ------------------------------------------------------------------------------------------
  async function boot() {
    try {
      const optional = (path) => call(path).then((a) => a.body).catch((error) => {
        if (error instanceof HttpError && error.status === 401) throw error;
        if (error instanceof DownError) throw error;
        return null; // an older server: without what that route describes
      });
      const [doc, models, loras, controlnets, upscalers] = await Promise.all([
        optional("/openapi.json"), // none: the reference's ranges, no extras
        call("/models"),
        call("/loras"),
        optional("/controlnets"),
        optional("/upscalers"), // none: no hires fix
      ]);
      const listed = models.body.models || [];
      state.models = listed.filter((m) => !m.refiner);
      state.refinerModels = listed.filter((m) => m.refiner);
      state.upscalers = upscalers && Array.isArray(upscalers.upscalers) ? upscalers.upscalers : null;
      state.loras = loras.body.loras || [];
      state.controlnets = controlnets && Array.isArray(controlnets.controlnets) ? controlnets : null;
      applySchema(doc);
      renderModels();
      renderLoras();
      state.ready = true;
      $("generate").disabled = false;
      $("form-error").hidden = true;
      document.body.dataset.ready = "true";
      checkHealth();
      refreshGallery();
    } catch (error) {
      if (error instanceof HttpError && error.status === 401) return; // boot() again once a key is given
      setHealth("down", "serverDown");
      const [key, vars] = explain(error);
      const box = $("form-error");
      say(box, key, vars);
      box.hidden = false;
      setTimeout(boot, 3000);
    }
  }

  function wire() {
    $("lang").addEventListener("change", () => {
      lang = $("lang").value;
      store.set(LANG, lang);
      applyLang();
    });
    $("form").addEventListener("submit", (event) => {
      event.preventDefault();
      generate();
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        if ($("keybox").hidden) generate();
      }
    });
    $("cancel").addEventListener("click", cancel);
    wireSections();
    wireControlnet();
    wireFinishing();
    $("model").addEventListener("change", onModelChange);
    $("seed-random").addEventListener("change", onRandomToggle);
    $("seed-reuse").addEventListener("click", reuseLastSeed);
    $("seed-reuse").disabled = store.get(mine(LAST_SEED)) === null;
    $("copy-seed").addEventListener("click", copySeed);
    $("reuse").addEventListener("click", reuseSettings);
    $("key-form").addEventListener("submit", onKeySubmit);
    $("key-button").addEventListener("click", () => {
      $("keybox").hidden = !$("keybox").hidden;
      $("key-forget").hidden = !store.get(KEY);
      $("key-error").hidden = true;
      if (!$("keybox").hidden) $("key-input").focus();
    });
    $("key-forget").addEventListener("click", () => {
      // Forgetting a key forgets what this browser kept of it: its gallery, its last seed, its prompt.
      store.set(mine(GALLERY), null);
      store.set(mine(LAST_SEED), null);
      store.set(KEY, null);
      forgetPrompt();
      leaveKey();
      $("key-forget").hidden = true;
      $("key-input").focus();
    });
    $("gallery-clear").addEventListener("click", () => {
      store.set(mine(GALLERY), []);
      renderGallery();
    });
    if (store.get(KEY)) $("key-button").hidden = false;
    $("generate").disabled = true;
  }

  wire();
  applySchema(null); // the reference's ranges until the server's document says better
  applyLang();
  renderGallery();
  checkHealth();
  boot();
})();
