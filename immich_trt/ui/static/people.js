// /ui/people: persons with their representative face and face count, by page;
// merge the selected ones, cluster new faces or recluster everything.
import {
  api, attempt, clone, confirmDialog, field, fill, notify, number, pager, personName, picture, plural, post,
  queryInt, queryValue, ready, setQuery,
} from "./ui.js";

const LIMIT = 60;
const grid = document.getElementById("people");
const mergeButton = document.getElementById("merge");
const filter = document.getElementById("filter");
let offset = queryInt("offset");
let name = queryValue("name");
let shown = [];
const selected = new Set();

filter.elements.name.value = name;

function card(person) {
  const item = clone("person-card");
  const href = `/ui/people/${person.id}`;
  field(item, "link").href = href;
  field(item, "link2").href = href;
  fill(item, { name: personName(person), faces: plural(person.faceCount, "face") });
  item.dataset.personId = person.id;
  const image = field(item, "picture");
  image.alt = personName(person);
  if (person.representativeFaceId !== null) picture(image, `/faces/${person.representativeFaceId}/thumbnail`);
  else image.classList.add("missing");
  const box = field(item, "select");
  box.checked = selected.has(person.id);
  box.setAttribute("aria-label", `Select ${personName(person)}`);
  box.addEventListener("change", () => {
    if (box.checked) selected.add(person.id);
    else selected.delete(person.id);
    mergeButton.disabled = selected.size < 2;
  });
  return item;
}

async function load() {
  const query = name ? `&name=${encodeURIComponent(name)}` : "";
  const page = await attempt(() => api(`/persons?offset=${offset}&limit=${LIMIT}${query}`));
  if (page) {
    shown = page.items;
    fill(document.body, { total: `(${page.total})` });
    grid.replaceChildren(...page.items.map(card));
    pager(document.getElementById("pager"), { total: page.total, offset, limit: LIMIT }, (next) => {
      offset = next;
      setQuery({ offset });
      load();
    });
  }
  mergeButton.disabled = selected.size < 2;
  ready();
}

filter.addEventListener("submit", (event) => {
  event.preventDefault();
  name = filter.elements.name.value.trim();
  offset = 0;
  setQuery({ name, offset });
  load();
});

mergeButton.addEventListener("click", async () => {
  // the target: the selected person shown first (most faces), else the lowest id
  const ids = [...selected];
  const target = shown.find((p) => selected.has(p.id))?.id ?? Math.min(...ids);
  const sources = ids.filter((id) => id !== target);
  const targetPerson = shown.find((p) => p.id === target);
  const label = targetPerson ? personName(targetPerson) : `Person #${target}`;
  if (!(await confirmDialog(`Merge ${plural(sources.length, "person", "people")} into ${label}? This cannot be undone.`))) {
    return;
  }
  const merged = await attempt(() => post("/persons/merge", { targetId: target, sourceIds: sources }));
  if (merged) {
    selected.clear();
    notify(`Merged into ${personName(merged)}: ${plural(merged.faceCount, "face")}.`);
    await load();
  }
});

async function cluster(full) {
  if (full && !(await confirmDialog("Recluster every face not assigned by hand? Names and manual work are kept."))) {
    return;
  }
  notify(full ? "Reclustering…" : "Clustering new faces…");
  const result = await attempt(() => post("/faces/cluster", { full }));
  if (result) {
    notify(`${plural(result.processed, "face")} considered, ${number(result.assigned)} given a person, `
      + `${plural(result.newPersons, "new person", "new people")}.`);
    await load();
  }
}

document.getElementById("cluster").addEventListener("click", () => cluster(false));
document.getElementById("recluster").addEventListener("click", () => cluster(true));
load();
