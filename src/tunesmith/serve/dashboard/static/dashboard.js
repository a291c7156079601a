// tunesmith dashboard: plain JavaScript over this server's own JSON API (no build step, no other host).
// Views are chosen by the URL hash: #/experiments, #/runs/ID, #/jobs, #/jobs/ID, #/playground.
"use strict";

const KEY_STORE = "tunesmith-key";
let apiKey = localStorage.getItem(KEY_STORE) || "";
let needsKey = false; // set when the server answered 401
let timer = null; // the current view's next poll
let viewToken = 0; // bumped on every view change; polls of an old view stop
const view = document.getElementById("view");

// --- helpers ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || "HTTP " + status);
    this.status = status;
    this.param = body && body.error ? body.error.param : null;
    this.code = body && body.error ? body.error.code : null;
  }
}

function authHeaders(extra = {}) {
  return apiKey ? { ...extra, Authorization: "Bearer " + apiKey } : extra;
}

async function api(path, opts = {}) {
  const used = apiKey;
  const r = await fetch("/v1" + path, { ...opts, headers: authHeaders(opts.headers || {}) });
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    if (r.status === 401 && used === apiKey) askKey(true); // a request sent with an older key says nothing
    throw new ApiError(r.status, body);
  }
  return (r.headers.get("content-type") || "").includes("json") ? r.json() : r.text();
}

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

// el("a", {href: "#", class: "x", onclick: fn, dataset: {job: id}}, "text", child, ...)
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "value") e.value = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  children.forEach((c) => e.append(c));
  return e;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

function ago(seconds) {
  if (!seconds) return "–";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return "just now";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(seconds * 1000).toLocaleDateString();
}

function pill(status) {
  return el("span", { class: "pill " + status, "data-status": status }, status.replace("_", " "));
}

function queueText(job) {
  if (!job.queue_position) return null;
  const ahead = job.queue_position - 1;
  return el("span", { class: "muted", "data-queue": job.queue_position },
    ahead === 0 ? " next in the queue" : ` ${ahead} job${ahead > 1 ? "s" : ""} ahead in the queue`);
}

function status(text, isError = false) {
  const s = document.getElementById("updated");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

function page(title, subtitle, ...children) {
  view.replaceChildren(...[el("h1", {}, title), subtitle ? el("p", { class: "sub muted" }, subtitle) : null, ...children]
    .filter((c) => c !== null && c !== undefined));
}

function failure(err) {
  if (err.status === 401) return; // the key form is open
  status("error: " + err.message, true);
}

// runs fn now and then every ms until the view changes or fn returns false
function every(ms, fn) {
  const token = viewToken;
  const tick = async () => {
    if (token !== viewToken) return;
    let again = true;
    try {
      again = (await fn()) !== false;
      status("updated " + new Date().toLocaleTimeString());
    } catch (err) {
      failure(err);
    }
    if (again && token === viewToken) timer = setTimeout(tick, ms);
  };
  tick();
}

// --- API key ------------------------------------------------------------------------------------

function showKeyState() {
  const state = document.getElementById("key-state");
  state.textContent = apiKey ? "key …" + apiKey.slice(-4) : needsKey ? "no key" : "";
  document.getElementById("key-change").hidden = !apiKey && !needsKey;
}

function askKey(rejected) {
  needsKey = true;
  showKeyState();
  const gate = document.getElementById("key-gate");
  const error = document.getElementById("key-error");
  error.hidden = !(rejected && apiKey);
  error.textContent = "The server did not accept this key.";
  document.getElementById("key-cancel").hidden = !apiKey || rejected;
  if (gate.hidden) {
    gate.hidden = false;
    document.getElementById("key").value = "";
    document.getElementById("key").focus();
  }
}

document.getElementById("key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const candidate = document.getElementById("key").value.trim();
  const r = await fetch("/v1/models", { headers: candidate ? { Authorization: "Bearer " + candidate } : {} });
  const error = document.getElementById("key-error");
  if (r.status === 401) {
    error.textContent = "The server did not accept this key.";
    error.hidden = false;
    return;
  }
  apiKey = candidate;
  localStorage.setItem(KEY_STORE, apiKey);
  document.getElementById("key-gate").hidden = true;
  showKeyState();
  route();
});
document.getElementById("key-change").addEventListener("click", () => {
  askKey(false);
  document.getElementById("key-cancel").hidden = false;
});
document.getElementById("key-cancel").addEventListener("click", () => {
  document.getElementById("key-gate").hidden = true;
});

// --- experiments --------------------------------------------------------------------------------

const VERDICT = { better: "better", worse: "worse", "no clear difference": "nodiff" };

