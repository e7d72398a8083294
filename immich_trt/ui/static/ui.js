// Shared parts of the immich-trt pages: the /v1 client (with the API key), pictures
// loaded when they come into view, templates, paging, dialogs and overlays.
// No framework: every page fills the <template> elements of its server-rendered shell.

const KEY_NAME = "immich-trt-api-key";
const AUTH = document.body.dataset.auth; // "key": /v1 needs the Bearer key; "loopback": no key

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

// ------------------------------------------------------------------ the API key

function storedKey() {
  return sessionStorage.getItem(KEY_NAME) ?? localStorage.getItem(KEY_NAME);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  showForget();
}

function showForget() {
  const button = document.getElementById("forget-key");
  if (button) button.hidden = storedKey() === null;
}

let asking = null;

// Ask for the key once, however many calls wait for it; resolves when one is stored,
// rejects when the dialog is dismissed.
function askKey(message) {
  if (asking === null) {
    asking = new Promise((resolve, reject) => {
      const dialog = document.getElementById("key-dialog");
      const form = dialog.querySelector("form");
      form.reset();
      field(dialog, "message").textContent = message;
      dialog.addEventListener("close", () => {
        const key = form.elements.key.value.trim();
        if (dialog.returnValue === "ok" && key) {
          (form.elements.remember.checked ? localStorage : sessionStorage).setItem(KEY_NAME, key);
          form.reset();
          showForget();
          resolve();
        } else {
          reject(new ApiError(401, "the API key is needed to read this server's data"));
        }
      }, { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    }).finally(() => { asking = null; });
  }
  return asking;
}

// ------------------------------------------------------------------ the /v1 client

// Call /v1 + path. `json` is sent as a JSON body, `form` (FormData) as multipart;
// answers the parsed JSON (or a Blob with as: "blob"). Throws ApiError for any
// non-2xx answer; a 401 asks for the key and tries again.
export async function api(path, { method = "GET", json, form, as = "json" } = {}) {
  if (AUTH === "key" && storedKey() === null) {
    await askKey("This server needs its API key to show its data.");
  }
  for (;;) {
    const headers = {};
    const key = storedKey();
    if (key !== null) headers.Authorization = `Bearer ${key}`;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    const response = await fetch(`/v1${path}`, { method, headers, body });
    if (response.status === 401 && AUTH === "key") {
      // forget the key only if it is still the one refused (calls in flight may answer late)
      if (storedKey() === key) forgetKey();
      if (storedKey() === null) await askKey("That key was refused. Enter the server's IMMICH_TRT_API_KEY.");
      continue;
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail ?? detail;
      } catch {
        // not JSON: keep the status text
      }
      throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return as === "blob" ? response.blob() : response.json();
  }
}

export const post = (path, json) => api(path, { method: "POST", json });

// ------------------------------------------------------------------ pictures

// Pictures load when they come near the viewport. Without a key the browser fetches
// them itself (an <img> also gets loading="lazy"); with a key a browser cannot put the
// Bearer header on <img src>, so they are fetched with it and shown from a blob: URL.
const observer = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (entry.isIntersecting) {
      observer.unobserve(entry.target);
      load(entry.target);
    }
  }
}, { rootMargin: "400px" });

async function load(element) {
  const path = element.dataset.src;
  let url = `/v1${path}`;
  if (AUTH === "key") {
    try {
      url = URL.createObjectURL(await api(path, { as: "blob" }));
    } catch {
      element.classList.add("missing");
      return;
    }
  }
  element.addEventListener("load", () => { element.dataset.loaded = "true"; }, { once: true });
  element.addEventListener("error", () => element.classList.add("missing"), { once: true });
  if (element instanceof SVGImageElement) {
    element.setAttribute("href", url);
  } else {
    if (url.startsWith("blob:")) element.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
    element.src = url;
  }
}

// Show the /v1 picture at `path` (e.g. "/faces/3/thumbnail") in an <img> or SVG <image>.
export function picture(element, path) {
  element.dataset.src = path;
  if (element instanceof HTMLImageElement) element.loading = "lazy";
  observer.observe(element);
}

// ------------------------------------------------------------------ templates

export function field(root, name) {
  return root.querySelector(`[data-f="${name}"]`);
}

// A copy of the first element of <template id="id">.
export function clone(id) {
  return document.getElementById(id).content.firstElementChild.cloneNode(true);
}

// Set the text of every [data-f=name] under root from values; returns root.
export function fill(root, values) {
  for (const [name, value] of Object.entries(values)) {
    for (const element of root.querySelectorAll(`[data-f="${name}"]`)) {
      element.textContent = value ?? "";
    }
  }
  return root;
}

export function element(tag, text, attributes = {}) {
  const made = document.createElement(tag);
  if (text !== undefined && text !== null) made.textContent = text;
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
  return made;
}

// ------------------------------------------------------------------ notices and dialogs

export function notify(text, kind = "info") {
  const notice = document.getElementById("notice");
  notice.textContent = text;
  notice.dataset.kind = kind;
  notice.hidden = false;
}

export function failed(error) {
  notify(error instanceof ApiError ? `Failed (${error.status}): ${error.detail}` : `Failed: ${error}`, "error");
}

// Run an action, report its error on the page (never throws).
export async function attempt(action) {
  try {
    return await action();
  } catch (error) {
    failed(error);
    return undefined;
  }
}

