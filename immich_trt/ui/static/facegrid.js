// A page of selectable face thumbnails (a person's faces, the unassigned faces).
import { attempt, clone, field, fill, pager, picture, plural, post, queryInt, setQuery } from "./ui.js";

// grid: <ul>, nav: <nav class="pager">, fetchPage(offset, limit) -> {total, items: [face]},
// caption(face) -> text, changed(selectedIds) after every selection change or load.
export function faceGrid({ grid, nav, limit, fetchPage, caption, changed }) {
  let offset = queryInt("offset");
  const selected = new Set();

  function card(face) {
    const item = clone("face-card");
    item.dataset.faceId = face.id;
    const image = field(item, "picture");
    image.alt = `Face ${face.id}`;
    picture(image, `/faces/${face.id}/thumbnail`);
    field(item, "asset").href = `/ui/assets/${face.assetId}`;
    field(item, "similar").href = `/ui/search?face=${face.id}`;
    fill(item, { caption: caption(face) });
    const box = field(item, "select");
    box.setAttribute("aria-label", `Select face ${face.id}`);
    box.checked = selected.has(face.id);
    box.addEventListener("change", () => {
      if (box.checked) selected.add(face.id);
      else selected.delete(face.id);
      item.classList.toggle("selected", box.checked);
      changed([...selected]);
    });
    return item;
  }

  async function load() {
    const page = await attempt(() => fetchPage(offset, limit));
    if (page) {
      if (page.items.length === 0 && offset > 0 && page.total > 0) {
        offset = Math.max(0, Math.floor((page.total - 1) / limit) * limit);
        setQuery({ offset });
        return load();
      }
      grid.replaceChildren(...page.items.map(card));
      pager(nav, { total: page.total, offset, limit }, (next) => {
        offset = next;
        setQuery({ offset });
        load();
      });
    }
    changed([...selected]);
    return page;
  }

  return {
    load,
    selected: () => [...selected],
    clear() {
      selected.clear();
      changed([]);
    },
  };
}

export function selectionText(ids) {
  return ids.length ? `${plural(ids.length, "face")} selected` : "No face selected";
}

// Give each face of faceIds to personId (null: unassign it), one call a face; false when
// one failed (its error shown, the rest not sent).
export async function assignFaces(faceIds, personId) {
  for (const faceId of faceIds) {
    if (!(await attempt(() => post(`/faces/${faceId}/assign`, { personId })))) return false;
  }
  return true;
}

// Make a new person of faceIds, named when name is not blank; the person, or undefined
// when the call failed (its error shown).
export function splitFaces(faceIds, name) {
  const trimmed = name.trim();
  return attempt(() => post("/persons/split", { faceIds, ...(trimmed ? { name: trimmed } : {}) }));
}