function verdictPill(run) {
  if (!run.evaluated) return el("span", { class: "muted" }, "not evaluated yet");
  if (!run.verdict) return el("span", { class: "muted" }, run.best_baseline ? "no paired comparison" : "no baseline");
  return el("span", {},
    el("span", { class: "pill " + VERDICT[run.verdict], "data-verdict": run.verdict }, run.verdict),
    " ", el("span", { class: "muted mono" }, run.difference || ""));
}

function named(x) {
  return x ? [x.name ? x.name + " " : "", el("b", {}, x.display)] : "–";
}

async function showExperiments() {
  const body = el("tbody");
  const empty = el("p", { class: "muted empty", hidden: true },
    "No experiments in the runs folder yet. ", el("code", {}, "tunesmith run RECIPE"),
    " writes one under runs/; start the server with ", el("code", {}, "--runs DIR"), " to show another folder.");
  page("Experiments", "What tunesmith run wrote: the best fine-tuned model against the base model and the best " +
    "LLM-free baseline on the task's headline metric, with the paired verdict.",
  el("section", { class: "card" }, el("div", { class: "table-wrap" }, el("table", { id: "runs" },
    el("thead", {}, el("tr", {}, el("th", {}, "run"), el("th", { class: "hide-narrow" }, "task"),
      el("th", {}, "best fine-tuned"), el("th", { class: "hide-narrow" }, "base"), el("th", {}, "best baseline"),
      el("th", {}, "verdict"), el("th", { class: "hide-narrow" }, "date"))), body)), empty));
  const runs = await api("/runs");
  empty.hidden = runs.data.length > 0;
  body.replaceChildren(...runs.data.map((r) => el("tr", {
    class: "link-row", "data-run": r.id, onclick: () => { location.hash = "#/runs/" + encodeURIComponent(r.id); },
  },
  el("td", {}, el("a", { href: "#/runs/" + encodeURIComponent(r.id) }, r.name)),
  el("td", { class: "hide-narrow" }, r.task, r.headline_metric ? el("div", { class: "muted" }, r.headline_metric) : null),
  el("td", {}, named(r.best)), el("td", { class: "hide-narrow" }, r.base ? r.base.display : "–"),
  el("td", {}, named(r.best_baseline)), el("td", {}, verdictPill(r)),
  el("td", { class: "hide-narrow muted" }, when(r.created_at)))));
  status("updated " + new Date().toLocaleTimeString());
}

function headlineTable(run) {
  const best = run.best && run.best.name;
  return el("div", { class: "table-wrap" }, el("table", { class: "headline", "data-run": run.id },
    el("thead", {}, el("tr", {}, el("th", {}, "contender"),
      el("th", { class: "num" }, (run.headline_metric || "headline") + " (95% CI)"),
      el("th", { class: "num" }, "Δ vs base"))),
    el("tbody", {}, run.table.map((row) => el("tr", { class: `kind-${row.kind}${row.contender === best ? " best" : ""}` },
      el("td", {}, row.contender),
      el("td", { class: "num" }, row.display, " ", el("span", { class: "muted ci" }, row.ci95)),
      el("td", { class: "num" }, row.diff_vs_base || "–"))))));
}

function verdictLine(run) {
  if (!run.best) return run.evaluated ? "" : "This run has not been evaluated yet.";
  let text = `${run.best.name} ${run.headline_metric} ${run.best.display}`;
  if (run.base) text += ` vs base ${run.base.display}`;
  if (run.best_baseline) text += ` and best baseline ${run.best_baseline.name} ${run.best_baseline.display}`;
  return text + (run.verdict ? `: ${run.verdict} (${run.difference}, paired).` : ".");
}

function reportFrame(html, label) {
  // sandboxed: no scripts run in the report; same origin only so the page can size the frame to its content
  const frame = el("iframe", { class: "report", sandbox: "allow-same-origin", title: label });
  frame.addEventListener("load", () => {
    const doc = frame.contentDocument;
    if (doc && doc.documentElement) frame.style.height = doc.documentElement.scrollHeight + 24 + "px";
  });
  frame.srcdoc = html;
  return frame;
}

