// Shared helpers of the dashboard's pages: API calls, DOM building, formatting and chart defaults.

const main = document.getElementById("main");

/** The path prefix the service is mounted under ("" at the root). */
export const BASE = main.dataset.base || "";

/** Verdict and status colours, shared by badges (CSS) and charts. */
export const COLORS = {
  healthy: "#2e7d32",
  vanishing: "#1565c0",
  exploding: "#c62828",
  none: "#9e9e9e",
};

/** A qualitative palette for overlaid runs or configurations (colour-blind friendly, Okabe–Ito). */
export const PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442"];

export const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

/** An API problem (RFC 9457 body) as an Error whose message is the problem's detail. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

/** GET a JSON endpoint of this service; throws ApiError with the problem's detail on failure. */
export async function getJSON(path) {
  const response = await fetch(BASE + path, { headers: { Accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

/** PATCH a JSON body to an endpoint of this service; the answer's JSON, or ApiError with the problem's detail. */
export async function patchJSON(path, body) {
  const response = await fetch(BASE + path, {
    method: "PATCH",
    headers: { Accept: "application/json", "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, answer);
  return answer;
}

/** A form to edit a run's or sweep's name and tags (comma-separated), saved with PATCH `path`. */
export function labelsEditor(path, labels, onSaved) {
  const name = el("input", { name: "name", type: "text", maxlength: "200", value: labels.name || "", placeholder: "a name" });
  const tags = el("input", { name: "tags", type: "text", value: (labels.tags || []).join(", "), placeholder: "tags, comma-separated" });
  const note = el("span", { class: "hint", role: "status", "aria-live": "polite" });
  const form = el(
    "form",
    { class: "labels-form", id: "labels-form", "aria-label": "Name and tags" },
    el("label", {}, "Name ", name),
    el("label", {}, "Tags ", tags),
    el("button", { type: "submit" }, "Save"),
    note,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: name.value.trim(), tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean) };
    try {
      const saved = await patchJSON(path, body);
      note.textContent = "Saved.";
      onSaved?.(saved);
    } catch (error) {
      note.textContent = error.message;
    }
  });
  return form;
}

/** Build an element: el("a", {href: "/x", class: "y"}, "text", child). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

/** A number in 3 significant digits; "—" for missing or non-finite values. */
export function fmt(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  if (value !== 0 && (Math.abs(value) >= 1e4 || Math.abs(value) < 1e-3)) return value.toExponential(2);
  return String(Number(value.toPrecision(3)));
}

export const shortId = (id) => id.slice(0, 8);

/** The recurrent architectures (their width is the hidden size; their reports hold the gradient through time), as
 * models/spec.py's RECURRENT_ARCHS names them (the page carries them). */
export const RECURRENT = new Set((main.dataset.recurrentArchs || "").split(" ").filter(Boolean));

/** What a spec's architecture adds to its label and the runs table's setup cell: an LSTM's forget-gate bias,
 * a transformer's heads, norm position (pre-/post-LN) and pooling. Empty for mlp and cnn, whose norm and
 * residual are choices of their own; a recurrent net's or transformer's are fixed by the architecture. */
export function archDetails(spec) {
  if (spec.arch === "transformer") return [`${spec.heads} heads`, `${spec.norm_position}-LN`, `${spec.pooling} pooling`];
  if (spec.arch === "lstm" && spec.forget_bias !== null && spec.forget_bias !== undefined) return [`forget bias ${spec.forget_bias}`];
  return [];
}

/** A spec's architecture and activation: "sigmoid" for an MLP (the default), "cnn relu", "lstm", "transformer gelu".
 * An LSTM's or GRU's activation is its cell's own (tanh), so it is left out. */
export function archLabel(spec) {
  const arch = spec.arch || "mlp";
  if (arch === "mlp") return spec.activation;
  return arch === "lstm" || arch === "gru" ? arch : `${arch} ${spec.activation}`;
}

/** How a spec's network is set up: the init, what its architecture adds (archDetails), and an MLP's or CNN's
 * normalisation and residual connections when on (a recurrent net's and a transformer's are fixed). */
export function setupParts(spec) {
  const fixed = RECURRENT.has(spec.arch) || spec.arch === "transformer";
  const choices = fixed ? [] : [spec.norm !== "none" ? `${spec.norm} norm` : null, spec.residual ? "residual" : null];
  return [spec.init, ...archDetails(spec), ...choices].filter(Boolean);
}

/** "sigmoid · depth 6 · width 16 · xavier_normal", "lstm · depth 2 · width 16 · default · forget bias 1" — what
 * tells runs apart at a glance. */
export function specLabel(spec) {
  return [archLabel(spec), `depth ${spec.depth}`, `width ${spec.width}`, ...setupParts(spec)].join(" · ");
}

/** "ResNet · 11.2M params · sgd lr 0.01" — an uploaded report's model (it has no spec). */
export function modelLabel(model) {
  const params = model.params >= 1e6 ? `${(model.params / 1e6).toFixed(1)}M` : model.params.toLocaleString();
  return [model.class_name, `${params} params`, `${model.optimizer} lr ${model.lr}`].join(" · ");
}

/** What a run is: its spec, or for an uploaded report (source "external") its name and model. */
export function runLabel(run) {
  if (!run.spec && run.model) return `${run.name ? `${run.name} — ` : ""}${modelLabel(run.model)}`;
  return specLabel(run.spec);
}

/** A run's or sweep's tags as small chips. */
export function tagChips(tags) {
  return el("span", { class: "tags" }, ...tags.map((tag) => el("span", { class: "tag" }, tag)));
}

/** A verdict (or status, while there is no verdict) badge. */
export function verdictBadge(verdict) {
  return el("span", { class: `badge verdict-${verdict || "none"}` }, verdict || "—");
}

/** How a finding kind reads on the page: "forward_signal" → "forward signal". */
export const kindLabel = (kind) => kind.replaceAll("_", " ");

export const SEVERITY_ORDER = { critical: 0, warning: 1, info: 2 };

/** Findings, most severe first (the engine's order among equals). */
export const bySeverity = (findings) =>
  [...findings].sort((a, b) => (SEVERITY_ORDER[a.severity] ?? 3) - (SEVERITY_ORDER[b.severity] ?? 3));

/** A severity badge: critical, warning or info. */
export function severityBadge(severity) {
  return el("span", { class: `badge severity-${severity}` }, severity);
}

/** Compact finding chips ({kind, severity?, message?}): one per kind, most severe first, coloured by its most
 * severe finding and counted when the kind repeats (e.g. ×4: both profiles at init and in training); the
 * sentences are the tooltip. */
export function findingChips(findings) {
  const byKind = new Map();
  for (const f of bySeverity(findings)) {
    const seen = byKind.get(f.kind);
    if (seen) seen.items.push(f);
    else byKind.set(f.kind, { kind: f.kind, severity: f.severity, items: [f] });
  }
  return el(
    "span",
    { class: "chips", dataset: { kinds: findings.map((f) => f.kind).join(" ") } },
    ...[...byKind.values()].map((chip) => {
      const messages = chip.items.map((f) => f.message).filter(Boolean);
      const count = chip.items.length > 1 ? ` ×${chip.items.length}` : "";
      return el(
        "span",
        { class: `chip${chip.severity ? ` severity-${chip.severity}` : ""}`, title: messages.join("\n") || null },
        kindLabel(chip.kind) + count,
      );
    }),
  );
}

export function statusBadge(status) {
  return el("span", { class: `badge status-${status}` }, status);
}

/** The run's page. */
export const runHref = (id) => `${BASE}/runs/${encodeURIComponent(id)}`;

/** The per-layer records of one step, keyed by layer index. */
export function recordsAt(records, step) {
  const byLayer = new Map();
  for (const r of records) if (r.step === step) byLayer.set(r.layer, r);
  return byLayer;
}

/** A layer's group: a transformer block ("block3" of "block3.attn.q") or a stacked recurrent layer ("lstm2" of
 * "lstm2.hh"), as graddiag's networks name them; null for any other layer. */
export function layerGroup(name) {
  const match = /^((?:block|rnn|gru|lstm)\d+)\./.exec(name);
  return match ? match[1] : null;
}

/** A transformer's blocks in forward order, found by structure as service/engine/report.py's transformer_blocks
 * finds them (the verdict's across-block profile reads the same): a top-level module (a layer name's first part)
 * that holds attention layers and linear layers. Each block's `output` is its last layer in forward order, whose
 * ∂L/∂h is the residual stream leaving the block (mlp.fc2 with pre-LN, norm2 with post-LN), `fc2` its last linear
 * layer and `attnOut` its last attention layer (the output projection). Empty for other networks. */
export function transformerBlocks(layers) {
  const groups = new Map();
  for (const layer of layers) {
    const name = layer.name.split(".")[0];
    if (!groups.has(name)) groups.set(name, []);
    groups.get(name).push(layer);
  }
  return [...groups.entries()].flatMap(([name, members]) => {
    const attention = members.filter((l) => l.kind === "attention");
    const linear = members.filter((l) => l.kind === "linear");
    return attention.length && linear.length ? [{ name, output: members.at(-1), fc2: linear.at(-1), attnOut: attention.at(-1) }] : [];
  });
}

/** Positive values only: a log axis cannot show zero or missing values (plotly leaves a gap for null). */
export const positive = (v) => (v !== null && v !== undefined && v > 0 ? v : null);

/** A tick label that states its whole value: "0.02", "300", "2×10⁻⁵" (plotly's rich text for the power). */
export function tickLabel(value) {
  const [mantissa, exponent] = value.toExponential(1).split("e").map(Number);
  if (exponent >= -3 && exponent <= 4) return String(Number(value.toPrecision(2)));
  const power = `10<sup>${exponent < 0 ? "−" : ""}${Math.abs(exponent)}</sup>`;
  return Math.abs(mantissa - 1) < 1e-9 ? power : `${Number(mantissa.toFixed(1))}×${power}`;
}

/** A log y axis for `values`. Across under 3 decades plotly labels the ticks between the powers of ten
 * with a bare digit ("4 5 6 7 8 9 10⁻² 2 3"), which reads as the numbers 4…3; there the ticks are placed
 * here (1, 2, 5 × 10ᵏ, or five evenly spaced ones within a decade) and each label gives its full value. */
export function logAxis(title, values) {
  const axis = { type: "log", exponentformat: "power", title: { text: title } };
  const logs = values.filter((v) => v !== null && v !== undefined && v > 0 && Number.isFinite(v)).map(Math.log10);
  if (!logs.length) return axis;
  const [lo, hi] = [Math.min(...logs), Math.max(...logs)];
  if (hi - lo >= 3) return axis;
  const pad = Math.max(0.05, (hi - lo) * 0.08);
  const [from, to] = [lo - pad, hi + pad];
  let ticks = [];
  for (let k = Math.floor(from); k <= Math.ceil(to); k += 1) {
    for (const m of [1, 2, 5]) {
      const v = m * 10 ** k;
      if (Math.log10(v) >= from && Math.log10(v) <= to) ticks.push(v);
    }
  }
  if (ticks.length < 3) {
    ticks = Array.from({ length: 5 }, (_, i) => Number((10 ** (from + ((to - from) * i) / 4)).toPrecision(2)));
  }
  return { ...axis, range: [from, to], tickmode: "array", tickvals: ticks, ticktext: ticks.map(tickLabel) };
}

const FONT = { family: "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", size: 12 };

/** Draw (or redraw) a chart with the dashboard's defaults. */
export function plot(id, traces, layout = {}) {
  const node = document.getElementById(id);
  node.querySelector(":scope > p.empty")?.remove();
  const base = {
    font: FONT,
    margin: { l: 60, r: 16, t: 36, b: 48 },
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "#fff",
    legend: { orientation: "h", y: -0.22 },
    hovermode: "closest",
  };
  return Plotly.react(node, traces, { ...base, ...layout }, { responsive: true, displaylogo: false });
}

/** Replace a chart with a short message (no data yet, or none to show). */
export function placeholder(id, text) {
  const node = document.getElementById(id);
  if (node.data) Plotly.purge(node);
  node.replaceChildren(el("p", { class: "empty" }, text));
}

/** Show an error in the page (and keep it in the console for whoever debugs it). */
export function showError(target, error) {
  console.warn(error);
  target.hidden = false;
  target.textContent = error.message;
}
