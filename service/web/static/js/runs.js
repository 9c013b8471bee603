// The runs table: filters and sort kept in the URL, pages of GET /v1/runs, live status, keyboard use.
import { BASE, FINISHED, el, findingChips, fmt, getJSON, modelLabel, runHref, setupParts, shortId, statusBadge, tagChips, verdictBadge } from "./common.js";

const LIMIT = 25;
// While a listed run is queued or running the page re-reads the list this often.
const LIVE_MS = 2000;

const form = document.getElementById("filters");
const table = document.getElementById("runs");
const tbody = table.querySelector("tbody");
const summary = document.getElementById("summary");
const compareButton = document.getElementById("compare-selected");
const prev = document.getElementById("prev");
const next = document.getElementById("next");
const page = document.getElementById("page");

const initial = new URLSearchParams(location.search);
let sort = initial.get("sort") || "-created_at";
let offset = Number(initial.get("offset")) || 0;
let total = 0;
let timer = null;
let generation = 0;
const selected = new Set();

for (const field of form.elements) {
  if (field.name && initial.has(field.name)) field.value = initial.get(field.name);
}

function filterParams() {
  const params = new URLSearchParams();
  for (const field of form.elements) {
    if (field.name && field.value.trim()) params.set(field.name, field.value.trim());
  }
  return params;
}

function keepInUrl() {
  const params = filterParams();
  if (sort !== "-created_at") params.set("sort", sort);
  if (offset) params.set("offset", offset);
  const search = params.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
}

function showSort() {
  for (const th of table.querySelectorAll("th[data-sort]")) {
    const column = th.dataset.sort;
    const state = sort === column ? "ascending" : sort === `-${column}` ? "descending" : "none";
    th.setAttribute("aria-sort", state);
  }
}

function row(run, focusable) {
  const checkbox = el("input", {
    type: "checkbox",
    tabindex: "-1",
    "aria-label": `Select run ${shortId(run.id)} for comparison`,
    checked: selected.has(run.id),
    onchange: (event) => toggle(run.id, event.target.checked),
  });
  const spec = run.spec;
  // An uploaded report (source "external") has no spec: its name and model span the spec's columns.
  const configuration = spec
    ? [
        el("td", { class: "col-arch" }, spec.arch),
        el("td", { class: "col-activation" }, spec.activation),
        // Init, normalisation and residual connections (or what the architecture adds: a transformer's heads and
        // norm position, an LSTM's forget bias) in one cell: the table keeps room for the results.
        el("td", { class: "col-setup" }, setupParts(spec).join(" · ")),
        el("td", { class: "num col-depth" }, String(spec.depth)),
        el("td", { class: "num" }, String(spec.width)),
        el("td", { class: "num col-steps" }, String(spec.steps)),
        el("td", { class: "num col-lr" }, String(spec.lr)),
      ]
    : [el("td", { colspan: "7", class: "col-model" }, el("span", { class: "badge source-external" }, "external"), " ", modelLabel(run.model))];
  const metrics = run.metrics || {};
  const seconds = metrics.total_s;
  return el(
    "tr",
    { tabindex: focusable ? "0" : "-1", dataset: { id: run.id, status: run.status, source: run.source || "probe" } },
    el("td", {}, checkbox),
    el("td", {}, el("a", { href: runHref(run.id), tabindex: "-1" }, el("code", {}, shortId(run.id)))),
    el("td", { class: "col-name" }, run.name || "", run.tags?.length ? tagChips(run.tags) : null),
    ...configuration,
    el("td", { class: "col-verdict" }, verdictBadge(run.verdict)),
    el("td", { class: "num col-decades" }, fmt(metrics.decades_per_layer)),
    el("td", { class: "num col-accuracy" }, fmt(metrics.eval_accuracy)),
    el("td", { class: "num col-time" }, seconds === null || seconds === undefined ? "—" : `${fmt(seconds)} s`),
    el("td", { class: "col-findings" }, findingChips((run.finding_kinds || []).map((kind) => ({ kind })))),
    el("td", { class: "col-status" }, statusBadge(run.status)),
    el(
      "td",
      {},
      run.sweep_id
        ? el("a", { href: `${BASE}/sweeps/${run.sweep_id}`, tabindex: "-1" }, el("code", {}, shortId(run.sweep_id)))
        : "",
    ),
    // Short date and time (the findings column needs the width); the full instant is the tooltip.
    el(
      "td",
      {},
      el(
        "time",
        { datetime: run.created_at, title: new Date(run.created_at).toLocaleString() },
        new Date(run.created_at).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" }),
      ),
    ),
  );
}