async function showRun(id, compareWith) {
  const token = viewToken;
  const [run, all] = await Promise.all([api("/runs/" + encodeURIComponent(id)), api("/runs")]);
  if (token !== viewToken) return;
  const other = el("div", { id: "compare-table" });
  const picker = el("select", { id: "compare", "aria-label": "compare with another run" },
    el("option", { value: "" }, "— pick a run —"),
    all.data.filter((r) => r.id !== id).map((r) => el("option", { value: r.id }, r.name)));
  const reportBox = el("div", {}, el("p", { class: "muted" }, run.has_report ? "loading the report…" : "No report.html yet."));
  page(run.name, `${run.task} · ${run.headline_metric || "not evaluated"} · ${when(run.created_at)}`,
    el("p", { class: "verdict" }, run.verdict ? el("span", { class: "pill " + VERDICT[run.verdict], "data-verdict": run.verdict },
      run.verdict) : null, " ", verdictLine(run)),
    el("div", { class: "grid cols-2" },
      el("section", { class: "card" }, el("h2", {}, "Headline table: " + run.name), headlineTable(run)),
      el("section", { class: "card" }, el("div", { class: "row spread" }, el("h2", {}, "Compare with"), picker), other)),
    el("section", { class: "card", style: "margin-top:16px" }, el("h2", {}, "Report"), reportBox));
  const showOther = async (otherId) => {
    history.replaceState(null, "", "#/runs/" + encodeURIComponent(id) + (otherId ? "?compare=" + encodeURIComponent(otherId) : ""));
    if (!otherId) return other.replaceChildren();
    const o = await api("/runs/" + encodeURIComponent(otherId));
    other.replaceChildren(el("p", { class: "muted" }, el("a", { href: "#/runs/" + encodeURIComponent(o.id) }, o.name),
      ` · ${o.task} · `, verdictLine(o)), headlineTable(o));
  };
  picker.addEventListener("change", () => showOther(picker.value).catch(failure));
  if (compareWith && all.data.some((r) => r.id === compareWith)) {
    picker.value = compareWith;
    showOther(compareWith).catch(failure);
  }
  if (run.has_report) {
    const html = await api("/runs/" + encodeURIComponent(id) + "/report");
    if (token === viewToken) reportBox.replaceChildren(reportFrame(html, "report of " + run.name));
  }
  status("updated " + new Date().toLocaleTimeString());
}

// --- jobs ---------------------------------------------------------------------------------------

const FORM_FIELDS = ["training_file", "validation_file", "model", "method", "n_epochs", "batch_size",
  "learning_rate_multiplier", "beta", "suffix", "seed"];

function field(name, label, input, hint) {
  return el(input.tagName === "DIV" ? "div" : "label", { class: "field", "data-field": name }, el("span", {}, label), input,
    hint ? el("div", { class: "hint" }, hint) : null, el("p", { class: "error", "data-error-for": name, hidden: true }));
}

// a number when the text is one, "auto" when empty; anything else goes to the API as typed, which says what is wrong
function hyperValue(text) {
  const t = text.trim();
  if (t === "" || t === "auto") return "auto";
  const n = Number(t);
  return Number.isFinite(n) ? n : t;
}

function fileChoice(name, files, optional) {
  return [
    el("input", { type: "file", name: name + "_upload", accept: ".jsonl,application/jsonl,application/json" }),
    el("select", { name, "aria-label": "or one you uploaded before" },
      el("option", { value: "" }, optional ? "— none —" : "— or pick one you uploaded —"),
      files.map((f) => el("option", { value: f.id }, `${f.filename} (${f.id.slice(-6)})`))),
  ];
}

function jobForm(models, files) {
  const trainable = files.filter((f) => f.purpose === "fine-tune");
  const form = el("form", { id: "new-job", novalidate: true },
    field("training_file", "Training file (JSONL)", el("div", { class: "stack-tight" }, fileChoice("training_file", trainable, false))),
    field("validation_file", "Validation file (optional)", el("div", {}, fileChoice("validation_file", trainable, true)),
      "With one, the job ends with a base vs fine-tuned report."),
    field("model", "Base model", el("select", { name: "model" }, models.map((m) => el("option", { value: m.id }, m.id)))),
    el("fieldset", { "data-field": "method" }, el("legend", {}, "Method"),
      el("div", { class: "row" },
        el("label", {}, el("input", { type: "radio", name: "method", value: "supervised", checked: true }), " supervised"),
        el("label", {}, el("input", { type: "radio", name: "method", value: "dpo" }), " DPO (preference pairs)")),
      el("p", { class: "error", "data-error-for": "method", hidden: true }),
      el("div", { class: "fields-3" },
        field("n_epochs", "Epochs", el("input", { name: "n_epochs", placeholder: "auto", inputmode: "numeric" })),
        field("batch_size", "Batch size", el("input", { name: "batch_size", placeholder: "auto", inputmode: "numeric" })),
        field("learning_rate_multiplier", "LR multiplier", el("input", { name: "learning_rate_multiplier", placeholder: "auto", inputmode: "decimal" })),
        el("div", { class: "dpo-only", hidden: true },
          field("beta", "DPO beta", el("input", { name: "beta", placeholder: "auto", inputmode: "decimal" }))))),
    el("div", { class: "fields-3" },
      el("div", { style: "grid-column: span 2" }, field("suffix", "Suffix", el("input", { name: "suffix", placeholder: "e.g. support" }))),
      field("seed", "Seed", el("input", { name: "seed", placeholder: "random", inputmode: "numeric" }))),
    el("p", { class: "error", "data-error-for": "form", hidden: true }),
    el("button", { type: "submit", class: "primary" }, "Create job"));
  form.addEventListener("change", () => {
    form.querySelector(".dpo-only").hidden = form.elements.method.value !== "dpo";
  });
  form.addEventListener("submit", (ev) => { ev.preventDefault(); createJob(form); });
  return form;
}

