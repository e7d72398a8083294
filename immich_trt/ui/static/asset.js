// /ui/assets/{ref}: one asset (any id the API returns: its number, a caller's id, a
// path, an imohash) with its face boxes and OCR polygons over the stored thumbnail, its
// tasks, faces, text lines and duplicate groups.
import {
  api, ApiError, assetName, attempt, bytes, clone, element, field, fill, notify, personName, picture, ready, scene,
} from "./ui.js";

const ref = document.body.dataset.ref;
const holder = document.getElementById("scene");

async function personNames(faces) {
  const ids = [...new Set(faces.map((f) => f.personId).filter((id) => id !== null))];
  const persons = await Promise.all(ids.map((id) => api(`/persons/${id}?sample=0`).catch(() => ({ id, name: null }))));
  return new Map(persons.map((p) => [p.id, personName(p)]));
}

function faceCard(face, names) {
  const item = clone("asset-face");
  item.dataset.faceId = face.id;
  const image = field(item, "picture");
  image.alt = `Face ${face.id}`;
  picture(image, `/faces/${face.id}/thumbnail`);
  const person = field(item, "person");
  if (face.personId !== null) {
    person.href = `/ui/people/${face.personId}`;
    person.textContent = names.get(face.personId);
  } else {
    person.replaceWith(element("span", "unassigned", { class: "small muted" }));
  }
  field(item, "similar").href = `/ui/search?face=${face.id}`;
  // hovering a face card shows its box
  const box = () => holder.querySelector(`[data-face-id="${face.id}"]`);
  item.addEventListener("mouseenter", () => box()?.classList.add("hover"));
  item.addEventListener("mouseleave", () => box()?.classList.remove("hover"));
  return item;
}

function lineItem(line) {
  const item = element("li", line.text);
  item.dataset.lineId = line.id;
  item.title = `detection ${line.boxScore.toFixed(2)} · recognition ${line.textScore.toFixed(2)}`;
  const polygon = () => holder.querySelector(`[data-line-id="${line.id}"]`);
  item.addEventListener("mouseenter", () => polygon()?.classList.add("hover"));
  item.addEventListener("mouseleave", () => polygon()?.classList.remove("hover"));
  return item;
}

async function duplicates(asset) {
  const groups = await api(`/duplicates/groups?assetId=${asset.id}&includeResolved=true&limit=50`);
  field(document.body, "noDuplicates").hidden = groups.total > 0;
  document.getElementById("duplicates").replaceChildren(...groups.items.map((group) => {
    const item = clone("duplicate-group");
    const link = field(item, "link");
    link.href = `/ui/duplicates?kind=${group.kind}${group.resolved ? "&resolved=1" : ""}`;
    link.textContent = `${group.kind === "exact" ? "Exact copy" : "Near duplicates"} · group #${group.id}`;
    fill(item, { state: group.resolved ? `resolved, kept #${group.keeper}` : "open" });
    field(item, "members").replaceChildren(...group.members.filter((m) => m.id !== asset.id).map((m) => {
      const other = element("a", null, { href: `/ui/assets/${m.id}`, title: assetName(m) });
      const image = element("img", null, { class: "thumb small", alt: assetName(m), width: 64, height: 64 });
      picture(image, `/assets/${m.id}/thumbnail`);
      other.append(image);
      return other;
    }));
    return item;
  }));
}

async function load() {
  let asset;
  try {
    asset = await api(`/assets/${encodeURIComponent(ref)}`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) notify(`No asset “${ref}” is stored.`, "error");
    else throw error;
    return;
  }
  document.title = `${assetName(asset)} · immich-trt`;
  const names = await personNames(asset.faces);
  fill(document.body, {
    title: assetName(asset),
    id: asset.id,
    resolution: `${asset.width} × ${asset.height}`,
    size: bytes(asset.size),
    refs: asset.refs.join("\n"),
    imohash: asset.imohash,
    hidden: asset.hidden ? "yes (a duplicate resolution hid it)" : "no",
    faceCount: `(${asset.faces.length})`,
    lineCount: `(${asset.ocr.length})`,
  });
  holder.replaceChildren(scene(asset, {
    faces: asset.faces.map((f) => ({ ...f, label: f.personId === null ? "unassigned" : names.get(f.personId) })),
    lines: asset.ocr,
  }));
  document.getElementById("tasks").replaceChildren(
    ...Object.entries(asset.tasks).map(([task, models]) => element("li", `${task}: ${models.join(", ")}`)),
  );
  document.getElementById("faces").replaceChildren(...asset.faces.map((face) => faceCard(face, names)));
  document.getElementById("lines").replaceChildren(...asset.ocr.map(lineItem));
  field(document.body, "noText").hidden = asset.ocr.length > 0;
  await duplicates(asset);
  document.body.dataset.assetId = asset.id;
}

for (const [box, layer] of [["show-faces", "faces"], ["show-text", "text"]]) {
  document.getElementById(box).addEventListener("change", (event) => {
    holder.querySelector(`svg g.${layer}`)?.classList.toggle("off", !event.target.checked);
  });
}

attempt(load).finally(ready);
