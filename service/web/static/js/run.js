// One run: live progress over server-sent events, then its profiles, heatmap, curves and verdict.
import {
  BASE,
  COLORS,
  FINISHED,
  bySeverity,
  el,
  fmt,
  getJSON,
  kindLabel,
  labelsEditor,
  layerGroup,
  logAxis,
  PALETTE,
  placeholder,
  plot,
  positive,
  recordsAt,
  severityBadge,
  transformerBlocks,
} from "./common.js";

const main = document.getElementById("main");
const runId = main.dataset.runId;
const statusBadge = document.getElementById("status");
const verdictBadge = document.getElementById("verdict-badge");
const progressBar = document.getElementById("progress");
const progressText = document.getElementById("progress-text");
const verdictSection = document.getElementById("verdict");
const findingsSection = document.getElementById("findings");

const CHARTS = ["chart-profile", "chart-heatmap", "chart-forward", "chart-act", "chart-rel", "chart-loss", "chart-accuracy"];
const PHASES = { init: "at initialisation", training: "during training" };
// Marks a layer whose bias gradient is zero by construction (a bias followed by batch norm).
const ZERO_BIAS = "bias gradient zero by construction (bias feeds batch norm): recorded, not judged";
// Name and tags, editable in place.
const labelsBox = document.getElementById("labels");
labelsBox.replaceChildren(
  labelsEditor(
    `/v1/runs/${encodeURIComponent(runId)}`,
    { name: labelsBox.dataset.name, tags: JSON.parse(labelsBox.dataset.tags || "[]") },
    (saved) => {
      document.getElementById("title-name").textContent = saved.name || "";
    },
  ),
);

const smoothing = document.getElementById("smoothing");
const smoothingValue = document.getElementById("smoothing-value");
const smoothingControl = document.getElementById("smoothing-control");
const downloads = document.getElementById("downloads");

/** TensorBoard's smoothing: an exponential moving average with its start-up bias removed; gaps stay gaps. */
function smooth(values, weight) {
  let last = 0;
  let count = 0;
  return values.map((v) => {
    if (v === null || v === undefined || !Number.isFinite(v)) return null;
    last = last * weight + (1 - weight) * v;
    count += 1;
    return last / (1 - weight ** count);
  });
}

/** The run's downloads: its records as CSV (with layer names), the run and report as JSON, TensorBoard events. */
function showDownloads(run) {
  const path = `${BASE}/v1/runs/${encodeURIComponent(run.id)}`;
  const short = run.id.slice(0, 8);
  downloads.replaceChildren(
    "Download: ",
    el("a", { href: `${path}/gradients?format=csv`, download: `${short}-gradients.csv`, id: "download-csv" }, "gradient records (CSV)"),
    " · ",
    el("a", { href: path, download: `${short}-run.json`, id: "download-json" }, "run and report (JSON)"),
    " · ",
    // The server names the archive after the run (its TensorBoard run name).
    el("a", { href: `${path}/tensorboard`, download: true, id: "download-tensorboard" }, "TensorBoard events (tar.gz)"),
  );
  downloads.hidden = false;
}

/** Every y value of some traces (for a log axis's range and ticks). */
const ys = (traces) => traces.flatMap((trace) => trace.y);
// Training loss as the progress events report it, drawn while the run trains.
const liveLoss = { x: [], y: [] };

function showStatus(status) {
  statusBadge.textContent = status;
  statusBadge.className = `badge status-${status}`;
}

/** A `progress` event (or the run itself): status, attempt and the worker's latest heartbeat. */
function showProgress(state) {
  showStatus(state.status);
  const p = state.progress;
  const parts = [];
  if (state.status === "queued") parts.push("queued, waiting for a worker");
  if (state.status === "running") {
    if (p && p.steps) {
      progressBar.max = p.steps;
      progressBar.value = p.step;
      parts.push(`step ${p.step} of ${p.steps}`, `loss ${fmt(p.loss)}`, `verdict so far: ${p.label_so_far || "—"}`);
    } else {
      progressBar.removeAttribute("value"); // indeterminate until the first heartbeat
      parts.push("starting");
    }
  }
  if (state.attempt > 1) parts.push(`attempt ${state.attempt}`);
  if (state.cancel_requested && !FINISHED.has(state.status)) parts.push("cancelling");
  progressText.textContent = parts.join(" · ") || state.status;
  if (state.status === "running" && p && p.loss !== null && p.loss !== undefined && liveLoss.x.at(-1) !== p.step) {
    liveLoss.x.push(p.step);
    liveLoss.y.push(p.loss);
    // Copies: Plotly.react compares data arrays by identity and ignores points pushed into an array it
    // already drew, so handing it the same arrays again would leave the chart frozen at its first points.
    plot("chart-loss", [{ x: [...liveLoss.x], y: [...liveLoss.y], mode: "lines+markers", name: "training loss" }], {
      title: { text: "Loss (live)" },
      xaxis: { title: { text: "step" } },
      showlegend: false,
    });
  }
}