function clearErrors(form) {
  form.querySelectorAll("[data-error-for]").forEach((p) => { p.hidden = true; p.textContent = ""; });
  form.querySelectorAll(".invalid").forEach((f) => f.classList.remove("invalid"));
}

// the API names the parameter at fault (e.g. method.supervised.hyperparameters.n_epochs): show it by that field
function showError(form, param, message) {
  const parts = (param || "").split(".");
  const name = parts.reverse().find((p) => FORM_FIELDS.includes(p)) || "form";
  const box = form.querySelector(`[data-error-for="${name}"]`);
  box.textContent = message;
  box.hidden = false;
  const wrap = form.querySelector(`[data-field="${name}"]`);
  if (wrap) wrap.classList.add("invalid");
}

async function chosenFile(form, name) {
  const upload = form.elements[name + "_upload"].files[0];
  if (!upload) return form.elements[name].value || null;
  const data = new FormData();
  data.append("purpose", "fine-tune");
  data.append("file", upload, upload.name);
  let made;
  try {
    made = await api("/files", { method: "POST", body: data });
  } catch (err) {
    err.param = name; // the upload's own errors belong to this field
    throw err;
  }
  // uploaded once: a second try of the form picks the file instead of uploading it again
  for (const select of [form.elements.training_file, form.elements.validation_file]) {
    select.append(el("option", { value: made.id }, `${made.filename} (${made.id.slice(-6)})`));
  }
  form.elements[name].value = made.id;
  form.elements[name + "_upload"].value = "";
  return made.id;
}

async function createJob(form) {
  clearErrors(form);
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    button.textContent = "Uploading…";
    const training = await chosenFile(form, "training_file");
    if (!training) throw new ApiError(400, { error: { message: "Choose a training file (JSONL in OpenAI's format).", param: "training_file" } });
    const validation = await chosenFile(form, "validation_file");
    button.textContent = "Creating…";
    const type = form.elements.method.value;
    const hyper = {};
    for (const name of ["n_epochs", "batch_size", "learning_rate_multiplier"].concat(type === "dpo" ? ["beta"] : [])) {
      hyper[name] = hyperValue(form.elements[name].value);
    }
    const body = { model: form.elements.model.value, training_file: training,
      method: { type, [type]: { hyperparameters: hyper } } };
    if (validation) body.validation_file = validation;
    if (form.elements.suffix.value.trim()) body.suffix = form.elements.suffix.value.trim();
    if (form.elements.seed.value.trim()) body.seed = hyperValue(form.elements.seed.value);
    const job = await postJSON("/fine_tuning/jobs", body);
    location.hash = "#/jobs/" + job.id;
  } catch (err) {
    if (err.status !== 401) showError(form, err.param, err.message);
  } finally {
    button.disabled = false;
    button.textContent = "Create job";
  }
}

function jobRow(j) {
  return el("tr", { class: "link-row", "data-job": j.id, onclick: () => { location.hash = "#/jobs/" + j.id; } },
    el("td", {}, el("a", { href: "#/jobs/" + j.id }, el("code", {}, j.id)),
      el("div", { class: "muted" }, j.fine_tuned_model || j.user_provided_suffix || "")),
    el("td", {}, pill(j.status), el("div", {}, queueText(j))),
    el("td", { class: "hide-narrow" }, j.method ? j.method.type : ""),
    el("td", { class: "muted" }, ago(j.created_at)));
}

