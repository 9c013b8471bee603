// One sweep: the verdict matrix (configuration × depth), the first/last gradient ratio against depth and
// each configuration's critical depth; kept current by the sweep's server-sent events.
import { BASE, FINISHED, PALETTE, el, findingChips, fmt, getJSON, kindLabel, labelsEditor, placeholder, plot, runHref } from "./common.js";

const main = document.getElementById("main");
const sweepId = encodeURIComponent(main.dataset.sweepId);
const matrix = document.getElementById("matrix");
const progressBar = document.getElementById("progress");
const countsText = document.getElementById("counts");
const state = document.getElementById("sweep-state");
const findingFilter = document.getElementById("finding-filter");
const filterNote = document.getElementById("filter-note");
const runsLink = document.getElementById("runs-link");
const sequenceLengths = document.getElementById("sequence-lengths");
findingFilter.value = new URLSearchParams(location.search).get("finding") || "";
const labelsBox = document.getElementById("labels");
labelsBox.replaceChildren(
  labelsEditor(`/v1/sweeps/${sweepId}`, { name: labelsBox.dataset.name, tags: JSON.parse(labelsBox.dataset.tags || "[]") }, (saved) => {
    document.getElementById("title-name").textContent = saved.name || "";
  }),
);

/** "activation=sigmoid, init=xavier_normal"; the config without depth identifies a row. */
const configLabel = (config) =>
  Object.entries(config)
    .map(([key, value]) => `${key}=${value}`)
    .join(", ") || "all runs";
const configKey = (grid) =>
  JSON.stringify(
    Object.entries(grid)
      .filter(([key]) => key !== "depth")
      .sort(([a], [b]) => a.localeCompare(b)),
  );

function showCounts(status) {
  const done = Object.entries(status.counts)
    .filter(([name, count]) => FINISHED.has(name) && count)
    .reduce((sum, [, count]) => sum + count, 0);
  progressBar.max = status.total;
  progressBar.value = done;
  countsText.textContent = Object.entries(status.counts)
    .filter(([, count]) => count)
    .map(([name, count]) => `${count} ${name}`)
    .join(" · ");
  state.textContent = status.done ? "done" : "running";
  state.className = `badge status-${status.done ? "succeeded" : "running"}`;
}

/** A recurrent run's gradient through time in its matrix cell: the critical sequence length (the number of time
 * steps over which its fitted ‖∂L/∂h_t‖ changes by 2 decades), or "level" when the slope is too small to reach
 * 2 decades within the summary's cap; nothing for other runs. */
function sequenceNote(slope, length) {
  if (slope === null || slope === undefined) return null;
  const text = length === null || length === undefined ? "level through time" : `T₂ ${fmt(length)} steps`;
  const title =
    `Through time: ${fmt(slope)} decades per step toward t = 0` +
    (length === null || length === undefined ? ", too level to change 2 decades within the summary's cap" : `; 2 decades over ${fmt(length)} time steps (the critical sequence length)`);
  return el("span", { class: "seq", title, dataset: { slope: String(slope), length: length === null || length === undefined ? "" : String(length) } }, text);
}

/** Per recurrent architecture of the sweep, its shortest critical sequence length and where it is. */
function renderSequenceLengths(summary) {
  const lengths = summary.sequence_lengths || [];
  sequenceLengths.hidden = !lengths.length;
  sequenceLengths.replaceChildren(
    el("h3", {}, "Shortest critical sequence length per architecture"),
    el(
      "ul",
      {},
      ...lengths.map((item) =>
        el(
          "li",
          { dataset: { arch: item.arch } },
          el("strong", {}, item.arch),
          ": ",
          item.critical_sequence_length === null
            ? `none (${item.runs} succeeded run${item.runs === 1 ? "" : "s"}, every one level through time or none finished)`
            : `${fmt(item.critical_sequence_length)} time steps at ${configLabel(item.grid)} (of ${item.runs} succeeded run${item.runs === 1 ? "" : "s"})`,
        ),
      ),
    ),
  );
}

/** Recurrent configurations' fitted slope through time at initialisation against depth (the sweep's second
 * axis beside depth); the figure stays hidden for a sweep without recurrent runs. */
