// The gateway's page: GET /v1/tasks for the task list, POST /v1/compare for both paths. Same origin only, no
// libraries. An API key typed here stays in this page's memory (never stored) and is sent as a bearer token.
"use strict";

const HISTORY_SIZE = 10;
const STAGES = ["sender", "wire", "receiver", "total"];
const $ = (id) => document.getElementById(id);
const history = [];
let requests = 0;

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// fetch → parsed JSON body; a non-2xx answer throws with the envelope's message.
async function call(path, body) {
  const init = body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    const message = data && data.error && data.error.message ? data.error.message : response.statusText;
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return data;
}

function showError(err) {
  const box = $("error");
  box.textContent = err.status ? `${err.status}: ${err.message}` : `request failed: ${err.message}`;
  box.dataset.status = err.status || "";
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setState(text) { $("state").textContent = text; }

async function loadTasks() {
  setState("loading tasks…");
  try {
    const data = await call("/v1/tasks");
    const select = $("task");
    const previous = select.value;
    select.replaceChildren(...data.tasks.map((t) => {
      const option = new Option(t.bridge ? t.name : `${t.name} (text path only)`, t.name);
      option.dataset.bridge = String(t.bridge);
      return option;
    }));
    if (previous && data.tasks.some((t) => t.name === previous)) select.value = previous;
    clearError();
    setState(`${data.tasks.length} tasks`);
  } catch (err) {
    showError(err);
    setState(err.status === 401 ? "paste an API key" : "no task list");
  }
}

function field(section, name) { return section.querySelector(`[data-field="${name}"]`); }

function renderPath(section, result) {
  field(section, "label").textContent = result.label;
  const bars = Object.entries(result.scores).map(([label, p]) => {
    const row = document.createElement("div");
    row.className = "score" + (label === result.label ? " top" : "");
    row.dataset.label = label;
    const name = document.createElement("span");
    name.textContent = label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * p).toFixed(1)}%`;  // CSSOM, which the CSP allows (no inline style attribute)
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "p";
    value.textContent = p.toFixed(3);
    row.append(name, bar, value);
    return row;
  });
  field(section, "scores").replaceChildren(...bars);
  field(section, "timings").replaceChildren(...STAGES.map((stage) => {
    const row = document.createElement("tr");
    row.dataset.stage = stage;
    const th = document.createElement("th");
    th.textContent = stage;
    const td = document.createElement("td");
    td.textContent = result.timings_ms[stage].toFixed(1);
    row.append(th, td);
    return row;
  }));
  field(section, "wire_bytes").textContent = String(result.wire_bytes);
  const relay = field(section, "relay_text");
  if (relay) relay.textContent = result.relay_text || "";
  const bridge = field(section, "bridge_id");
  if (bridge) bridge.textContent = result.bridge_id || "";
  section.hidden = false;
}

function renderHistory() {
  $("history").tBodies[0].replaceChildren(...history.map((h) => {
    const row = document.createElement("tr");
    for (const [value, cls] of [[h.n, ""], [h.task, ""], [h.bridge.toFixed(1), "ms"], [h.text.toFixed(1), "ms"],
                                [`${h.speedup.toFixed(2)}×`, "ms"], [h.agree ? "yes" : "no", ""]]) {
      const td = document.createElement("td");
      td.textContent = String(value);
      if (cls) td.className = cls;
      row.append(td);
    }
    return row;
  }));
}

async function compare(event) {
  event.preventDefault();
  const button = $("submit");
  button.disabled = true;
  clearError();
  setState("comparing…");
  try {
    const data = await call("/v1/compare", { text: $("text").value, task: $("task").value });
    renderPath($("bridge"), data.bridge);
    renderPath($("text-path"), data.text);
    $("speedup").textContent = `${data.speedup.toFixed(2)}×`;
    $("wire-ratio").textContent = data.wire_ratio.toFixed(2);
    $("agree").textContent = data.agree ? "agree" : "differ";
    $("summary").hidden = false;
    history.unshift({ n: ++requests, task: data.task, bridge: data.bridge.timings_ms.total,
                      text: data.text.timings_ms.total, speedup: data.speedup, agree: data.agree });
    history.length = Math.min(history.length, HISTORY_SIZE);
    renderHistory();
    setState(`done (request ${data.request_id})`);
  } catch (err) {
    showError(err);
    setState("failed");
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", compare);
  $("key").addEventListener("change", loadTasks);
  loadTasks();
});