async function showJobs() {
  const token = viewToken;
  const [models, files] = await Promise.all([api("/models"), api("/files")]);
  if (token !== viewToken) return;
  const jobsBody = el("tbody");
  const filesBody = el("tbody");
  const none = el("p", { class: "muted empty", id: "nojobs" }, "No jobs for this key yet. Create one with the form.");
  page("Fine-tuning jobs", "Jobs, files and models of this key, as the API shows them.",
    el("div", { class: "grid cols-main" },
      el("div", { class: "stack" },
        el("section", { class: "card" }, el("h2", {}, "Jobs"),
          el("div", { class: "table-wrap" }, el("table", { id: "jobs" }, el("thead", {}, el("tr", {},
            el("th", {}, "job"), el("th", {}, "status"), el("th", { class: "hide-narrow" }, "method"), el("th", {}, "created"))),
          jobsBody)), none),
        el("section", { class: "card" }, el("h2", {}, "Files"), el("div", { class: "table-wrap" }, el("table", { id: "files" }, filesBody)))),
      el("section", { class: "card" }, el("h2", {}, "New fine-tuning job"), jobForm(models.data, files.data))));
  every(2000, async () => {
    const [jobs, fl] = await Promise.all([api("/fine_tuning/jobs?limit=100"), api("/files")]);
    if (token !== viewToken) return false;
    none.hidden = jobs.data.length > 0;
    jobsBody.replaceChildren(...jobs.data.map(jobRow));
    filesBody.replaceChildren(...fl.data.map((f) => el("tr", { "data-file": f.id }, el("td", {}, f.filename),
      el("td", { class: "muted hide-narrow" }, el("code", {}, f.id)), el("td", { class: "muted" }, f.purpose),
      el("td", { class: "num muted" }, f.bytes.toLocaleString() + " B"))));
    if (!fl.data.length) filesBody.append(el("tr", {}, el("td", { class: "muted" }, "No files for this key.")));
  });
}

function lossPoints(events) {
  const train = new Map();
  const valid = new Map();
  let total = 0;
  for (const e of events) {
    if (e.type !== "metrics" || !e.data) continue;
    total = Math.max(total, e.data.total_steps || 0);
    if (e.data.train_loss != null) train.set(e.data.step, e.data.train_loss);
    if (e.data.valid_loss != null) valid.set(e.data.step, e.data.valid_loss);
  }
  const sorted = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
  return { train: sorted(train), valid: sorted(valid), total };
}

function ticks(lo, hi, n) {
  return Array.from({ length: n + 1 }, (_, i) => lo + ((hi - lo) * i) / n);
}

// training (and validation) loss by step; the x axis spans the job's planned steps so progress shows
function lossChart({ train, valid, total }) {
  const W = 640, H = 240, L = 46, R = 12, T = 12, B = 28;
  const chart = svg("svg", { class: "chart loss", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "loss by step" });
  const all = train.concat(valid);
  if (!all.length) {
    chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for the first training step…"));
    return chart;
  }
  const xMax = Math.max(total, ...all.map((p) => p[0]), 1);
  let yLo = Math.min(...all.map((p) => p[1]));
  let yHi = Math.max(...all.map((p) => p[1]));
  const pad = (yHi - yLo) * 0.08 || Math.abs(yHi) * 0.1 || 1;
  yLo = Math.max(0, yLo - pad);
  yHi += pad;
  const sx = (x) => L + (x / xMax) * (W - L - R);
  const sy = (y) => T + (1 - (y - yLo) / (yHi - yLo)) * (H - T - B);
  for (const y of ticks(yLo, yHi, 4)) {
    chart.append(svg("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#eef0f3" }));
    chart.append(svg("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, y.toFixed(yHi - yLo < 0.5 ? 3 : 2)));
  }
  for (const x of ticks(0, xMax, Math.min(5, xMax))) {
    chart.append(svg("text", { x: sx(x), y: H - 8, "text-anchor": "middle" }, String(Math.round(x))));
  }
  chart.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#c9ced8" }));
  const line = (pts, colour, cls) => {
    if (!pts.length) return;
    chart.append(svg("polyline", { class: cls, points: pts.map((p) => sx(p[0]) + "," + sy(p[1])).join(" "),
      fill: "none", stroke: colour, "stroke-width": 2, "stroke-linejoin": "round" }));
    if (pts.length < 40) pts.forEach((p) => chart.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: colour })));
  };
  line(train, "#2563eb", "train");
  line(valid, "#e8772e", "valid");
  return chart;
}

async function allEvents(id) {
  const out = [];
  let after = null;
  for (let i = 0; i < 50; i++) {
    const pg = await api(`/fine_tuning/jobs/${id}/events?limit=1000` + (after ? "&after=" + after : ""));
    out.push(...pg.data);
    if (!pg.has_more) break;
    after = pg.last_id;
  }
  return out; // newest first
}

async function downloadResults(fileId) {
  const text = await api(`/files/${fileId}/content`);
  const csv = atob(text.trim()); // OpenAI returns the results file base64-encoded
  const a = el("a", { href: URL.createObjectURL(new Blob([csv], { type: "text/csv" })), download: "step_metrics.csv" });
  document.body.append(a);
  a.click();
  a.remove();
}

function hyperText(job) {
  const m = job.method || {};
  const h = ((m[m.type] || {}).hyperparameters) || job.hyperparameters || {};
  return Object.entries(h).map(([k, v]) => `${k} ${v}`).join(" · ") || "auto";
}