function follow() {
  // Until the verdict only the live loss chart has data: the others are hidden, not shown empty.
  main.classList.add("following", "no-report");
  placeholder("chart-loss", "The training loss appears here as the run reports progress.");
  const source = new EventSource(`${BASE}/v1/runs/${encodeURIComponent(runId)}/events`);
  source.addEventListener("progress", (event) => showProgress(JSON.parse(event.data)));
  source.addEventListener("verdict", () => {
    source.close(); // the stream has ended; without this EventSource would reconnect
    finish();
  });
  source.addEventListener("gone", () => {
    source.close();
    showStatus("deleted");
    progressText.textContent = "This run was deleted.";
  });
}

function list(title, items) {
  if (!items.length) return null;
  return el("div", {}, el("h3", {}, title), el("ul", {}, ...items.map((item) => el("li", {}, item))));
}

function evidenceList(evidence) {
  const rows = Object.entries(evidence).filter(([, value]) => value !== null && value !== undefined);
  return el(
    "dl",
    { class: "evidence" },
    // Evidence may hold words as well as numbers (a finding's evidence dict): numbers are formatted.
    ...rows.map(([key, value]) => el("div", {}, el("dt", {}, key), el("dd", {}, typeof value === "number" ? fmt(value) : String(value)))),
  );
}

/** One finding: severity badge, kind and phase, its sentence, its evidence numbers, the layers and `advice`
 * (the finding's advice less what an earlier card already gave). */
function findingItem(finding, layers, advice) {
  const names = new Map(layers.map((l) => [l.index, l.name]));
  const about = finding.layers.length
    ? el("p", { class: "muted" }, "Layers: ", [...new Set(finding.layers)].map((i) => names.get(i) ?? `#${i}`).join(", "))
    : null;
  return el(
    "li",
    { class: `finding severity-${finding.severity}`, dataset: { kind: finding.kind, severity: finding.severity } },
    el(
      "div",
      { class: "finding-head" },
      severityBadge(finding.severity),
      el("strong", {}, kindLabel(finding.kind)),
      finding.phase ? el("span", { class: "muted" }, PHASES[finding.phase] || finding.phase) : null,
    ),
    el("p", { class: "finding-message" }, finding.message),
    Object.keys(finding.evidence).length ? evidenceList(finding.evidence) : null,
    about,
    advice.length ? el("ul", { class: "advice" }, ...advice.map((item) => el("li", {}, item))) : null,
  );
}

function renderFindings(report) {
  if (!report) {
    findingsSection.replaceChildren();
    return;
  }
  const findings = bySeverity(report.verdict.findings || []);
  // Several findings of one kind (a profile at init and in training) share their advice: say it once.
  const advised = new Set();
  const fresh = (finding) => finding.advice.filter((item) => !advised.has(item) && advised.add(item));
  findingsSection.replaceChildren(
    el("h2", {}, "Findings ", el("span", { class: "muted" }, `(${findings.length})`)),
    findings.length
      ? el("ol", { class: "findings-list" }, ...findings.map((f) => findingItem(f, report.layers, fresh(f))))
      : el("p", { class: "muted" }, "No findings: nothing beyond the verdict to report."),
  );
}

