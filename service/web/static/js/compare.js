// Two or more runs' per-layer profiles overlaid, from GET /v1/compare.
import { BASE, PALETTE, RECURRENT, archLabel, el, fmt, getJSON, logAxis, placeholder, plot, positive, runHref, runLabel, shortId, showError, transformerBlocks, verdictBadge } from "./common.js";

const main = document.getElementById("main");
const ids = main.dataset.runIds ? main.dataset.runIds.split(",") : [];
const problem = document.getElementById("problem");
const table = document.getElementById("compared");
const form = document.getElementById("pick");
const align = document.getElementById("align");
const specDiff = document.getElementById("spec-diff");
const recent = document.getElementById("recent");
align.value = new URLSearchParams(location.search).get("align") === "output" ? "output" : "input";
const fromOutput = () => align.value === "output";

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const picked = form.elements.ids.value.split(/[\s,]+/).filter(Boolean);
  location.href = `${BASE}/compare?${new URLSearchParams(picked.map((id) => ["run_id", id]))}`;
});

/** "1a2b3c4d sigmoid/12", "1a2b3c4d lstm/2": a run in a legend. */
const runShortLabel = (run) => `${shortId(run.run_id)} ${run.spec ? `${archLabel(run.spec)}/${run.spec.depth}` : run.name || run.model.class_name}`;

