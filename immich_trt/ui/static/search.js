// /ui/search: one box for CLIP text search, OCR substring search and both together
// (ocrWeight), results as thumbnails with the matched text lines' polygons drawn on
// them; face search by uploading a photo, or from a stored face (?face=id).
import {
  api, assetName, attempt, clone, element, field, fill, marked, pager, personName, picture, plural, post, queryInt,
  queryValue, ready, scene, setQuery,
} from "./ui.js";

const LIMIT = 48;
const MAX_K = 1000; // the API's largest k
const form = document.getElementById("search");
const faceForm = document.getElementById("face-search");
const results = document.getElementById("results");
const nav = document.getElementById("pager");
const summary = document.getElementById("summary");
const faceResults = document.getElementById("face-results");
const weight = form.elements.ocrWeight;

function showWeight() {
  fill(form, { weight: Number(weight.value).toFixed(2) });
  document.getElementById("weight-field").hidden = form.elements.mode.value !== "hybrid";
}

function clear() {
  results.replaceChildren();
  faceResults.replaceChildren();
  document.getElementById("query-face").hidden = true;
  nav.hidden = true;
}

// One result: the thumbnail with the matched lines' polygons, its score, the first line.
function card(asset, score, lines) {
  const item = clone("result-card");
  item.dataset.assetId = asset.id;
  const link = field(item, "link");
  link.href = `/ui/assets/${asset.id}`;
  link.title = assetName(asset);
  link.append(scene(asset, { lines }));
  fill(item, { score });
  const line = field(item, "line");
  if (lines.length) {
    line.replaceChildren(...marked(lines[0].text, lines[0].match));
    if (lines.length > 1) line.append(element("span", ` +${lines.length - 1} more`, { class: "muted" }));
  } else {
    line.remove();
  }
  return item;
}

// Paging over a top-k search: k grows with the page (up to the API's limit).
function topPage(found, offset) {
  const shown = found.slice(offset, offset + LIMIT);
  const full = found.length === Math.min(offset + LIMIT, MAX_K) && found.length < MAX_K;
  return { shown, total: full ? offset + LIMIT + 1 : found.length, open: full };
}

async function search(offset) {
  const query = form.elements.q.value.trim();
  const mode = form.elements.mode.value;
  if (!query) return;
  clear();
  summary.textContent = "Searching…";
  let shown;
  let total;
  let open = false;
  if (mode === "ocr") {
    const page = await attempt(() => post("/search/ocr", { query, limit: LIMIT, offset }));
    if (!page) return;
    total = page.total;
    shown = page.items.map((hit) => card(hit.asset, plural(hit.lines.length, "matching line"), hit.lines));
    summary.textContent = `${plural(page.total, "photo")} with “${query}” in their text.`;
  } else {
    const k = Math.min(offset + LIMIT, MAX_K);
    const found = mode === "clip"
      ? await attempt(() => post("/search/text", { query, k }))
      : await attempt(() => post("/search/hybrid", { query, k, ocrWeight: Number(weight.value) }));
    if (!found) return;
    const page = topPage(found.results, offset);
    ({ total, open } = page);
    shown = page.shown.map((hit) => mode === "clip"
      ? card(hit.asset, `similarity ${hit.similarity.toFixed(3)}`, [])
      : card(hit.asset, `score ${hit.score.toFixed(3)}${hit.ocrScore ? " · text match" : ""}`, hit.lines));
    summary.textContent = `Best matches for “${query}” (${found.model}${mode === "hybrid"
      ? `, OCR weight ${Number(weight.value).toFixed(2)}` : ""}).`;
  }
  results.replaceChildren(...shown);
  pager(nav, { total, offset, limit: LIMIT, open }, (next) => {
    setQuery({ offset: next });
    search(next);
  });
  ready();
}

// Face hits: stored faces with their similarity and person.
function faceHits(hits) {
  const list = element("ul", null, { class: "grid faces" });
  list.append(...hits.map((hit) => {
    const item = clone("face-hit");
    item.dataset.faceId = hit.faceId;
    const image = field(item, "picture");
    image.alt = `Face ${hit.faceId}`;
    picture(image, `/faces/${hit.faceId}/thumbnail`);
    field(item, "asset").href = `/ui/assets/${hit.assetId}`;
    const person = field(item, "person");
    if (hit.personId !== null) {
      person.href = `/ui/people/${hit.personId}`;
      person.textContent = personName({ id: hit.personId, name: hit.personName });
    } else {
      person.replaceWith(element("span", "no person", { class: "small muted" }));
    }
    fill(item, { similarity: `similarity ${hit.similarity.toFixed(3)}` });
    return item;
  }));
  return list;
}

function personList(persons) {
  if (!persons.length) return element("p", "None of them belongs to a person yet.", { class: "muted" });
  const list = element("p", "Likely: ");
  persons.forEach((p, i) => {
    if (i) list.append(", ");
    list.append(element("a", `${personName({ id: p.personId, name: p.personName })} (${p.similarity.toFixed(2)})`,
      { href: `/ui/people/${p.personId}` }));
  });
  return list;
}

async function searchByFace(faceId) {
  clear();
  summary.textContent = "Searching…";
  const found = await attempt(() => post("/search/face/by-id", { faceId, k: LIMIT }));
  if (!found) return;
  const query = document.getElementById("query-face");
  const image = element("img", null, { class: "face", alt: `Face ${faceId}`, width: 100, height: 100 });
  picture(image, `/faces/${faceId}/thumbnail`);
  const link = element("a", null, { href: `/ui/assets/${found.face.assetId}` });
  link.append(image);
  query.replaceChildren(link, element("span", `Faces like face #${faceId}`));
  query.hidden = false;
  summary.textContent = `${plural(found.results.length, "similar face")}.`;
  faceResults.replaceChildren(personList(found.persons), faceHits(found.results));
  ready();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  setQuery({ q: form.elements.q.value.trim(), mode: form.elements.mode.value, w: weight.value, face: "", offset: 0 });
  search(0);
});

faceForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = faceForm.elements.image.files[0];
  if (!file) return;
  clear();
  summary.textContent = "Looking for faces…";
  const body = new FormData();
  body.append("image", file);
  body.append("k", String(LIMIT));
  const found = await attempt(() => api("/search/face", { method: "POST", form: body }));
  if (!found) return;
  summary.textContent = `${plural(found.faces.length, "face")} found in ${file.name}.`;
  faceResults.replaceChildren(...found.faces.flatMap((face, i) => [
    element("h2", `Face ${i + 1} (detector score ${face.score.toFixed(2)})`),
    personList(face.persons),
    faceHits(face.results),
  ]));
  ready();
});

for (const radio of form.elements.mode) radio.addEventListener("change", showWeight);
weight.addEventListener("input", showWeight);

// start from the query string: ?q=&mode=&w=&offset= or ?face=
form.elements.q.value = queryValue("q");
form.elements.mode.value = ["clip", "ocr", "hybrid"].includes(queryValue("mode")) ? queryValue("mode") : "clip";
weight.value = queryValue("w", "0.5");
showWeight();
const face = queryInt("face");
if (face) searchByFace(face);
else if (form.elements.q.value) search(queryInt("offset"));
else ready();
