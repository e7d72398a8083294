// /ui/people/{id}: one person's faces by page; rename, split selected faces off into a
// new person, unassign them or move them to another person, delete the person.
import { assignFaces, faceGrid, selectionText, splitFaces } from "./facegrid.js";
import {
  api, ApiError, attempt, confirmDialog, fill, notify, personName, personPicker, picture, plural, post, ready,
} from "./ui.js";

const LIMIT = 100;
const id = Number(document.body.dataset.personId);
const rename = document.getElementById("rename");
const split = document.getElementById("split");
const move = document.getElementById("move");
const unassign = document.getElementById("unassign");
const picker = personPicker(move.elements.person, document.getElementById("person-options"));

const grid = faceGrid({
  grid: document.getElementById("faces"),
  nav: document.getElementById("pager"),
  limit: LIMIT,
  fetchPage: (offset, limit) => api(`/persons/${id}/faces?offset=${offset}&limit=${limit}`),
  caption: (face) => `score ${face.score.toFixed(2)}${face.assigned === "manual" ? " · by hand" : ""}`,
  changed(ids) {
    fill(document.getElementById("actions"), { selected: selectionText(ids) });
    for (const button of [split.querySelector("button"), unassign, move.querySelector("button")]) {
      button.disabled = ids.length === 0;
    }
  },
});

async function loadPerson() {
  let person;
  try {
    person = await api(`/persons/${id}?sample=0`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      notify(`Person #${id} no longer exists (merged, deleted, or left without faces).`, "error");
      document.getElementById("actions").hidden = true;
      return null;
    }
    throw error;
  }
  document.title = `${personName(person)} · immich-trt`;
  fill(document.body, {
    title: personName(person),
    faces: plural(person.faceCount, "face"),
    assets: plural(person.assetCount, "photo"),
  });
  rename.elements.name.value = person.name ?? "";
  const portrait = document.getElementById("portrait");
  if (person.representativeFaceId !== null) {
    portrait.hidden = false;
    portrait.alt = personName(person);
    picture(portrait, `/faces/${person.representativeFaceId}/thumbnail`);
  }
  return person;
}

async function load() {
  const person = await attempt(loadPerson);
  if (person) await grid.load();
  ready();
}

rename.addEventListener("submit", async (event) => {
  event.preventDefault();
  const named = await attempt(() => post(`/persons/${id}/name`, { name: rename.elements.name.value }));
  if (named) {
    notify(named.name ? `Renamed to ${named.name}.` : "Name cleared.");
    await load();
  }
});

split.addEventListener("submit", async (event) => {
  event.preventDefault();
  const faceIds = grid.selected();
  const made = await splitFaces(faceIds, split.elements.name.value);
  if (made) {
    grid.clear();
    split.reset();
    notify(`${plural(faceIds.length, "face")} moved to a new person, ${personName(made)} (#${made.id}).`);
    await load();
  }
});

async function assign(personId, done) {
  const faceIds = grid.selected();
  if (!(await assignFaces(faceIds, personId))) return;
  grid.clear();
  notify(done(faceIds.length));
  await load();
}

unassign.addEventListener("click", () => assign(null, (n) => `${plural(n, "face")} unassigned.`));

move.addEventListener("submit", async (event) => {
  event.preventDefault();
  const target = picker.value();
  if (target === null) {
    notify("Choose a person from the list, or type #id.", "error");
    return;
  }
  await assign(target, (n) => `${plural(n, "face")} moved to person #${target}.`);
  move.reset();
});

document.getElementById("delete").addEventListener("click", async () => {
  if (!(await confirmDialog("Delete this person? Their faces become unassigned."))) return;
  const deleted = await attempt(() => api(`/persons/${id}`, { method: "DELETE" }));
  if (deleted) location.assign("/ui/people");
});

load();