export function confirmDialog(text) {
  const dialog = document.getElementById("confirm-dialog");
  field(dialog, "text").textContent = text;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

// Mark the page as filled (tests and screenshots wait for it).
export function ready() {
  document.body.dataset.ready = String(Number(document.body.dataset.ready ?? 0) + 1);
}

// ------------------------------------------------------------------ paging and the query string

export function queryValue(name, fallback = "") {
  return new URLSearchParams(location.search).get(name) ?? fallback;
}

export function queryInt(name, fallback = 0) {
  const value = Number.parseInt(queryValue(name, ""), 10);
  return Number.isFinite(value) && value >= 0 ? value : fallback;
}

// Replace the query string (no navigation): the page can be reloaded or shared as it is.
export function setQuery(values) {
  const query = new URLSearchParams(location.search);
  for (const [name, value] of Object.entries(values)) {
    if (value === "" || value === null || value === undefined || value === 0) query.delete(name);
    else query.set(name, String(value));
  }
  const search = query.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
}

// Fill <nav class="pager"> for a page of `limit` items from `offset` out of `total`
// (`open`: at least `total`, the end unknown); go(offset) shows another page.
export function pager(nav, { total, offset, limit, open = false }, go) {
  const previous = element("button", "‹ Previous", { type: "button" });
  previous.disabled = offset <= 0;
  previous.addEventListener("click", () => go(Math.max(0, offset - limit)));
  const next = element("button", "Next ›", { type: "button" });
  next.disabled = offset + limit >= total;
  next.addEventListener("click", () => go(offset + limit));
  const last = Math.min(offset + limit, total);
  const label = total === 0 ? "Nothing here" : `${offset + 1}–${last}${open ? "" : ` of ${total}`}`;
  nav.replaceChildren(previous, element("span", label, { class: "muted" }), next);
  nav.hidden = total <= limit && offset === 0;
}

// ------------------------------------------------------------------ formatting

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KB", "MB", "GB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export const number = (n) => new Intl.NumberFormat().format(n);
export const plural = (n, one, many = `${one}s`) => `${number(n)} ${n === 1 ? one : many}`;

// The name a person is shown by.
export const personName = (person) => person.name || `Person #${person.id}`;

// The file name of an asset summary (or its first ref, or its id).
export function assetName(asset) {
  const name = asset.filenames?.[0] ?? asset.refs?.find((ref) => !ref.startsWith("imohash:"));
  return name ?? `Asset #${asset.id}`;
}

// Text with the characters [start, end) in a <mark>, as nodes for an element.
export function marked(text, match) {
  if (!match) return [document.createTextNode(text)];
  const [start, end] = match;
  return [
    document.createTextNode(text.slice(0, start)),
    element("mark", text.slice(start, end)),
    document.createTextNode(text.slice(end)),
  ];
}

// ------------------------------------------------------------------ overlays

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}) {
  const made = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) made.setAttribute(name, value);
  return made;
}

// An <svg> of the asset's stored thumbnail in the asset's own pixel space
// (width x height of the image the models saw), with face boxes (pixels) and OCR
// polygons (normalised 0..1) on top. faces: [{id, box, label}], lines: [{id, polygon,
// text, match}]; matched lines get the class "match".
export function scene(asset, { faces = [], lines = [] } = {}) {
  const { width, height } = asset;
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "scene",
    role: "img",
    "aria-label": assetName(asset),
    "data-width": width,
    "data-height": height,
  });
  const image = svg("image", { x: 0, y: 0, width, height, preserveAspectRatio: "none" });
  root.append(image);
  picture(image, `/assets/${asset.id}/thumbnail`);
  const faceLayer = svg("g", { class: "faces" });
  for (const face of faces) {
    const { x1, y1, x2, y2 } = face.box;
    const rect = svg("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1, class: "face-box",
      "data-face-id": face.id });
    rect.append(svg("title"));
    rect.firstChild.textContent = face.label ?? "";
    faceLayer.append(rect);
  }
  const textLayer = svg("g", { class: "text" });
  for (const line of lines) {
    const points = [];
    for (let i = 0; i < 8; i += 2) points.push(`${line.polygon[i] * width},${line.polygon[i + 1] * height}`);
    const polygon = svg("polygon", { points: points.join(" "), class: line.match ? "ocr match" : "ocr",
      "data-line-id": line.id });
    polygon.append(svg("title"));
    polygon.firstChild.textContent = line.text;
    textLayer.append(polygon);
  }
  root.append(textLayer, faceLayer);
  return root;
}

// ------------------------------------------------------------------ person picker

// Fill <datalist> with persons whose name contains what is typed into `input`
// ("Name (#id)"); value() answers the chosen person's id (a typed "#12" or "12" too),
// or null.
export function personPicker(input, datalist) {
  let timer = 0;
  let known = [];
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const typed = input.value.trim();
      if (/^#?\d+$/.test(typed)) return;
      const query = typed ? `&name=${encodeURIComponent(typed.replace(/\s*\(#\d+\)$/, ""))}` : "";
      const found = await attempt(() => api(`/persons?limit=20${query}`));
      if (!found) return;
      known = found.items;
      datalist.replaceChildren(...known.map((p) => element("option", null, { value: `${personName(p)} (#${p.id})` })));
    }, 200);
  });
  return {
    value() {
      const typed = input.value.trim();
      const id = typed.match(/^#?(\d+)$/) ?? typed.match(/\(#(\d+)\)$/);
      if (id) return Number(id[1]);
      const exact = known.filter((p) => p.name && p.name.toLowerCase() === typed.toLowerCase());
      return exact.length === 1 ? exact[0].id : null;
    },
  };
}

// ------------------------------------------------------------------ start-up

document.getElementById("forget-key")?.addEventListener("click", () => {
  forgetKey();
  notify("The API key was forgotten by this browser.");
});
showForget();