const ACTIONS = {
  pause: ["queued", "running"],
  resume: ["paused"],
  cancel: ["validating_files", "queued", "running", "paused"],
};
const FINAL = ["succeeded", "failed", "cancelled"];

function jobDetails(job, fileNames) {
  const file = (id) => id ? [el("code", {}, id), fileNames[id] ? el("span", { class: "muted" }, " " + fileNames[id]) : null] : "–";
  const results = (job.result_files || []).map((id) => el("a", {
    href: "#", "data-results": id, onclick: (ev) => { ev.preventDefault(); downloadResults(id).catch(failure); },
  }, "step_metrics.csv"));
  const items = [
    ["status", [pill(job.status), queueText(job)]],
    ["base model", el("code", {}, job.model)],
    ["fine-tuned model", job.fine_tuned_model
      ? [el("code", { id: "ft-model" }, job.fine_tuned_model), " ",
        el("a", { href: "#/playground?model=" + encodeURIComponent(job.fine_tuned_model) }, "try it")] : "–"],
    ["method", (job.method || {}).type || "supervised"],
    ["hyperparameters", hyperText(job)],
    ["training file", file(job.training_file)],
    ["validation file", file(job.validation_file)],
    ["trained tokens", job.trained_tokens != null ? job.trained_tokens.toLocaleString() : "–"],
    ["seed", String(job.seed)],
    ["created", when(job.created_at)],
    ["finished", when(job.finished_at)],
    ["results file", results.length ? results : "–"],
  ];
  if (job.error) items.push(["error", el("span", { class: "error" }, job.error.message)]);
  return el("dl", { class: "kv" }, items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

async function control(job, action, box) {
  try {
    await postJSON(`/fine_tuning/jobs/${job.id}/${action}`, {});
    route();
  } catch (err) {
    box.textContent = err.message;
    box.hidden = false;
  }
}

function jobActions(job) {
  const box = el("p", { class: "error", hidden: true });
  const buttons = Object.entries(ACTIONS).filter(([, states]) => states.includes(job.status)).map(([action]) => {
    const b = el("button", { type: "button", "data-action": action, class: action === "cancel" ? "danger" : "" },
      action[0].toUpperCase() + action.slice(1));
    b.addEventListener("click", () => {
      if (action === "cancel" && !b.dataset.armed) { // cancelling cannot be undone: ask once more on the button
        b.dataset.armed = "1";
        b.textContent = "Confirm cancel";
        return;
      }
      b.disabled = true;
      control(job, action, box);
    });
    return b;
  });
  return el("div", {}, el("div", { class: "row" }, buttons), box);
}

async function showJob(id) {
  const token = viewToken;
  const title = el("div");
  const actions = el("div");
  const head = el("div", { class: "row spread" }, title, actions);
  const chart = el("div");
  const progress = el("p", { class: "muted", style: "margin:4px 0 0" });
  const details = el("div");
  const events = el("ul", { class: "events", id: "events" });
  const report = el("section", { class: "card", hidden: true, style: "margin-top:16px" }, el("h2", {}, "Evaluation report"));
  page("Job", null, head,
    el("div", { class: "grid cols-main", style: "margin-top:12px" },
      el("div", { class: "stack" },
        el("section", { class: "card" }, el("h2", {}, "Loss"), chart,
          el("div", { class: "legend" }, el("span", {}, el("i", { style: "background:#2563eb" }), "training"),
            el("span", {}, el("i", { style: "background:#e8772e" }), "validation")), progress),
        el("section", { class: "card" }, el("h2", {}, "Events"), events)),
      el("section", { class: "card" }, el("h2", {}, "Details"), details)),
    report);
  let lastStatus = null;
  let reportShown = false;
  every(2000, async () => {
    let job;
    try {
      job = await api("/fine_tuning/jobs/" + encodeURIComponent(id));
    } catch (err) {
      if (err.status === 404) {
        page("Job not found", null, el("section", { class: "card" }, el("p", { id: "job-missing" }, err.message),
          el("a", { href: "#/jobs" }, "← all jobs of this key")));
        return false;
      }
      throw err;
    }
    const [evs, files] = await Promise.all([allEvents(job.id), api("/files")]);
    if (token !== viewToken) return false;
    const names = Object.fromEntries(files.data.map((f) => [f.id, f.filename]));
    title.replaceChildren(el("span", {}, el("code", { style: "font-size:15px" }, job.id), " ", pill(job.status), queueText(job)));
    if (lastStatus !== job.status) actions.replaceChildren(jobActions(job));
    lastStatus = job.status;
    const points = lossPoints(evs);
    chart.replaceChildren(lossChart(points));
    const last = points.train.length ? points.train[points.train.length - 1] : null;
    progress.textContent = last ? `step ${last[0]} of ${points.total || "?"} · last training loss ${last[1].toFixed(4)}` +
      (points.valid.length ? ` · last validation loss ${points.valid[points.valid.length - 1][1].toFixed(4)}` : "") : "";
    details.replaceChildren(jobDetails(job, names));
    events.replaceChildren(...evs.map((e) => el("li", { class: e.level },
      el("time", { title: when(e.created_at) }, new Date(e.created_at * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })),
      el("span", { class: "msg" }, e.message))));
    const made = evs.find((e) => e.data && e.data.report);
    if (made && !reportShown) {
      reportShown = true;
      const html = await api(`/fine_tuning/jobs/${job.id}/report`);
      report.append(el("p", { class: "muted" }, made.message), reportFrame(html, "evaluation report of " + job.id));
      report.hidden = false;
    }
    return !FINAL.includes(job.status);
  });
}

// --- playground ---------------------------------------------------------------------------------

function paneBox(tag, models, chosen, defaults) {
  const temp = el("input", { type: "range", min: 0, max: 2, step: 0.1, value: defaults.temperature, name: "temperature" });
  const tempText = el("input", { type: "text", value: defaults.temperature, "aria-label": "temperature value", name: "temperature_text" });
  temp.addEventListener("input", () => { tempText.value = temp.value; });
  tempText.addEventListener("change", () => { temp.value = tempText.value; });
  const pane = el("section", { class: "card pane", "data-pane": tag },
    el("h2", {}, el("span", { class: "tag" }, tag), "Model"),
    field("model", "Model", el("select", { name: "model" }, models.map((m) => el("option",
      { value: m.id, selected: m.id === chosen, dataset: m.head ? { head: m.head } : null }, m.id + (m.head ? ` (${m.head} head)` : ""))))),
    field("system", "System prompt (optional)", el("textarea", { name: "system", rows: 2, placeholder: "none" })),
    el("div", { class: "fields-4" },
      el("div", { style: "grid-column: span 2" }, field("temperature", "Temperature", el("div", { class: "range" }, temp, tempText))),
      field("max_tokens", "Max tokens", el("input", { name: "max_tokens", value: defaults.max_tokens, inputmode: "numeric" })),
      field("seed", "Seed", el("input", { name: "seed", placeholder: "random", inputmode: "numeric" }))),
    el("div", { class: "out", "data-out": tag, "aria-live": "polite" }),
    el("ol", { class: "probs", "data-probs": tag, "aria-label": "label probabilities", hidden: true }),
    el("div", { class: "stats muted", "data-stats": tag }));
  return pane;
}

function paneSettings(pane) {
  const q = (n) => pane.querySelector(`[name="${n}"]`);
  const option = q("model").selectedOptions[0];
  return { model: q("model").value, system: q("system").value.trim(), temperature: Number(q("temperature_text").value),
    max_tokens: hyperValue(q("max_tokens").value), seed: q("seed").value.trim(), head: option ? option.dataset.head : undefined };
}

// A classifier head's answer is one "token" (its label) whose top_logprobs are the most probable labels:
// drawn as bars with percentages, and what the shown labels leave to the others.
const TOP_LABELS = 5;
function showLabelBars(list, tokens) {
  const top = (tokens[0] && tokens[0].top_logprobs) || [];
  const rows = top.map((t) => ({ label: t.token, p: Math.exp(t.logprob) }));
  const rest = 1 - rows.reduce((sum, r) => sum + r.p, 0);
  if (rest > 0.0005) rows.push({ label: "other labels", p: rest, other: true });
  list.replaceChildren(...rows.map((r, i) => {
    const bar = el("i");
    bar.style.width = (100 * r.p).toFixed(1) + "%";
    return el("li", { class: (i === 0 ? "top" : "") + (r.other ? " other" : ""), dataset: r.other ? null : { label: r.label } },
      el("span", { class: "label", title: r.label }, r.label), el("span", { class: "bar", title: `${(100 * r.p).toFixed(2)}%` }, bar),
      el("span", { class: "pct" }, (100 * r.p).toFixed(1) + "%"));
  }));
  list.hidden = rows.length === 0;
}

async function streamInto(pane, prompt, signal) {
  const s = paneSettings(pane);
  const out = pane.querySelector(".out");
  const stats = pane.querySelector(".stats");
  const probs = pane.querySelector(".probs");
  probs.replaceChildren();
  probs.hidden = true;
  out.replaceChildren();
  out.dataset.chunks = "0";
  delete out.dataset.done;
  stats.textContent = "waiting…";
  stats.className = "stats muted";
  const messages = (s.system ? [{ role: "system", content: s.system }] : []).concat([{ role: "user", content: prompt }]);
  const body = { model: s.model, messages, temperature: s.temperature, stream: true, stream_options: { include_usage: true } };
  if (s.max_tokens !== "auto") body.max_tokens = s.max_tokens;
  if (s.seed) body.seed = hyperValue(s.seed); // a sampled answer that can be asked for again
  if (s.head === "classifier") Object.assign(body, { logprobs: true, top_logprobs: TOP_LABELS }); // its label probabilities
  const logprobs = []; // logprobs.content entries of choice 0
  const t0 = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let finish = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", signal, body: JSON.stringify(body),
      headers: authHeaders({ "Content-Type": "application/json" }) });
    if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const doc = JSON.parse(line.slice(6));
          if (doc.error) throw new ApiError(500, doc);
          if (doc.usage) usage = doc.usage;
          for (const c of doc.choices || []) {
            if (c.delta && c.delta.content) {
              if (first === null) first = performance.now();
              out.append(c.delta.content);
              out.dataset.chunks = String(++chunks);
              out.scrollTop = out.scrollHeight;
            }
            if (c.logprobs && c.logprobs.content && c.index === 0) logprobs.push(...c.logprobs.content);
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    if (logprobs.length) showLabelBars(probs, logprobs);
    const secs = (performance.now() - t0) / 1000;
    const tokens = usage ? usage.completion_tokens : chunks;
    stats.textContent = `${tokens} tokens in ${secs.toFixed(1)} s (${(tokens / secs).toFixed(1)}/s)` +
      (first !== null ? ` · first token after ${Math.round(first - t0)} ms` : "") + ` · finish: ${finish || "–"}` +
      (usage ? ` · prompt ${usage.prompt_tokens} tokens` : "");
  } catch (err) {
    if (err.name === "AbortError") stats.textContent = "stopped";
    else {
      stats.textContent = err.message;
      stats.className = "stats error";
    }
  } finally {
    out.dataset.done = "true";
  }
}

