// /ui/duplicates: duplicate groups side by side (exact copies, near duplicates), the
// suggested keeper marked; resolve (keep one, hide the others) and undo; the similarity
// threshold finds the groups again and says how many there are.
import {
  api, assetName, attempt, bytes, clone, field, fill, notify, pager, picture, plural, post, queryInt, queryValue,
  ready, setQuery,
} from "./ui.js";

const LIMIT = 20;
const list = document.getElementById("groups");
const tabs = document.querySelectorAll(".tabs button");
const resolvedBox = document.getElementById("resolved");
const find = document.getElementById("find");
const slider = document.getElementById("threshold");
const sliderValue = document.getElementById("threshold-value");

let kind = queryValue("kind");
let offset = queryInt("offset");
resolvedBox.checked = queryValue("resolved") === "1";
slider.value = queryValue("threshold", document.body.dataset.threshold);

function showThreshold() {
  sliderValue.value = Number(slider.value).toFixed(3);
}

function member(group, asset) {
  const item = clone("member-card");
  item.dataset.assetId = asset.id;
  field(item, "link").href = `/ui/assets/${asset.id}`;
  const image = field(item, "picture");
  image.alt = assetName(asset);
  picture(image, `/assets/${asset.id}/thumbnail`);
  fill(item, {
    resolution: `${asset.width} × ${asset.height}`,
    size: bytes(asset.size),
    similarity: asset.similarity === null ? "–" : asset.similarity.toFixed(4),
    name: (asset.filenames.length ? asset.filenames : asset.refs).join("\n") || `#${asset.id}`,
  });
  field(item, "name").title = asset.refs.join("\n");
  field(item, "keeper").hidden = asset.id !== group.suggestedKeeper || group.resolved;
  field(item, "kept").hidden = !(group.resolved && asset.id === group.keeper);
  field(item, "hidden").hidden = !asset.hidden;
  item.classList.toggle("suggested", asset.id === group.suggestedKeeper);
  const keep = field(item, "keep");
  keep.hidden = group.resolved || group.members.length < 2;
  keep.addEventListener("click", () => resolve(group, asset.id));
  return item;
}

function card(group) {
  const item = clone("group-card");
  item.dataset.groupId = group.id;
  const what = group.kind === "exact"
    ? `Exact copy · one file under ${plural(group.members[0]?.refs.length ?? 0, "name")}`
    : `Near duplicates · ${plural(group.members.length, "photo")}`;
  fill(item, { title: `${what} · group #${group.id}`, state: group.resolved ? "resolved" : "open" });
  field(item, "state").dataset.state = group.resolved ? "resolved" : "open";
  const resolveButton = field(item, "resolve");
  resolveButton.hidden = group.resolved;
  if (group.kind === "exact") resolveButton.textContent = "Mark as reviewed";
  resolveButton.addEventListener("click", () => resolve(group, null));
  const undo = field(item, "undo");
  undo.hidden = !group.resolved;
  undo.addEventListener("click", () => unresolve(group));
  field(item, "members").replaceChildren(...group.members.map((asset) => member(group, asset)));
  return item;
}

async function load() {
  for (const tab of tabs) tab.setAttribute("aria-pressed", String(tab.dataset.kind === kind));
  const query = `offset=${offset}&limit=${LIMIT}&includeResolved=${resolvedBox.checked}${kind ? `&kind=${kind}` : ""}`;
  const page = await attempt(() => api(`/duplicates/groups?${query}`));
  if (page) {
    fill(document.body, { total: `(${page.total})` });
    list.replaceChildren(...page.items.map(card));
    pager(document.getElementById("pager"), { total: page.total, offset, limit: LIMIT }, (next) => {
      offset = next;
      setQuery({ offset });
      load();
    });
  }
  ready();
}

async function resolve(group, keep) {
  const done = await attempt(() => post("/duplicates/resolve", { groupId: group.id, ...(keep ? { keep } : {}) }));
  if (done) {
    const hidden = done.members.filter((m) => m.hidden).length;
    notify(`Group #${group.id} resolved: kept #${done.keeper}, ${plural(hidden, "photo")} hidden.`);
    await load();
  }
}

async function unresolve(group) {
  const done = await attempt(() => post("/duplicates/resolve", { groupId: group.id, undo: true }));
  if (done) {
    notify(`Group #${group.id} is open again; its photos are visible.`);
    await load();
  }
}

for (const tab of tabs) {
  tab.addEventListener("click", () => {
    kind = tab.dataset.kind;
    offset = 0;
    setQuery({ kind, offset });
    load();
  });
}

resolvedBox.addEventListener("change", () => {
  offset = 0;
  setQuery({ resolved: resolvedBox.checked ? "1" : "", offset });
  load();
});

async function findAgain() {
  const threshold = Number(slider.value);
  document.getElementById("found").textContent = `Grouping at similarity ≥ ${threshold.toFixed(3)}…`;
  const found = await attempt(() => post("/duplicates/find", { threshold }));
  if (found) {
    document.getElementById("found").textContent = `${plural(found.groups, "open group")} `
      + `(${plural(found.assets, "photo")}) at similarity ≥ ${found.threshold.toFixed(3)}.`;
    setQuery({ threshold: threshold === Number(document.body.dataset.threshold) ? "" : threshold, offset: 0 });
    offset = 0;
    await load();
  }
}

slider.addEventListener("input", showThreshold);
slider.addEventListener("change", findAgain);
find.addEventListener("submit", (event) => {
  event.preventDefault();
  findAgain();
});

showThreshold();
load();