function renderVerdict(run) {
  const report = run.report;
  if (!report) {
    verdictSection.replaceChildren(
      ...(run.status === "failed"
        ? [el("h2", {}, "Failed"), el("pre", {}, run.error || "The run failed.")]
        : [el("h2", {}, "Cancelled"), el("p", {}, "The run was cancelled before it finished, so it has no verdict.")]),
    );
    return;
  }
  const v = report.verdict;
  const { eval: held, timing } = report;
  // The theory's sentence is usually one of the reasons already; say it once.
  const theory = v.theory.applicable ? v.theory.reason : `Not applicable: ${v.theory.reason}`;
  const theoryNote = v.reasons.includes(theory) ? null : el("p", {}, el("strong", {}, "Mean-field theory: "), theory);
  verdictSection.replaceChildren(
    el("h2", {}, "Verdict ", el("span", { class: `badge verdict-${v.label}` }, v.label)),
    el("p", {}, `At initialisation: ${v.at_init} · during training: ${v.trained || "—"}`),
    el(
      "div",
      { class: "verdict-columns" },
      el("div", {}, list("Why", v.reasons), list("Advice", v.advice), theoryNote),
      el("div", {}, el("h3", {}, "Evidence"), evidenceList(v.evidence)),
    ),
    el(
      "p",
      { class: "muted" },
      `Held-out: loss ${fmt(held.loss)}, accuracy ${fmt(held.accuracy)} on ${held.samples} samples; ` +
        `training: loss ${fmt(held.train_loss)}, accuracy ${fmt(held.train_accuracy)}. ` +
        `${timing.steps_run} steps on ${timing.device}, ${fmt(timing.step_ms)} ms/step, ${fmt(timing.total_s)} s in all.`,
    ),
  );
}

/** The mean-field line: through the last interior layer's value at init, slope = predicted decades/layer. */
function theoryTrace(layers, atInit, theory) {
  const slope = theory.predicted_decades_per_layer;
  if (!theory.applicable || slope === null || !Number.isFinite(slope)) return null;
  // Interior layers as the verdict counts them: weight layers without the first and the last.
  const interior = layers.filter((l) => l.kind !== "norm").slice(1, -1);
  const anchor = positive(atInit.get(interior.at(-1)?.index)?.grad_norm);
  if (interior.length < 2 || anchor === null) return null;
  const n = interior.length;
  return {
    name: `mean-field prediction (${fmt(slope)} decades/layer)`,
    x: interior.map((l) => l.index),
    y: interior.map((_, i) => anchor * 10 ** (slope * (n - 1 - i))),
    mode: "lines",
    line: { dash: "dash", color: "#555" },
  };
}

function profileTraces(layers, atInit, atEnd, field, first, last) {
  const x = layers.map((l) => l.index);
  const text = layers.map((l) => `${l.name} (${l.kind})${l.structural_zero_bias ? ` · ${ZERO_BIAS}` : ""}`);
  const values = (at) => layers.map((l) => positive(at.get(l.index)?.[field]));
  return [
    { name: `initialisation (step ${first})`, x, y: values(atInit), text, mode: "lines+markers", line: { color: "#0072b2" } },
    { name: `end (step ${last})`, x, y: values(atEnd), text, mode: "lines+markers", line: { color: "#d55e00" } },
  ];
}

/** Runs of consecutive layers in one group (a transformer block, a stacked recurrent layer), in forward order. */
function layerGroups(layers) {
  const groups = [];
  for (const layer of layers) {
    const name = layerGroup(layer.name);
    if (name === null) continue;
    const open = groups.at(-1);
    if (open && open.name === name && open.last === layer.index - 1) open.last = layer.index;
    else groups.push({ name, first: layer.index, last: layer.index });
  }
  return groups;
}

// At most this many group labels on a layer axis; a deeper net labels every k-th group.
const MAX_GROUP_TICKS = 12;

/** The layer axis of the per-layer charts and the shapes that go with it. A transformer's or stacked recurrent
 * net's layers are read per group: one tick per block (or recurrent layer) at its middle and every other group
 * shaded, so the across-block profile shows; the layers outside any group keep their index. Other nets get
 * one tick per layer. */