async function showPlayground(query) {
  const token = viewToken;
  const params = new URLSearchParams(query || "");
  const models = (await api("/models")).data;
  if (token !== viewToken) return;
  const tuned = models.filter((m) => m.id.startsWith("ft:"));
  const right = params.get("model") || (tuned.length ? tuned[tuned.length - 1].id : models[0] && models[0].id);
  const prompt = el("textarea", { id: "prompt", rows: 3, placeholder: "Ask both sides the same thing (Ctrl+Enter sends)" });
  const send = el("button", { type: "button", class: "primary", id: "send" }, "Send to both");
  const stop = el("button", { type: "button", id: "stop", disabled: true }, "Stop");
  const a = paneBox("A", models, models[0] && models[0].id, { temperature: 0, max_tokens: 128 });
  const b = paneBox("B", models, right, { temperature: 0.7, max_tokens: 128 });
  page("Playground", "One prompt, two models side by side — base against fine-tuned, or one model with and " +
    "without a system prompt. Answers stream in as they are generated.",
  el("section", { class: "card" }, field("prompt", "User message", prompt), el("div", { class: "row" }, send, stop)),
  el("div", { class: "grid cols-2", style: "margin-top:16px" }, a, b));
  let controller = null;
  const run = async () => {
    if (!prompt.value.trim() || controller) return;
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    await Promise.all([streamInto(a, prompt.value, controller.signal), streamInto(b, prompt.value, controller.signal)]);
    controller = null;
    send.disabled = false;
    stop.disabled = true;
  };
  send.addEventListener("click", run);
  stop.addEventListener("click", () => controller && controller.abort());
  prompt.addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) run(); });
  status("updated " + new Date().toLocaleTimeString());
}

// --- routing ------------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/experiments$/, showExperiments, "experiments", true],
  [/^#\/runs\/([^/?]+)(?:\?compare=([^&]+))?$/, showRun, "experiments", true],
  [/^#\/jobs$/, showJobs, "jobs", true],
  [/^#\/jobs\/([^/?]+)$/, showJob, "jobs", true],
  [/^#\/playground(?:\?(.*))?$/, showPlayground, "playground", false], // a query string, decoded by URLSearchParams
];

function route() {
  clearTimeout(timer);
  viewToken++;
  const hash = location.hash || "#/experiments";
  for (const [pattern, show, nav, decode] of ROUTES) {
    const m = hash.match(pattern);
    if (!m) continue;
    document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));
    view.replaceChildren(el("p", { class: "muted" }, "loading…"));
    Promise.resolve(show(...m.slice(1).map((x) => (x === undefined || !decode ? x : decodeURIComponent(x))))).catch(failure);
    return;
  }
  location.hash = "#/experiments";
}

window.addEventListener("hashchange", route);
showKeyState();
route();
