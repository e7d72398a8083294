// /ui/faces/unassigned: faces without a person, by page; assign the selected ones to a
// person, or make a new person of them.
import { assignFaces, faceGrid, selectionText, splitFaces } from "./facegrid.js";
import { api, fill, notify, personName, personPicker, plural, ready } from "./ui.js";

const LIMIT = 100;
const assignForm = document.getElementById("assign");
const split = document.getElementById("split");
const picker = personPicker(assignForm.elements.person, document.getElementById("person-options"));

const grid = faceGrid({
  grid: document.getElementById("faces"),
  nav: document.getElementById("pager"),
  limit: LIMIT,
  fetchPage: async (offset, limit) => {
    const page = await api(`/faces/unassigned?offset=${offset}&limit=${limit}`);
    fill(document.body, { total: `(${page.total})` });
    return page;
  },
  caption: (face) => `score ${face.score.toFixed(2)}${face.assigned === "manual" ? " · unassigned by hand" : ""}`,
  changed(ids) {
    fill(document.getElementById("actions"), { selected: selectionText(ids) });
    assignForm.querySelector("button").disabled = ids.length === 0;
    split.querySelector("button").disabled = ids.length === 0;
  },
});

async function load() {
  await grid.load();
  ready();
}

assignForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const personId = picker.value();
  if (personId === null) {
    notify("Choose a person from the list, or type #id.", "error");
    return;
  }
  const faceIds = grid.selected();
  if (!(await assignFaces(faceIds, personId))) return;
  grid.clear();
  assignForm.reset();
  notify(`${plural(faceIds.length, "face")} assigned to person #${personId}.`);
  await load();
});

split.addEventListener("submit", async (event) => {
  event.preventDefault();
  const faceIds = grid.selected();
  const made = await splitFaces(faceIds, split.elements.name.value);
  if (made) {
    grid.clear();
    split.reset();
    notify(`New person ${personName(made)} (#${made.id}) with ${plural(faceIds.length, "face")}.`);
    await load();
  }
});

load();