function traces(runs, field, moments) {
  return runs.flatMap((run, i) =>
    moments.map((moment) => ({
      name: `${runShortLabel(run)}${moments.length > 1 ? ` ${moment === "init" ? "init" : "end"}` : ""}`,
      legendgroup: run.run_id,
      // From the output: the last layer is 0 and earlier ones count down, so nets of different depths line
      // up where the loss enters (the input side is where they differ).
      x: run.layers.map((l) => (fromOutput() ? l.index - (run.layers.length - 1) : l.index)),
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
  renderSpecDiff(runs);
  const axis = {
    title: { text: fromOutput() ? "layer, counted from the output (0 = output layer)" : "layer (input → output)" },
    dtick: 1,
  };
  const ys = (drawn) => drawn.flatMap((t) => t.y);
  const profile = traces(runs, "grad_norm", ["init", "last"]);
  plot("chart-profile", profile, { title: { text: "Gradient norm per layer" }, xaxis: axis, yaxis: logAxis("‖∂L/∂W‖", ys(profile)) });
  const act = traces(runs, "act_grad_norm", ["init"]);
  plot("chart-act", act, { title: { text: "Activation gradient at initialisation" }, xaxis: axis, yaxis: logAxis("‖∂L/∂h‖", ys(act)) });
  const rel = traces(runs, "rel_grad", ["init"]);
  plot("chart-rel", rel, { title: { text: "Relative gradient at initialisation" }, xaxis: axis, yaxis: logAxis("‖∂L/∂W‖ / ‖W‖", ys(rel)) });
}

/** The transformer runs' across-block profiles side by side (pre-LN beside post-LN): each block's mlp.fc2 ‖∂L/∂W‖
 * and the ‖∂L/∂h‖ at its output, at initialisation (solid) and at the last recorded step (dashed), x by block as
 * the alignment says. The figures stay hidden unless at least one compared run is a transformer. */
function renderBlocks(runs) {
  const transformers = runs
    .map((run, i) => [run, i, transformerBlocks(run.layers)])
    .filter(([run, , blocks]) => run.spec?.arch === "transformer" && blocks.length);
  for (const id of ["figure-blocks", "figure-block-out"]) document.getElementById(id).hidden = !transformers.length;
  if (!transformers.length) return;
  /** Each run's line through the layer `role` ("fc2", "output") of every block, at init and at the end. */
  const lines = (role, field) =>
    transformers.flatMap(([run, i, blocks]) =>
      ["init", "last"].map((moment) => {
        const picked = blocks.map((b) => b[role]);
        return {
          name: `${runShortLabel(run)} ${run.spec.norm_position}-LN ${moment === "init" ? "init" : "end"}`,
          legendgroup: run.run_id,
          x: blocks.map((_, k) => (fromOutput() ? k + 1 - blocks.length : k + 1)),
          y: picked.map((l) => positive(l[moment]?.[field])),
          text: picked.map((l) => l.name),
          hovertemplate: "%{text}: %{y:.3g}<extra></extra>",
          mode: "lines+markers",
          line: { color: PALETTE[i % PALETTE.length], dash: moment === "init" ? "solid" : "dash" },
        };
      }),
    );
  const axis = { title: { text: fromOutput() ? "block, counted from the output (0 = last block)" : "block (input → output)" }, dtick: 1 };
  const weights = lines("fc2", "grad_norm");
  plot("chart-blocks", weights, { title: { text: "MLP weight gradient per block" }, xaxis: axis, yaxis: logAxis("‖∂L/∂W‖ of mlp.fc2", weights.flatMap((t) => t.y)) });
  const out = lines("output", "act_grad_norm");
  plot("chart-block-out", out, { title: { text: "Gradient at each block's output" }, xaxis: axis, yaxis: logAxis("‖∂L/∂h‖ at the block output", out.flatMap((t) => t.y)) });
}

/** The recurrent runs' gradient through time side by side: each run's top layer (where the loss enters),
 * ‖∂L/∂h_t‖ against t at its first (solid) and last (dashed) recorded step, from GET /v1/runs/{id}/time. The
 * figure stays hidden unless at least one compared run is recurrent. */
async function renderTime(runs) {
  // Each recurrent run with its top recurrent layer: only that layer's rows are read (a long run's whole table
  // can be more than /time serves at once).
  const recurrent = runs
    .map((run, i) => [run, i, run.layers.filter((l) => l.kind === "recurrent").at(-1)])
    .filter(([run, , top]) => run.spec && RECURRENT.has(run.spec.arch) && top);
  const figure = document.getElementById("figure-time");
  figure.hidden = !recurrent.length;
  if (!recurrent.length) return;
  const profiles = await Promise.all(
    recurrent.map(([run, , top]) => getJSON(`/v1/runs/${encodeURIComponent(run.run_id)}/time?${new URLSearchParams({ layer: top.index })}`)),
  );
  const drawn = recurrent.flatMap(([run, i, top], k) => {
    const mine = profiles[k].rows;
    if (!mine.length) return [];
    const steps = [...new Set(mine.map((r) => r.step))].sort((a, b) => a - b);
    return [...new Set([steps[0], steps.at(-1)])].map((step) => {
      const at = mine.filter((r) => r.step === step).sort((a, b) => a.t - b.t);
      return {
        name: `${runShortLabel(run)} ${top.name} step ${step}`,
        legendgroup: run.run_id,
        x: at.map((r) => r.t),
        y: at.map((r) => positive(r.grad_norm)),
        mode: "lines+markers",
        marker: { size: 4 },
        line: { color: PALETTE[i % PALETTE.length], dash: step === steps[0] ? "solid" : "dash" },
      };
    });
  });
  if (!drawn.length) {
    placeholder("chart-time", "The recurrent runs have no gradient records through time.");
    return;
  }
  plot("chart-time", drawn, {
    title: { text: "Gradient through time, top recurrent layer" },
    xaxis: { title: { text: "time step t" } },
    yaxis: logAxis("‖∂L/∂h_t‖", drawn.flatMap((t) => t.y)),
  });
}

/** The spec fields whose values differ between the compared runs, one row each (runs without a spec show —). */
function renderSpecDiff(runs) {
  const fields = [...new Set(runs.flatMap((run) => Object.keys(run.spec || {})))];
  const value = (run, field) => (run.spec ? JSON.stringify(run.spec[field] ?? null) : "—");
  const differing = fields.filter((field) => new Set(runs.map((run) => value(run, field))).size > 1);
  specDiff.replaceChildren(
    el("h2", {}, "Spec differences"),
    differing.length
      ? el(
          "table",
          { class: "runs", id: "spec-diff-table" },
          el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "field"), ...runs.map((run) => el("th", { scope: "col" }, el("code", {}, shortId(run.run_id)))))),
          el(
            "tbody",
            {},
            ...differing.map((field) =>
              el("tr", { dataset: { field } }, el("th", { scope: "row" }, field), ...runs.map((run) => el("td", {}, value(run, field).replaceAll('"', "")))),
            ),
          ),
        )
      : el("p", { class: "muted" }, "The compared runs have the same spec."),
  );
}

/** With nothing to compare yet: the most recent succeeded runs, to tick and compare. */
async function renderRecent() {
  let list;
  try {
    list = await getJSON("/v1/runs?status=succeeded&limit=12");
  } catch (error) {
    showError(problem, error);
    return;
  }
  if (!list.items.length) {
    recent.replaceChildren(el("p", { class: "muted" }, "No run has succeeded yet: submit a few, then compare them here."));
    return;
  }
  const boxes = list.items.map((run) => el("input", { type: "checkbox", value: run.id, "aria-label": `Compare run ${shortId(run.id)}` }));
  const go = el("button", { type: "submit" }, "Compare the ticked runs");
  const pick = el(
    "form",
    { id: "recent-form" },
    el("h2", {}, "Recent runs"),
    el(
      "ul",
      { class: "recent-runs" },
      ...list.items.map((run, i) =>
        el("li", { dataset: { id: run.id } }, el("label", {}, boxes[i], " ", el("code", {}, shortId(run.id)), " ", run.name ? `${run.name} · ` : "", runLabel(run), " ", verdictBadge(run.verdict))),
      ),
    ),
    go,
  );
  pick.addEventListener("submit", (event) => {
    event.preventDefault();
    const picked = boxes.filter((box) => box.checked).map((box) => box.value);
    location.href = `${BASE}/compare?${new URLSearchParams(picked.map((id) => ["run_id", id]))}`;
  });
  recent.replaceChildren(pick);
}

align.addEventListener("change", () => {
  const params = new URLSearchParams(location.search);
  if (fromOutput()) params.set("align", "output");
  else params.delete("align");
  location.search = params.toString();
});

const charts = ["chart-profile", "chart-act", "chart-rel"];
if (!ids.length) {
  for (const id of charts) placeholder(id, "Pick two or more runs to compare.");
  renderRecent();
} else {
  try {
    const comparison = await getJSON(`/v1/compare?${new URLSearchParams(ids.map((id) => ["run_id", id]))}`);
    render(comparison);
    renderBlocks(comparison.runs);
    // The profiles through time come from each recurrent run: a failure there leaves the drawn charts alone.
    renderTime(comparison.runs).catch((error) => {
      console.warn(error);
      placeholder("chart-time", `Cannot read the gradient through time: ${error.message}`);
    });
  } catch (error) {
    showError(problem, error);
    for (const id of charts) placeholder(id, "Nothing to draw.");
  }
}
