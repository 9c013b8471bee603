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
  logAxis,
  placeholder,
  plot,
  positive,
  recordsAt,
  severityBadge,
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
  const layerAxis = {
    title: { text: "layer (input → output)" },
    tickvals: layers.map((l) => l.index),
    ticktext: layers.map((l) => String(l.index)),
  };
  const theory = theoryTrace(layers, atInit, report.verdict.theory);
  const profile = [...profileTraces(layers, atInit, atEnd, "grad_norm", first, last), ...(theory ? [theory] : [])];
  plot("chart-profile", profile, {
    title: { text: "Gradient norm per layer" },
    xaxis: layerAxis,
    yaxis: logAxis("‖∂L/∂W‖", ys(profile)),
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
      yaxis: { ...layerAxis, title: { text: "layer" } },
      margin: { l: 60, r: 16, t: 36, b: 48 },
    },
  );
  if (records.some((r) => positive(r.act_norm) !== null)) {
    const forward = profileTraces(layers, atInit, atEnd, "act_norm", first, last);
    plot("chart-forward", forward, {
      title: { text: "Forward signal per layer" },
      xaxis: layerAxis,
      yaxis: logAxis("RMS of the layer's output", ys(forward)),
    });
  } else {
    placeholder("chart-forward", "This run recorded no forward signal (it predates the act_norm record).");
  }
  const act = profileTraces(layers, atInit, atEnd, "act_grad_norm", first, last);
  plot("chart-act", act, {
    title: { text: "Activation gradient per layer" },
    xaxis: layerAxis,
    yaxis: logAxis("‖∂L/∂h‖", ys(act)),
  });
  const rel = profileTraces(layers, atInit, atEnd, "rel_grad", first, last);
  plot("chart-rel", rel, {
    title: { text: "Relative gradient per layer" },
    xaxis: layerAxis,
    yaxis: logAxis("‖∂L/∂W‖ / ‖W‖", ys(rel)),
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
  if (run.report) drawCharts(run.report);
  else if (!liveLoss.x.length) placeholder("chart-loss", `No loss curve: the run ${run.status === "failed" ? "failed" : "was cancelled"}.`);
}

if (FINISHED.has(statusBadge.textContent.trim())) finish();
else follow();