function layerAxis(layers) {
  const groups = layerGroups(layers);
  if (!groups.length) {
    const axis = { title: { text: "layer (input → output)" }, tickvals: layers.map((l) => l.index), ticktext: layers.map((l) => String(l.index)) };
    return { axis, shapes: [] };
  }
  const every = Math.ceil(groups.length / MAX_GROUP_TICKS);
  const labelled = groups.filter((_, i) => i % every === 0 || i === groups.length - 1);
  const loose = layers.filter((l) => layerGroup(l.name) === null);
  const ticks = [...loose.map((l) => [l.index, String(l.index)]), ...labelled.map((g) => [(g.first + g.last) / 2, g.name])].sort((a, b) => a[0] - b[0]);
  const kind = groups[0].name.startsWith("block") ? "block" : "recurrent layer";
  const axis = {
    title: { text: `layer (input → output), grouped by ${kind}` },
    zeroline: false, // the shading marks the groups; a line at layer 0 would cut the first one
    tickvals: ticks.map(([x]) => x),
    ticktext: ticks.map(([, text]) => text),
  };
  const shapes = groups
    .filter((_, i) => i % 2 === 0)
    .map((g) => ({
      type: "rect",
      xref: "x",
      yref: "paper",
      x0: g.first - 0.5,
      x1: g.last + 0.5,
      y0: 0,
      y1: 1,
      fillcolor: "rgba(31, 58, 95, 0.07)",
      line: { width: 0 },
      layer: "below",
    }));
  return { axis, shapes };
}

function drawCharts(report) {
  const { layers, records, steps } = report;
  if (!records.length) {
    for (const id of CHARTS) placeholder(id, "This run has no gradient records.");
    return;
  }
  const recorded = [...new Set(records.map((r) => r.step))].sort((a, b) => a - b);
  const first = recorded[0];
  const last = recorded.at(-1);
  const atInit = recordsAt(records, first);
  const atEnd = recordsAt(records, last);
  const { axis: layerX, shapes } = layerAxis(layers);
  const theory = theoryTrace(layers, atInit, report.verdict.theory);
  const profile = [...profileTraces(layers, atInit, atEnd, "grad_norm", first, last), ...(theory ? [theory] : [])];
  plot("chart-profile", profile, {
    title: { text: "Gradient norm per layer" },
    xaxis: layerX,
    yaxis: logAxis("‖∂L/∂W‖", ys(profile)),
    shapes,
  });
  // The caption says what is drawn: the mean-field line only where the theory applies (not for a CNN, nor
  // with normalisation or residuals), and why not otherwise.
  const reason = report.verdict.theory.reason;
  document.getElementById("caption-profile").textContent =
    "‖∂L/∂W‖ of each layer (log scale) at initialisation and at the last recorded step; " +
    (theory
      ? "the dashed line is the mean-field prediction, anchored at the last interior layer."
      : `no mean-field line: ${report.verdict.theory.applicable ? "the prediction is not finite here" : reason.charAt(0).toLowerCase() + reason.slice(1)}`);

  const byKey = new Map(records.map((r) => [`${r.layer}:${r.step}`, r.grad_norm]));
  const z = layers.map((l) =>
    recorded.map((s) => {
      const v = positive(byKey.get(`${l.index}:${s}`));
      return v === null ? null : Math.log10(v);
    }),
  );
  plot(
    "chart-heatmap",
    [
      {
        type: "heatmap",
        x: recorded,
        y: layers.map((l) => l.index),
        z,
        text: layers.map((l) => recorded.map(() => l.name)),
        colorscale: "Viridis",
        colorbar: { title: { text: "log10" }, thickness: 12 },
        hovertemplate: "step %{x}<br>layer %{y} (%{text})<br>log10 ‖∂L/∂W‖ = %{z:.2f}<extra></extra>",
      },
    ],
    {
      title: { text: "log10 gradient norm: layer × step" },
      xaxis: { title: { text: "step" } },
      yaxis: { ...layerX, title: { text: "layer" } },
      margin: { l: 60, r: 16, t: 36, b: 48 },
    },
  );
  if (records.some((r) => positive(r.act_norm) !== null)) {
    const forward = profileTraces(layers, atInit, atEnd, "act_norm", first, last);
    plot("chart-forward", forward, {
      title: { text: "Forward signal per layer" },
      xaxis: layerX,
      yaxis: logAxis("RMS of the layer's output", ys(forward)),
      shapes,
    });
  } else {
    placeholder("chart-forward", "This run recorded no forward signal (it predates the act_norm record).");
  }
  const act = profileTraces(layers, atInit, atEnd, "act_grad_norm", first, last);
  plot("chart-act", act, {
    title: { text: "Activation gradient per layer" },
    xaxis: layerX,
    yaxis: logAxis("‖∂L/∂h‖", ys(act)),
    shapes,
  });
  const rel = profileTraces(layers, atInit, atEnd, "rel_grad", first, last);
  plot("chart-rel", rel, {
    title: { text: "Relative gradient per layer" },
    xaxis: layerX,
    yaxis: logAxis("‖∂L/∂W‖ / ‖W‖", ys(rel)),
    shapes,
  });

  const x = steps.map((s) => s.step);
  const held = report.eval;
  const heldLine = (value, name) =>
    value === null || value === undefined || !x.length
      ? []
      : [{ x: [x[0], x.at(-1)], y: [value, value], mode: "lines", name, line: { dash: "dot", color: "#555" } }];
  const drawLoss = () => {
    const weight = Number(smoothing.value);
    smoothingValue.textContent = weight.toFixed(2);
    const raw = steps.map((s) => s.loss);
    plot(
      "chart-loss",
      [
        // The raw curve stays, faint, under the smoothed one (as TensorBoard draws it).
        { x, y: raw, mode: "lines", name: "training loss", opacity: weight > 0 ? 0.3 : 1, line: { color: "#0072b2" } },
        ...(weight > 0 ? [{ x, y: smooth(raw, weight), mode: "lines", name: `smoothed (${weight.toFixed(2)})`, line: { color: "#0072b2", width: 2 } }] : []),
        ...heldLine(held.loss, `held-out (${held.samples})`),
      ],
      { title: { text: "Loss" }, xaxis: { title: { text: "step" } }, yaxis: { title: { text: "cross-entropy" } } },
    );
  };
  smoothingControl.hidden = false;
  smoothing.oninput = drawLoss;
  drawLoss();
  plot(
    "chart-accuracy",
    [
      { x, y: steps.map((s) => s.accuracy), mode: "lines", name: "training accuracy", line: { color: COLORS.healthy } },
      ...heldLine(held.accuracy, `held-out (${held.samples})`),
    ],
    { title: { text: "Accuracy" }, xaxis: { title: { text: "step" } }, yaxis: { title: { text: "fraction correct" }, rangemode: "tozero" } },
  );
}

