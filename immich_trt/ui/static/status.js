// /ui: runtime and Triton health, loaded models, store and ingest counts, the
// OpenSearch mirror's backlog, and a warning when test-pack models are loaded.
import { api, attempt, element, field, fill, number, ready } from "./ui.js";

const REFRESH_MS = 30000;

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "never";
}

function render(status) {
  const runtime = status.runtime ?? {};
  fill(document.getElementById("runtime"), {
    name: runtime.name === "onnxruntime" ? "ONNX Runtime (in-process)" : "Triton",
    reason: runtime.reason ?? "",
    triton: runtime.name === "triton" ? (runtime.tritonUrl ?? "launched by this server") : "not used",
    ready: runtime.ready ? "ready" : "not ready",
  });
  field(document.getElementById("runtime"), "ready").dataset.ok = String(Boolean(runtime.ready));

  const models = document.getElementById("models");
  const loaded = status.models ?? [];
  field(models, "none").hidden = loaded.length > 0;
  field(models, "list").replaceChildren(
    ...loaded.map((m) => element("li", `${m.name} · ${m.task} ${m.type}`)),
  );

  fill(document.getElementById("store"), {
    assets: number(status.assets),
    faces: number(status.faces),
    persons: number(status.persons),
    ocrLines: number(status.ocrLines),
    duplicateGroups: number(status.duplicateGroups),
    schemaVersion: status.schemaVersion,
  });
  const ingested = status.ingested ?? {};
  fill(document.getElementById("ingested"), Object.fromEntries(
    ["clip", "faces", "ocr", "thumbnail", "hidden"].map((k) => [k, number(ingested[k] ?? 0)]),
  ));

  const mirror = status.opensearch;
  fill(document.getElementById("mirror"), mirror === null || mirror === undefined
    ? { state: "not configured (OPENSEARCH_URL)", backlog: "–", outbox: number(status.outbox), lastSuccess: "–",
      lastError: "–" }
    : { state: mirror.lastError ? "failing" : "mirroring", backlog: mirror.backlog ?? "not drained yet",
      outbox: number(status.outbox), lastSuccess: when(mirror.lastSuccess), lastError: mirror.lastError ?? "none" });

  const testPack = status.testPack ?? [];
  const banner = document.getElementById("test-pack-banner");
  banner.hidden = testPack.length === 0;
  fill(banner, { models: testPack.join(", ") });
}

async function refresh() {
  const status = await attempt(() => api("/status"));
  if (status) render(status);
  ready();
}

document.getElementById("refresh").addEventListener("click", refresh);
setInterval(refresh, REFRESH_MS);
refresh();