function renderTimeSlope(summary) {
  const traces = summary.configs
    .map((config, i) => ({ config, i }))
    .filter(({ config }) => (config.time_decades_per_step || []).some((v) => v !== null))
    .map(({ config, i }) => ({
      name: configLabel(config.config),
      x: config.depths,
      y: config.time_decades_per_step,
      customdata: config.critical_sequence_length.map((v) => (v === null ? "—" : fmt(v))),
      hovertemplate: `${configLabel(config.config)}<br>depth %{x}: %{y:+.3f} decades/step<br>critical sequence length %{customdata}<extra></extra>`,
      mode: "lines+markers",
      line: { color: PALETTE[i % PALETTE.length] },
    }));
  document.getElementById("figure-time-slope").hidden = !traces.length;
  if (!traces.length) return;
  plot("chart-time-slope", traces, {
    title: { text: "Gradient through time at initialisation (recurrent runs)" },
    xaxis: { title: { text: "depth (stacked recurrent layers)" }, tickvals: [...new Set(traces.flatMap((t) => t.x))] },
    yaxis: { title: { text: "decades per time step toward t = 0" }, zeroline: true },
  });
}

function renderMatrix(summary, runs, finding) {
  const depths = [...new Set(summary.configs.flatMap((c) => c.depths))].sort((a, b) => a - b);
  // (config, depth) → the sweep's run, to link cells and show the status of unfinished runs.
  const runAt = new Map();
  for (const run of runs) runAt.set(`${configKey(run.grid)}|${run.grid.depth ?? "*"}`, run);
  const head = el(
    "thead",
    {},
    el(
      "tr",
      {},
      el("th", { scope: "col" }, "Configuration"),
      ...depths.map((d) => el("th", { scope: "col", class: "num" }, `depth ${d}`)),
      el("th", { scope: "col", class: "num" }, "Critical depth"),
      el("th", { scope: "col" }, el("span", { class: "sr-only" }, "Compare")),
    ),
  );
  const body = el(
    "tbody",
    {},
    ...summary.configs.map((config) => {
      const key = configKey(config.config);
      const cells = depths.map((depth) => {
        const i = config.depths.indexOf(depth);
        if (i < 0) return el("td", { class: "empty-cell" }, "");
        const run = runAt.get(`${key}|${depth}`) || runAt.get(`${key}|*`);
        const verdict = config.verdicts[i];
        const findings = config.findings[i] || [];
        const text = verdict || run?.status || "—";
        const content = run ? el("a", { href: runHref(run.run_id) }, text) : text;
        const has = finding ? findings.some((f) => f.kind === finding) : false;
        const marks = finding ? (has ? " has-finding" : " dimmed") : "";
        return el(
          "td",
          {
            class: `cell verdict-${verdict || "none"}${marks}`,
            dataset: { depth: String(depth), verdict: verdict || "", findings: findings.map((f) => f.kind).join(" ") },
          },
          content,
          sequenceNote(config.time_decades_per_step?.[i], config.critical_sequence_length?.[i]),
          findings.length ? findingChips(findings) : null,
        );
      });
      const finished = runs.filter((r) => configKey(r.grid) === key && r.status === "succeeded");
      const compare = finished.length
        ? el("a", { href: `${BASE}/compare?${new URLSearchParams(finished.map((r) => ["run_id", r.run_id]))}` }, "compare")
        : "";
      return el(
        "tr",
        { dataset: { config: configLabel(config.config) } },
        el("th", { scope: "row" }, configLabel(config.config)),
        ...cells,
        el("td", { class: "num critical" }, config.critical_depth === null ? "—" : String(config.critical_depth)),
        el("td", {}, compare),
      );
    }),
  );
  matrix.replaceChildren(head, body);
}

const STATISTIC = { grad_norm: "‖∂L/∂W‖", act_grad_norm: "‖∂L/∂h‖" };

/** The span the verdict judged, per configuration along depth. A finished run without a span (fewer than
 * two interior layers: nothing to fit) is drawn as an open marker on the zero line, named in the legend,
 * rather than silently left out. */