/** A transformer's blocks (common.js's transformerBlocks): per block, the weight gradient of the attention output
 * projection and of the MLP's second layer, and the gradient at the block's output, at initialisation and at the
 * last recorded step, block 1 nearest the input. Nothing for other nets. */
function drawBlocks(report) {
  const section = document.getElementById("blocks");
  const blocks = transformerBlocks(report.layers);
  section.hidden = !blocks.length || !report.records.length;
  if (section.hidden) return;
  const recorded = [...new Set(report.records.map((r) => r.step))].sort((a, b) => a - b);
  const [first, last] = [recorded[0], recorded.at(-1)];
  const moments = [
    [first, `init (step ${first})`, "solid"],
    [last, `end (step ${last})`, "dash"],
  ];
  const x = blocks.map((_, i) => i + 1);
  /** One line per moment through the layer `role` ("attnOut", "fc2", "output") of every block. */
  const lines = (role, field, label, color) =>
    moments.map(([step, when, dash]) => {
      const at = recordsAt(report.records, step);
      return {
        name: `${label} ${when}`,
        x,
        y: blocks.map((b) => positive(at.get(b[role].index)?.[field])),
        text: blocks.map((b) => b[role].name),
        hovertemplate: "block %{x}: %{text}<br>%{y:.3g}<extra></extra>",
        mode: "lines+markers",
        line: { color, dash },
      };
    });
  const blockAxis = { title: { text: "block (input → output)" }, dtick: 1 };
  const weights = [...lines("attnOut", "grad_norm", "attn.out", "#0072b2"), ...lines("fc2", "grad_norm", "mlp.fc2", "#d55e00")];
  plot("chart-blocks", weights, {
    title: { text: "Weight gradient per block" },
    xaxis: blockAxis,
    yaxis: logAxis("‖∂L/∂W‖", ys(weights)),
  });
  const out = lines("output", "act_grad_norm", "‖∂L/∂h‖", "#009e73");
  const position = report.spec?.norm_position ? ` (${report.spec.norm_position}-LN)` : "";
  plot("chart-block-out", out, {
    title: { text: `Gradient at each block's output${position}` },
    xaxis: blockAxis,
    yaxis: logAxis("‖∂L/∂h‖ at the block output", ys(out)),
  });
  // Which layer that is: the block's last in forward order (mlp.fc2 with pre-LN, norm2 with post-LN).
  const outputLayer = blocks[0].output.name.slice(blocks[0].name.length + 1);
  const stack = report.spec?.norm_position ? ` in this ${report.spec.norm_position}-LN stack` : "";
  document.getElementById("caption-block-out").textContent =
    `‖∂L/∂h‖ at each block's output (the residual stream leaving the block: the ∂L/∂h of its last layer, ` +
    `${outputLayer}${stack}), at initialisation (solid) and at the last recorded step (dashed).`;
}