function toggle(id, on) {
  if (on) selected.add(id);
  else selected.delete(id);
  compareButton.disabled = selected.size < 2;
  compareButton.textContent = selected.size ? `Compare selected (${selected.size})` : "Compare selected";
}

async function load() {
  clearTimeout(timer);
  const mine = ++generation;
  keepInUrl();
  showSort();
  const params = filterParams();
  params.set("sort", sort);
  params.set("limit", LIMIT);
  params.set("offset", offset);
  let list;
  try {
    list = await getJSON(`/v1/runs?${params}`);
  } catch (error) {
    summary.textContent = `Cannot list runs: ${error.message}`;
    return;
  }
  if (mine !== generation) return; // a newer request (another filter) has been sent since
  total = list.total;
  // Re-rendering must not lose the keyboard user's place: keep focus on the same run.
  const focusedId = tbody.contains(document.activeElement) ? document.activeElement.closest("tr")?.dataset.id : null;
  const focusId = focusedId || list.items[0]?.id;
  tbody.replaceChildren(...list.items.map((run) => row(run, run.id === focusId)));
  if (focusedId) tbody.querySelector(`tr[data-id="${focusedId}"]`)?.focus();
  const first = list.items.length ? offset + 1 : 0;
  summary.textContent = total
    ? `Runs ${first}–${offset + list.items.length} of ${total}`
    : "No runs match these filters.";
  page.textContent = `Page ${Math.floor(offset / LIMIT) + 1} of ${Math.max(1, Math.ceil(total / LIMIT))}`;
  prev.disabled = offset === 0;
  next.disabled = offset + LIMIT >= total;
  if (list.items.some((run) => !FINISHED.has(run.status))) timer = setTimeout(load, LIVE_MS);
}

function refilter() {
  offset = 0;
  load();
}

let typing = null;
form.addEventListener("input", (event) => {
  clearTimeout(typing);
  typing = setTimeout(refilter, event.target.tagName === "SELECT" ? 0 : 250);
});
form.addEventListener("submit", (event) => {
  event.preventDefault();
  refilter();
});
form.addEventListener("reset", () => setTimeout(refilter, 0));

table.querySelector("thead").addEventListener("click", (event) => {
  const th = event.target.closest("th[data-sort]");
  if (!th || !event.target.closest("button")) return;
  const column = th.dataset.sort;
  if (sort === column) sort = `-${column}`;
  else if (sort === `-${column}`) sort = column;
  else sort = column === "created_at" ? `-${column}` : column;
  offset = 0;
  load();
});

// Roving focus: one row is in the tab order; arrows move it, Enter opens, Space selects.
tbody.addEventListener("keydown", (event) => {
  const current = event.target.closest("tr");
  if (!current || event.target !== current) return;
  const rows = [...tbody.rows];
  const index = rows.indexOf(current);
  const moves = { ArrowDown: index + 1, ArrowUp: index - 1, Home: 0, End: rows.length - 1 };
  if (event.key in moves) {
    event.preventDefault();
    rows[Math.max(0, Math.min(rows.length - 1, moves[event.key]))].focus();
  } else if (event.key === "Enter") {
    location.href = runHref(current.dataset.id);
  } else if (event.key === " ") {
    event.preventDefault();
    const box = current.querySelector("input[type=checkbox]");
    box.checked = !box.checked;
    toggle(current.dataset.id, box.checked);
  }
});
tbody.addEventListener("focusin", (event) => {
  const current = event.target.closest("tr");
  if (!current) return;
  for (const r of tbody.rows) r.tabIndex = r === current ? 0 : -1;
});
tbody.addEventListener("click", (event) => {
  if (event.target.closest("a, input")) return;
  const current = event.target.closest("tr");
  if (current) location.href = runHref(current.dataset.id);
});

prev.addEventListener("click", () => {
  offset = Math.max(0, offset - LIMIT);
  load();
});
next.addEventListener("click", () => {
  if (offset + LIMIT < total) offset += LIMIT;
  load();
});
compareButton.addEventListener("click", () => {
  const params = new URLSearchParams([...selected].map((id) => ["run_id", id]));
  location.href = `${BASE}/compare?${params}`;
});

load();
