// Two or more runs' per-layer profiles overlaid, from GET /v1/compare.
import { BASE, PALETTE, el, fmt, getJSON, placeholder, plot, positive, runHref, runLabel, shortId, showError, verdictBadge } from "./common.js";

const main = document.getElementById("main");
const ids = main.dataset.runIds ? main.dataset.runIds.split(",") : [];
const problem = document.getElementById("problem");
const table = document.getElementById("compared");
const form = document.getElementById("pick");

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const picked = form.elements.ids.value.split(/[\s,]+/).filter(Boolean);
  location.href = `${BASE}/compare?${new URLSearchParams(picked.map((id) => ["run_id", id]))}`;
});

function traces(runs, field, moments) {
  return runs.flatMap((run, i) =>
    moments.map((moment) => ({
      name: `${shortId(run.run_id)} ${run.spec ? `${run.spec.activation}/${run.spec.depth}` : run.name || run.model.class_name}${moments.length > 1 ? ` ${moment === "init" ? "init" : "end"}` : ""}`,
      legendgroup: run.run_id,
      x: run.layers.map((l) => l.index),
      y: run.layers.map((l) => positive(l[moment]?.[field])),
      text: run.layers.map((l) => l.name),
      mode: "lines+markers",
      line: { color: PALETTE[i % PALETTE.length], dash: moment === "init" ? "solid" : "dash" },
      marker: { size: 5 },
    })),
  );
}

function render(comparison) {
  const runs = comparison.runs;
  table.replaceChildren(
    el(
      "thead",
      {},
      el("tr", {}, ...["", "Run", "Configuration", "Verdict", "Layers", "Steps (init → end)"].map((h) => el("th", { scope: "col" }, h))),
    ),
    el(
      "tbody",
      {},
      ...runs.map((run, i) =>
        el(
          "tr",
          { dataset: { id: run.run_id } },
          el("td", {}, el("span", { class: "swatch", style: `background:${PALETTE[i % PALETTE.length]}` })),
          el("td", {}, el("a", { href: runHref(run.run_id) }, el("code", {}, shortId(run.run_id)))),
          el("td", {}, runLabel(run)),
          el("td", {}, verdictBadge(run.verdict)),
          el("td", { class: "num" }, String(run.layers.length)),
          el("td", {}, `${fmt(run.init_step)} → ${fmt(run.last_step)}`),
        ),
      ),
    ),
  );
  const axis = { title: { text: "layer (input → output)" }, dtick: 1 };
  const log = (title) => ({ type: "log", exponentformat: "power", title: { text: title } });
  plot("chart-profile", traces(runs, "grad_norm", ["init", "last"]), {
    title: { text: "Gradient norm per layer" },
    xaxis: axis,
    yaxis: log("‖∂L/∂W‖"),
  });
  plot("chart-act", traces(runs, "act_grad_norm", ["init"]), {
    title: { text: "Activation gradient at initialisation" },
    xaxis: axis,
    yaxis: log("‖∂L/∂h‖"),
  });
  plot("chart-rel", traces(runs, "rel_grad", ["init"]), {
    title: { text: "Relative gradient at initialisation" },
    xaxis: axis,
    yaxis: log("‖∂L/∂W‖ / ‖W‖"),
  });
}

const charts = ["chart-profile", "chart-act", "chart-rel"];
if (!ids.length) {
  for (const id of charts) placeholder(id, "Pick two or more runs to compare.");
} else {
  try {
    render(await getJSON(`/v1/compare?${new URLSearchParams(ids.map((id) => ["run_id", id]))}`));
  } catch (error) {
    showError(problem, error);
    for (const id of charts) placeholder(id, "Nothing to draw.");
  }
}