/** The mean-field prediction through time (verdict.theory.time) as a line over t: through the judged layer's
 * value at the last t at initialisation, slope = predicted decades per step toward t = 0. Drawn only beside what
 * it predicts: the first recorded step, and the quantity of its model (an LSTM's cell path predicts ‖∂L/∂c_t‖). */
function timeTheoryTrace(theory, field, initStep, series, ts) {
  const slope = theory?.predicted_decades_per_step;
  if (!theory?.applicable || initStep === null || slope === null || slope === undefined || !Number.isFinite(slope)) return null;
  if (field !== (theory.model === "lstm_cell" ? "cell_grad_norm" : "grad_norm")) return null;
  const anchor = positive(series(initStep, theory.layer, field).at(-1));
  if (anchor === null) return null;
  const end = ts.at(-1);
  return {
    name: `mean-field prediction (${fmt(slope)} decades/step)`,
    x: ts,
    y: ts.map((t) => anchor * 10 ** (slope * (end - t))),
    mode: "lines",
    line: { dash: "dot", color: "#555" },
  };
}

const timeStep = document.getElementById("time-step");
const timeQuantity = document.getElementById("time-quantity");
const timeLayer = document.getElementById("time-layer");
// The through-time quantities the charts can show, as the axis names them.
const TIME_QUANTITY = { grad_norm: "‖∂L/∂h_t‖", cell_grad_norm: "‖∂L/∂c_t‖" };
// The step selector's default: the first and the last recorded step together.
const ENDS = "ends";

/** A recurrent net's gradient through time (the report's time_records): ‖∂L/∂h_t‖ (or an LSTM's ‖∂L/∂c_t‖)
 * against t per layer at the chosen recorded steps, a heatmap of t × recorded step for one layer, and the gates'
 * mean and saturation over t where the cell has them. The section stays hidden for runs without such records. */
