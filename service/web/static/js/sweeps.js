// The sweeps list: every sweep with its name, tags, base spec, grid, progress and critical depths (GET /v1/sweeps).
import { BASE, el, getJSON, shortId, tagChips } from "./common.js";

const form = document.getElementById("sweep-filters");
const tbody = document.querySelector("#sweeps tbody");
const summary = document.getElementById("summary");
// While a listed sweep is unfinished the page re-reads the list this often.
const LIVE_MS = 3000;
let timer = null;

const initial = new URLSearchParams(location.search);
for (const field of form.elements) if (field.name && initial.has(field.name)) field.value = initial.get(field.name);

const pairs = (object) =>
  Object.entries(object)
    .map(([key, value]) => `${key}=${Array.isArray(value) ? value.join("/") : value}`)
    .join(", ");

function row(sweep) {
  const finished = ["succeeded", "failed", "cancelled"].reduce((sum, s) => sum + (sweep.counts[s] || 0), 0);
  const critical = sweep.critical_depths.map(
    (c) => `${pairs(c.config) || "all"}: ${c.critical_depth === null ? "—" : c.critical_depth}`,
  );
  const href = `${BASE}/sweeps/${encodeURIComponent(sweep.id)}`;
  return el(
    "tr",
    { dataset: { id: sweep.id } },
    el("td", {}, el("a", { href }, el("code", {}, shortId(sweep.id)))),
    el("td", { class: "col-name" }, sweep.name ? el("a", { href }, sweep.name) : "", sweep.tags.length ? tagChips(sweep.tags) : null),
    el("td", { class: "col-base" }, pairs(sweep.base) || "defaults"),
    el("td", { class: "col-grid" }, pairs(sweep.grid)),
    el(
      "td",
      { class: "col-progress" },
      el("progress", { max: String(sweep.size), value: String(finished) }),
      ` ${finished}/${sweep.size}${sweep.counts.failed ? ` (${sweep.counts.failed} failed)` : ""}`,
    ),
    el("td", { class: "col-critical" }, critical.join("; ")),
    el("td", {}, new Date(sweep.created_at).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" })),
  );
}

async function load() {
  clearTimeout(timer);
  const params = new URLSearchParams();
  for (const field of form.elements) if (field.name && field.value.trim()) params.set(field.name, field.value.trim());
  history.replaceState(null, "", params.toString() ? `?${params}` : location.pathname);
  params.set("limit", "100");
  let list;
  try {
    list = await getJSON(`/v1/sweeps?${params}`);
  } catch (error) {
    summary.textContent = `Cannot list sweeps: ${error.message}`;
    return;
  }
  tbody.replaceChildren(...list.items.map(row));
  summary.textContent = list.total
    ? `${list.total} sweep${list.total === 1 ? "" : "s"}${list.total > list.items.length ? `, the newest ${list.items.length} shown` : ""}`
    : "No sweeps yet: submit one with `graddiag sweep` or POST /v1/sweeps.";
  if (list.items.some((sweep) => !sweep.done)) timer = setTimeout(load, LIVE_MS);
}

let typing = null;
form.addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(load, 250);
});
form.addEventListener("submit", (event) => event.preventDefault());
load();