function renderSpan(summary) {
  const traces = [];
  const missing = { x: [], text: [] };
  summary.configs.forEach((config, i) => {
    const label = configLabel(config.config);
    const finished = config.verdicts.map((v) => v !== null);
    if (!config.profile_span.some((v) => v !== null) && !finished.some(Boolean)) return;
    traces.push({
      name: label,
      x: config.depths,
      y: config.profile_span,
      customdata: config.depths.map((_, j) => [STATISTIC[config.profile_statistic[j]] || "—", config.span_threshold[j] ?? NaN]),
      hovertemplate: `${label}<br>depth %{x}: %{y:+.2f} decades of %{customdata[0]}<br>threshold ±%{customdata[1]:.2f}<extra></extra>`,
      mode: "lines+markers",
      line: { color: PALETTE[i % PALETTE.length] },
      connectgaps: false,
    });
    config.depths.forEach((depth, j) => {
      if (finished[j] && config.profile_span[j] === null) {
        missing.x.push(depth);
        missing.text.push(`${label}, depth ${depth}: no span — fewer than 2 interior layers to fit`);
      }
    });
  });
  if (!traces.length) {
    placeholder("chart-ratio", findingFilter.value ? "No configuration has this finding." : "Drawn as runs finish.");
    return;
  }
  const depths = summary.configs.flatMap((c) => c.depths);
  const [lo, hi] = [Math.min(...depths), Math.max(...depths)];
  const guide = (y, name) => ({
    name,
    x: [lo, hi],
    y: [y, y],
    mode: "lines",
    hoverinfo: "skip",
    line: { dash: "dot", color: "#999", width: 1 },
    legendgroup: "guides",
  });
  plot(
    "chart-ratio",
    [
      ...traces,
      ...(missing.x.length
        ? [
            {
              name: "no value (fewer than 2 interior layers)",
              x: missing.x,
              y: missing.x.map(() => 0),
              text: missing.text,
              hovertemplate: "%{text}<extra></extra>",
              mode: "markers",
              marker: { symbol: "circle-open", size: 11, color: "#555" },
            },
          ]
        : []),
      guide(2, "+2 decades: exploding threshold"),
      guide(-2, "−2 decades: vanishing threshold"),
    ],
    {
      title: { text: "Gradient span across the interior at initialisation (what the verdict judges)" },
      xaxis: { title: { text: "depth" }, tickvals: [...new Set(depths)] },
      yaxis: { title: { text: "fitted change, decades (input side)" }, zeroline: true },
    },
  );
}

let pending = null;
async function refresh() {
  const finding = findingFilter.value;
  const query = finding ? `?${new URLSearchParams({ finding })}` : "";
  // Every run (to link every cell), but only the configurations with the chosen finding.
  const [status, summary] = await Promise.all([
    getJSON(`/v1/sweeps/${sweepId}`),
    getJSON(`/v1/sweeps/${sweepId}/summary${query}`),
  ]);
  showCounts(status);
  renderMatrix(summary, status.runs, finding);
  renderSpan(summary);
  renderSequenceLengths(summary);
  renderTimeSlope(summary);
  filterNote.textContent = finding
    ? `${summary.configs.length} configuration${summary.configs.length === 1 ? "" : "s"} with a ${kindLabel(finding)} finding.`
    : "";
  // The link to the runs table carries the filter: the sweep's runs with that finding.
  const listed = new URLSearchParams({ sweep_id: main.dataset.sweepId, ...(finding ? { finding } : {}) });
  runsLink.href = `${BASE}/?${listed}`;
  runsLink.textContent = finding ? `runs with a ${kindLabel(finding)} finding` : `all ${status.total} runs`;
  return status;
}

findingFilter.addEventListener("change", () => {
  const params = new URLSearchParams(location.search);
  if (findingFilter.value) params.set("finding", findingFilter.value);
  else params.delete("finding");
  const search = params.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
  refresh();
});
document.getElementById("sweep-filters").addEventListener("submit", (event) => event.preventDefault());
/** Coalesce a burst of events (several runs finishing together) into one refresh. */
function refreshSoon() {
  clearTimeout(pending);
  pending = setTimeout(refresh, 300);
}

const first = await refresh();
if (!first.done) {
  const source = new EventSource(`${BASE}/v1/sweeps/${sweepId}/events`);
  source.addEventListener("progress", (event) => showCounts(JSON.parse(event.data)));
  source.addEventListener("run", refreshSoon);
  source.addEventListener("done", () => {
    source.close();
    refreshSoon();
  });
}