function drawTime(report) {
  const section = document.getElementById("through-time");
  const records = report.time_records || [];
  section.hidden = !records.length;
  if (!records.length) return;
  const names = new Map(report.layers.map((l) => [l.index, l.name]));
  const steps = [...new Set(records.map((r) => r.step))].sort((a, b) => a - b);
  const layers = [...new Set(records.map((r) => r.layer))].sort((a, b) => a - b);
  const ts = [...new Set(records.map((r) => r.t))].sort((a, b) => a - b);
  const byKey = new Map(records.map((r) => [`${r.step}:${r.layer}:${r.t}`, r]));
  const series = (step, layer, field) => ts.map((t) => byKey.get(`${step}:${layer}:${t}`)?.[field] ?? null);
  const label = (layer) => names.get(layer) ?? `layer ${layer}`;
  const color = (layer) => PALETTE[layers.indexOf(layer) % PALETTE.length];
  const [first, last] = [steps[0], steps.at(-1)];

  timeStep.replaceChildren(
    el("option", { value: ENDS }, steps.length > 1 ? `first and last (${first}, ${last})` : `step ${first}`),
    ...steps.map((s) => el("option", { value: String(s) }, `step ${s}`)),
  );
  timeLayer.replaceChildren(...layers.map((l) => el("option", { value: String(l) }, label(l))));
  timeLayer.value = String(layers.at(-1)); // the top layer: where the loss enters through time
  const hasCell = records.some((r) => r.cell_grad_norm !== null && r.cell_grad_norm !== undefined);
  document.getElementById("time-quantity-control").hidden = !hasCell;
  const gated = records.some((r) => r.gate_mean !== null && r.gate_mean !== undefined);
  const saturating = records.some((r) => r.saturation_frac !== null && r.saturation_frac !== undefined);
  document.getElementById("figure-gates").hidden = !gated && !saturating;

  const draw = () => {
    const field = hasCell ? timeQuantity.value : "grad_norm";
    const chosen = timeStep.value === ENDS ? [...new Set([first, last])] : [Number(timeStep.value)];
    const dash = (step) => (chosen.length > 1 && step === last ? "dash" : "solid");
    const profile = layers.flatMap((layer) =>
      chosen.map((step) => ({
        name: `${label(layer)} · step ${step}`,
        x: ts,
        y: series(step, layer, field).map(positive),
        mode: "lines+markers",
        marker: { size: 4 },
        line: { color: color(layer), dash: dash(step) },
      })),
    );
    const theory = timeTheoryTrace(report.verdict.theory.time, field, chosen.includes(first) ? first : null, series, ts);
    if (theory) profile.push(theory);
    plot("chart-time", profile, {
      title: { text: `${TIME_QUANTITY[field]} through time` },
      xaxis: { title: { text: "time step t" } },
      yaxis: logAxis(TIME_QUANTITY[field], ys(profile)),
      legend: { orientation: "h", y: -0.25 },
    });
    const layer = Number(timeLayer.value);
    plot(
      "chart-time-heatmap",
      [
        {
          type: "heatmap",
          x: ts,
          y: steps,
          z: steps.map((step) => series(step, layer, field).map((v) => (positive(v) === null ? null : Math.log10(v)))),
          colorscale: "Viridis",
          colorbar: { title: { text: "log10" }, thickness: 12 },
          hovertemplate: `t %{x}, step %{y}<br>log10 ${TIME_QUANTITY[field]} = %{z:.2f}<extra></extra>`,
        },
      ],
      {
        title: { text: `log10 ${TIME_QUANTITY[field]}: t × step, ${label(layer)}` },
        xaxis: { title: { text: "time step t" } },
        // One row per recorded step, however far apart the steps are.
        yaxis: { title: { text: "recorded step" }, type: "category" },
      },
    );
    if (gated || saturating) drawGates(chosen, dash);
  };

  /** Gate means (top panel) and saturated fractions (bottom panel, under the shared t axis) over t, one colour
   * per layer; one legend entry per line pair. A cell without gates (rnn) or without saturation has one panel. */
  const drawGates = (chosen, dash) => {
    const both = gated && saturating;
    const traces = [];
    for (const layer of layers) {
      for (const step of chosen) {
        const common = { x: ts, mode: "lines", name: `${label(layer)} · step ${step}`, legendgroup: `${layer}:${step}`, line: { color: color(layer), dash: dash(step) } };
        if (gated) traces.push({ ...common, y: series(step, layer, "gate_mean"), yaxis: both ? "y2" : "y" });
        if (saturating) traces.push({ ...common, y: series(step, layer, "saturation_frac"), showlegend: !gated });
      }
    }
    const fraction = (title, domain) => ({ title: { text: title }, range: [0, 1], domain, anchor: "x" });
    plot("chart-gates", traces, {
      title: { text: both ? "Gates and saturation through time" : gated ? "Gates through time" : "Saturation through time" },
      xaxis: { title: { text: "time step t" } },
      ...(both
        ? { yaxis: fraction("saturated fraction", [0, 0.45]), yaxis2: fraction("gate mean", [0.55, 1]) }
        : { yaxis: fraction(gated ? "gate mean" : "saturated fraction", [0, 1]) }),
    });
  };

  timeStep.onchange = draw;
  timeQuantity.onchange = draw;
  timeLayer.onchange = draw;
  draw();
}

async function finish() {
  const run = await getJSON(`/v1/runs/${encodeURIComponent(runId)}`);
  main.classList.remove("following");
  main.classList.toggle("no-report", !run.report);
  showStatus(run.status);
  if (run.status === "succeeded") {
    progressBar.max = 1;
    progressBar.value = 1;
  }
  progressText.textContent =
    run.status === "succeeded" ? `finished in ${fmt(run.report.timing.total_s)} s` : run.status;
  if (run.verdict) {
    verdictBadge.hidden = false;
    verdictBadge.textContent = run.verdict;
    verdictBadge.className = `badge verdict-${run.verdict}`;
  }
  renderVerdict(run);
  renderFindings(run.report);
  if (run.report) showDownloads(run);
  if (run.report) {
    drawCharts(run.report);
    drawTime(run.report);
    drawBlocks(run.report);
  }
  else if (!liveLoss.x.length) placeholder("chart-loss", `No loss curve: the run ${run.status === "failed" ? "failed" : "was cancelled"}.`);
}

if (FINISHED.has(statusBadge.textContent.trim())) finish();
else follow();
