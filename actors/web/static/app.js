// The model-trainer dashboard: plain JS, no build step, no network beyond this server.
// It is a client of the control endpoint like any other: JSON routes through fetch (with
// X-Api-Key when the user gave one) and live views through server-sent events.
"use strict";

(() => {
  const KEY_STORE = "mt-api-key";
  const POLL_MS = 2000;
  const GENERATE_POLL_MS = 500;
  const GENERATE_TIMEOUT_MS = 10 * 60 * 1000;
  const LOG_LINES = 1000;
  const REFRESH_MS = 250; // at most one re-fetch of a run's view and curves per this, on events
  // Every event kind of protocol/events.py: SSE messages are named by kind, and EventSource
  // only delivers a named message to a listener registered for that name. An event only
  // tells the page to re-fetch: the server reduces the events (the view and the curves).
  const EVENT_KINDS = [
    "run.queued", "step.started", "step.completed", "command.duplicate", "corpus.ready",
    "tokenizer.ready", "train.started", "train.progress", "train.completed", "eval.completed",
    "result.ready", "artifact.stored", "run.completed", "run.failed", "run.cancelled",
    "run.cancel_requested",
  ];

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ formatting
  const pad = (n) => String(n).padStart(2, "0");
  function fmtTime(ts) {
    if (ts === null || ts === undefined || ts === "" || !Number.isFinite(Number(ts))) return "–";
    const d = new Date(Number(ts) * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function fmtDuration(seconds) {
    if (!Number.isFinite(seconds) || seconds < 0) return "–";
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
    const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
    if (m < 60) return `${m} min ${s} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }
  function fmtNum(x, digits = 4) {
    if (x === null || x === undefined || x === "" || !Number.isFinite(Number(x))) return "–";
    const v = Number(x);
    if (Number.isInteger(v) && Math.abs(v) >= 1000) return v.toLocaleString("en-US");
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(2);
    return Number(v.toFixed(digits)).toString();
  }
  function fmtInt(x) {
    if (x === null || x === undefined || !Number.isFinite(Number(x))) return "–";
    return Math.round(Number(x)).toLocaleString("en-US");
  }
  // MFU is a fraction (0..1); shown as a percentage, "–" while unknown.
  function fmtPct(x) {
    if (x === null || x === undefined || !Number.isFinite(Number(x))) return "–";
    return `${(Number(x) * 100).toFixed(1)}%`;
  }
  function fmtFlops(x) {
    if (!x || !Number.isFinite(Number(x))) return "–";
    const units = ["", "K", "M", "G", "T", "P", "E"];
    let v = Number(x), i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
    return `${Number(v.toPrecision(3))} ${units[i]}FLOP`;
  }
  // The recipe the run trains with: precision · compile (the reason is its title).
  // DDP: processes (all machines) × each one's threads, and their backend.
  const processesOf = (st) => {
    const threads = st.threads ? ` × ${st.threads} threads` : "";
    return (st.world_size || 1) > 1 ? `${st.world_size} (${st.backend})${threads}` : `1${threads}`;
  };
  const recipeOf = (st) => `${st.precision || "?"} · compile ${st.compile ? "on" : "off"}`;
  function fmtBytes(n) {
    if (!Number.isFinite(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }
  function kvTable(table, rows) {
    table.replaceChildren(...rows.map(([k, v, testid]) =>
      el("tr", testid ? { "data-testid": testid } : {}, el("th", { text: k }), el("td", { text: v }))));
  }

  // ------------------------------------------------------------------ the API
  class ApiError extends Error {
    constructor(status, body) {
      const b = body && typeof body === "object" ? body : { message: String(body || "") };
      super(b.message || `HTTP ${status}`);
      this.status = status;
      this.body = b;
      this.field = b.field || "";
    }
  }

  const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";
  let keyPrompt = null; // one open prompt, shared by every call that got a 401

  function askKey(reason) {
    if (keyPrompt) return keyPrompt;
    const dialog = $("api-key-dialog");
    $("api-key-reason").textContent = reason;
    const input = $("api-key-input");
    input.value = "";
    keyPrompt = new Promise((resolve, reject) => {
      const onSubmit = (ev) => {
        ev.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY_STORE, key);
        finish();
        dialog.close();
        resolve(key);
      };
      const onCancel = () => {
        finish();
        reject(new ApiError(401, { code: "UNAUTHORIZED", message: "an API key is needed (use the API key button)" }));
      };
      const finish = () => {
        $("api-key-form").removeEventListener("submit", onSubmit);
        dialog.removeEventListener("cancel", onCancel);
        keyPrompt = null;
      };
      $("api-key-form").addEventListener("submit", onSubmit);
      dialog.addEventListener("cancel", onCancel);
    });
    if (!dialog.open) dialog.showModal();
    input.focus();
    return keyPrompt;
  }

  function setConn(ok) {
    const node = $("conn-status");
    node.textContent = ok ? "connected" : "server unreachable";
    node.className = ok ? "muted" : "bad";
  }

  // fetch + JSON + the error format; a 401 opens the key prompt and the call is retried.
  async function api(method, path, body) {
    for (let attempt = 0; attempt < 4; attempt += 1) {
      const headers = { Accept: "application/json" };
      const key = apiKey();
      if (key) headers["X-Api-Key"] = key;
      if (body !== undefined) headers["Content-Type"] = "application/json";
      let resp;
      try {
        resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      } catch (e) {
        setConn(false);
        throw new ApiError(0, { code: "NETWORK", message: "the server cannot be reached" });
      }
      setConn(true);
      if (resp.status === 401) {
        await askKey(key ? "The server refused this key; enter the right one." : "This server needs an API key.");
        continue;
      }
      const text = await resp.text();
      let data = text;
      try { data = text ? JSON.parse(text) : null; } catch (e) { /* plain text (logs) */ }
      if (!resp.ok) throw new ApiError(resp.status, data);
      return { status: resp.status, data };
    }
    throw new ApiError(401, { code: "UNAUTHORIZED", message: "the API key was refused" });
  }

  // EventSource cannot send headers: the key travels as ?api_key= on the SSE routes.
  function withKey(path) {
    const key = apiKey();
    if (!key) return path;
    return `${path}${path.includes("?") ? "&" : "?"}api_key=${encodeURIComponent(key)}`;
  }

  // ------------------------------------------------------------------ views and routing
  let cleanups = [];
  let viewToken = 0; // bumped on every view change: late async results of the old view are dropped
  function onLeave(fn) { cleanups.push(fn); }
  function leaveView() {
    viewToken += 1;
    for (const fn of cleanups.splice(0)) {
      try { fn(); } catch (e) { console.error(e); }
    }
  }
  function showView(name) {
    for (const v of document.querySelectorAll(".view")) v.hidden = v.dataset.view !== name;
    for (const a of document.querySelectorAll("header nav a")) {
      a.classList.toggle("active", a.getAttribute("href") === (location.hash || "#/"));
    }
    $("global-error").hidden = true;
  }
  function globalError(err, source = "") {
    const box = $("global-error");
    box.textContent = err instanceof Error ? err.message : String(err);
    box.dataset.source = source;
    box.hidden = false;
  }
  // Call fn now and every ms until the view is left or `stop` is called; a failed poll shows
  // its error until the next one succeeds.
  function every(ms, fn) {
    let stopped = false;
    let timer = null;
    const tick = async () => {
      if (stopped) return;
      try {
        await fn();
        const box = $("global-error");
        if (box.dataset.source === "poll") box.hidden = true;
      } catch (e) {
        if (!stopped) globalError(e, "poll");
      }
      if (!stopped) timer = setTimeout(tick, ms);
    };
    tick();
    const stop = () => { stopped = true; clearTimeout(timer); };
    onLeave(stop);
    return stop;
  }

  function route() {
    leaveView();
    const hash = location.hash || "#/";
    let m;
    if (hash === "#/new" || hash.startsWith("#/new?")) showNewRun(new URLSearchParams(hash.split("?")[1] || ""));
    else if (hash === "#/tokenizers/new") showTokenizerForm(null);
    else if ((m = hash.match(/^#\/tokenizers\/([^/]+)$/))) showTokenizerForm(decodeURIComponent(m[1]));
    else if ((m = hash.match(/^#\/runs\/([^/]+)$/))) showRun(decodeURIComponent(m[1]));
    else showRuns();
  }

  // ------------------------------------------------------------------ runs list
  // The list's filter, sort and the runs ticked for comparison live here, not in the view:
  // they survive a visit to a run's page.
  const MAX_COMPARE = 8; // runs overlaid at once: each is one full curves read
  const list = { runs: [], filter: "", sortKey: "", sortDir: 1, picked: new Set(), drawn: "" };
  const modelOf = (r) => (r.model_family ? `${r.model_family} / ${r.model_size}` : "tokenizer job");
  // What each sortable column sorts by (null: unknown, always last).
  const SORT_KEYS = {
    run_id: (r) => r.run_id,
    status: (r) => r.status,
    model: modelOf,
    corpus: (r) => r.corpus || null,
    step: (r) => r.step || null,
    train_step: (r) => r.train_step || null,
    loss: (r) => r.loss,
    val_loss: (r) => r.val_loss,
    tokens_per_s: (r) => r.tokens_per_s || null,
    mfu: (r) => r.mfu,
    started: (r) => r.started_at ?? r.created_at,
    ended: (r) => r.ended_at,
  };

  function statusBadge(status) {
    return el("span", { class: `badge ${status}`, "data-testid": "run-row-status", text: status });
  }

  function runRow(r) {
    const link = el("a", { href: `#/runs/${encodeURIComponent(r.run_id)}`, text: r.run_id });
    const train = r.total_steps ? `${r.train_step}/${r.total_steps}` : (r.train_step ? String(r.train_step) : "–");
    const td = (text, cls, testid) => el("td", { class: cls, "data-testid": testid, text });
    const picked = list.picked.has(r.run_id);
    const pick = el("input", { type: "checkbox", "data-testid": "run-pick", "aria-label": `compare ${r.run_id}` });
    pick.checked = picked;
    pick.disabled = !picked && list.picked.size >= MAX_COMPARE;
    pick.addEventListener("change", () => {
      if (pick.checked) list.picked.add(r.run_id);
      else list.picked.delete(r.run_id);
      list.drawn = ""; // the rows' ticks and the limit change
      renderRuns();
      compareSoon();
    });
    const tr = el("tr", { "data-testid": "run-row", "data-run-id": r.run_id, "data-status": r.status, class: picked ? "picked" : "" },
      el("td", { class: "pick" }, pick),
      el("td", {}, link),
      el("td", {}, statusBadge(r.status)),
      td(modelOf(r), "", "run-model"),
      td(r.corpus || "–", "ellipsis"),
      td(r.step || "–", "", "run-step"),
      td(train, "num", "run-train-step"),
      td(fmtNum(r.loss), "num", "run-loss"),
      td(fmtNum(r.val_loss), "num"),
      td(r.tokens_per_s ? fmtInt(r.tokens_per_s) : "–", "num", "run-tps"),
      td(fmtPct(r.mfu), "num", "run-mfu"),
      td(fmtTime(r.started_at ?? r.created_at)),
      td(fmtTime(r.ended_at)));
    tr.title = r.message || "";
    tr.addEventListener("click", (ev) => {
      if (!ev.target.closest("a, .pick")) location.hash = `#/runs/${encodeURIComponent(r.run_id)}`;
    });
    return tr;
  }

  // Every word of the filter must be in the run's id, status or model.
  function matches(r, words) {
    const text = `${r.run_id} ${r.status} ${modelOf(r)}`.toLowerCase();
    return words.every((w) => text.includes(w));
  }

  function compareRuns(a, b) {
    const key = SORT_KEYS[list.sortKey];
    const x = key(a), y = key(b);
    const xNone = x === null || x === undefined, yNone = y === null || y === undefined;
    if (xNone || yNone) return xNone === yNone ? 0 : xNone ? 1 : -1;
    const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return order * list.sortDir;
  }

  // The table from the last read of /runs: filtered, then sorted (else the server's order,
  // newest first). Not redrawn when nothing it shows changed, so a tick is not lost to a
  // poll that replaces the row under the pointer.
  function renderRuns() {
    const words = list.filter.toLowerCase().split(/\s+/).filter(Boolean);
    let rows = list.runs.filter((r) => matches(r, words));
    if (list.sortKey) rows = [...rows].sort(compareRuns);
    const drawn = JSON.stringify([rows, list.sortKey, list.sortDir, [...list.picked]]);
    if (drawn !== list.drawn) {
      list.drawn = drawn;
      $("runs-body").replaceChildren(...rows.map(runRow));
    }
    for (const th of document.querySelectorAll("#runs-table th[data-sort]")) {
      if (th.dataset.sort === list.sortKey) th.setAttribute("aria-sort", list.sortDir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    $("runs-empty").hidden = list.runs.length > 0;
    $("runs-table").hidden = list.runs.length === 0;
    $("runs-none-match").hidden = list.runs.length === 0 || rows.length > 0;
  }

  function bindRunsTable() {
    const filter = $("runs-filter");
    filter.value = list.filter;
    if (filter.dataset.bound) return;
    filter.dataset.bound = "1";
    filter.addEventListener("input", () => { list.filter = filter.value; renderRuns(); });
    for (const th of document.querySelectorAll("#runs-table th[data-sort]")) {
      th.querySelector("button").addEventListener("click", () => {
        // First click: ascending; again: descending; a third: back to the server's order.
        if (list.sortKey !== th.dataset.sort) { list.sortKey = th.dataset.sort; list.sortDir = 1; }
        else if (list.sortDir > 0) list.sortDir = -1;
        else list.sortKey = "";
        renderRuns();
      });
    }
    $("compare-clear").addEventListener("click", () => {
      list.picked.clear();
      list.drawn = "";
      renderRuns();
      compareSoon();
    });
  }

  function showRuns() {
    showView("runs");
    bindRunsTable();
    list.drawn = "";
    const token = viewToken;
    compareSoon = () => { if (token === viewToken) updateCompare(token).catch((e) => globalError(e)); };
    onLeave(() => { compareSoon = () => {}; });
    renderCompare();
    every(POLL_MS, async () => {
      const { data } = await api("GET", "/runs?limit=50");
      if (token !== viewToken) return;
      list.runs = data.runs || [];
      renderRuns();
      await updateCompare(token);
    });
  }

  // ------------------------------------------------------------------ compare
  // The loss and validation curves of the ticked runs on one chart, one colour per run
  // (train: solid, validation: dashed with dots), each read from GET /runs/{id}/curves: the
  // whole curve once, then only newer points (`after`) while the run goes on.
  const compared = new Map(); // run id → { train: Map, val: Map, last, final }
  let compareSoon = () => {};
  let compareBusy = false; // one read at a time; one asked for meanwhile runs after it
  let compareAgain = false;

  async function updateCompare(token) {
    if (compareBusy) { compareAgain = true; return; }
    compareBusy = true;
    try {
      do {
        compareAgain = false;
        await readCompared(token);
      } while (compareAgain && token === viewToken);
    } finally {
      compareBusy = false;
    }
    if (token === viewToken) renderCompare();
  }

  async function readCompared(token) {
    for (const id of [...compared.keys()]) if (!list.picked.has(id)) compared.delete(id);
    for (const id of [...list.picked]) {
      const c = compared.get(id) || { train: new Map(), val: new Map(), last: "", final: false };
      if (c.final) continue;
      const row = list.runs.find((r) => r.run_id === id);
      const over = !!row && isOver(row); // read once more after its end: then it is whole
      const after = c.last ? `?after=${encodeURIComponent(c.last)}` : "";
      let data;
      try {
        ({ data } = await api("GET", `/runs/${encodeURIComponent(id)}/curves${after}`));
      } catch (e) {
        if (e.status !== 404) throw e;
        list.picked.delete(id); // gone (expired): nothing to draw
        list.drawn = "";
        renderRuns();
        continue;
      }
      if (token !== viewToken) return;
      for (const [x, y] of data.train_loss || []) c.train.set(x, y);
      for (const [x, y] of data.val_loss || []) c.val.set(x, y);
      if (data.last) c.last = data.last;
      c.final = over;
      compared.set(id, c);
    }
  }

  function renderCompare() {
    const ids = [...list.picked].filter((id) => compared.has(id));
    const box = $("compare-chart");
    $("compare-hint").textContent = list.picked.size
      ? `${list.picked.size} run${list.picked.size === 1 ? "" : "s"}: train loss solid, validation dashed${list.picked.size >= MAX_COMPARE ? ` (at most ${MAX_COMPARE})` : ""}`
      : "Tick runs in the table to overlay their loss and validation curves.";
    $("compare-clear").hidden = list.picked.size === 0;
    box.hidden = ids.length === 0;
    if (!ids.length) { dropChart(box); return; }
    const series = ids.flatMap((id, i) => {
      const c = compared.get(id), color = PALETTE[i % PALETTE.length];
      return [
        { label: `${id} train`, color, points: points(c.train) },
        { label: `${id} val`, color, dash: [6, 4], dots: true, points: points(c.val) },
      ];
    });
    drawChart(box, series, (y) => fmtNum(y, 3));
    box.dataset.points = JSON.stringify(Object.fromEntries(series.map((s) => [s.label, s.points.length])));
  }

  // ------------------------------------------------------------------ forms
  let schemas = null; // components.schemas of /openapi.json: defaults and bounds as hints
  async function loadSchemas() {
    if (schemas) return schemas;
    try {
      const { data } = await api("GET", "/openapi.json");
      schemas = (data.components && data.components.schemas) || {};
    } catch (e) {
      schemas = {};
    }
    return schemas;
  }

  function hintFields(form, schemaName) {
    const props = (schemas[schemaName] && schemas[schemaName].properties) || {};
    for (const input of form.querySelectorAll("input[name][data-type]")) {
      const p = props[input.name];
      if (!p || input.type === "checkbox") continue;
      if (!input.placeholder && p.default !== undefined && p.default !== null && p.default !== "") {
        input.placeholder = String(p.default);
      }
      const lo = p.minimum ?? p.exclusiveMinimum, hi = p.maximum ?? p.exclusiveMaximum;
      if (lo !== undefined || hi !== undefined) input.title = `${lo ?? "…"} to ${hi ?? "…"}`;
    }
  }

  function bindChoices(form) {
    const sync = () => {
      const source = form.querySelector("input[name=corpus_source]:checked");
      for (const f of form.querySelectorAll("[data-source]")) f.hidden = !source || f.dataset.source !== source.value;
      const tok = form.querySelector("input[name=tokenizer_source]:checked");
      for (const f of form.querySelectorAll("[data-tokenizer]")) f.hidden = !tok || f.dataset.tokenizer !== tok.value;
    };
    for (const r of form.querySelectorAll("input[type=radio]")) r.addEventListener("change", sync);
    sync();
  }

  const INT = /^[+-]?\d+$/;
  const FLOAT = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

  // The body of a form: filled fields only (the server applies its defaults to the rest);
  // a value that does not parse is sent as typed, so the API's own 422 message names it.
  function collect(form) {
    const body = {};
    for (const input of form.querySelectorAll("[name][data-type]")) {
      const section = input.closest("[data-source],[data-tokenizer]");
      if (section && section.hidden) continue;
      const type = input.dataset.type;
      if (type === "bool") { body[input.name] = input.checked; continue; }
      const raw = input.value.trim();
      if (input.tagName === "SELECT") { body[input.name] = raw; continue; }
      if (raw === "") continue;
      if (type === "int") body[input.name] = INT.test(raw) ? Number(raw) : raw;
      else if (type === "float") body[input.name] = FLOAT.test(raw) ? Number(raw) : raw;
      else body[input.name] = raw;
    }
    return body;
  }

  function clearErrors(form, box) {
    box.hidden = true;
    box.textContent = "";
    for (const slot of form.querySelectorAll("[data-error-for]")) slot.textContent = "";
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  function showErrors(form, box, err) {
    const message = err.message || "request failed";
    box.textContent = message;
    box.hidden = false;
    const field = (err.field || "").split(/[.[]/)[0];
    if (!field) return;
    const slot = form.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
    const input = form.querySelector(`[name="${CSS.escape(field)}"]`);
    if (slot) slot.textContent = message;
    if (input) {
      input.setAttribute("aria-invalid", "true");
      const details = input.closest("details");
      if (details) details.open = true;
    }
  }

  function bindForm(form, box, path, onCreated) {
    if (form.dataset.bound) return;
    form.dataset.bound = "1";
    bindChoices(form);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors(form, box);
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const { data } = await api("POST", path, collect(form));
        onCreated(data);
      } catch (e) {
        showErrors(form, box, e);
      } finally {
        button.disabled = false;
      }
    });
  }

  async function showNewRun(params) {
    showView("new-run");
    const form = $("train-form");
    bindForm(form, $("train-form-error"), "/runs/train", (created) => {
      location.hash = `#/runs/${encodeURIComponent(created.run_id)}`;
    });
    const tokenizerId = params.get("tokenizer_id");
    if (tokenizerId) { // "train a model with this tokenizer"
      const existing = form.querySelector("input[name=tokenizer_source][value=existing]");
      existing.checked = true;
      existing.dispatchEvent(new Event("change"));
      $("train-tokenizer_id").value = tokenizerId;
    }
    try {
      await loadSchemas();
      hintFields(form, "TrainRequest");
      const { data } = await api("GET", "/runs?limit=100");
      const ids = new Set((data.runs || []).filter((r) => r.status === "completed" && r.tokenizer_id).map((r) => r.tokenizer_id));
      $("known-tokenizers").replaceChildren(...[...ids].map((id) => el("option", { value: id })));
    } catch (e) {
      globalError(e);
    }
  }

  async function showTokenizerForm(tokenizerId) {
    showView("new-tokenizer");
    const form = $("tokenizer-form");
    bindForm(form, $("tokenizer-form-error"), "/tokenizers/train", (created) => {
      location.hash = `#/tokenizers/${encodeURIComponent(created.tokenizer_id)}`;
    });
    loadSchemas().then(() => hintFields(form, "TokenizerTrainRequest"));
    const panel = $("tokenizer-result");
    panel.hidden = !tokenizerId;
    if (!tokenizerId) return;
    $("tokenizer-result-id").textContent = tokenizerId;
    $("tokenizer-result-stats").replaceChildren();
    const stop = every(POLL_MS, async () => {
      let info;
      try {
        ({ data: info } = await api("GET", `/tokenizers/${encodeURIComponent(tokenizerId)}`));
      } catch (e) {
        if (e.status !== 404) throw e;
        info = { status: "unknown" };
      }
      const badge = $("tokenizer-result-status");
      badge.textContent = info.status;
      badge.className = `badge ${info.status}`;
      const runLink = $("tokenizer-result-run");
      runLink.textContent = info.run_id || "–";
      runLink.href = info.run_id ? `#/runs/${encodeURIComponent(info.run_id)}` : "#/";
      const stats = info.stats || {};
      kvTable($("tokenizer-result-stats"), [
        ["kind", info.kind || "–"],
        ...Object.entries(stats).map(([k, v]) => [k, fmtNum(v)]),
        ["path", info.path || "–"],
      ]);
      const use = $("tokenizer-use");
      use.hidden = info.status !== "ready";
      use.href = `#/new?tokenizer_id=${encodeURIComponent(tokenizerId)}`;
      if (["ready", "failed", "cancelled", "unknown"].includes(info.status)) stop();
    });
  }

  // ------------------------------------------------------------------ charts (uPlot)
  // uPlot (vendored, static/uPlot.iife.min.js) draws on a canvas: its colours come from the
  // page's CSS variables, so a chart follows the light or dark theme it was drawn in.
  const PALETTE = ["#2563eb", "#dc2626", "#059669", "#7c3aed", "#d97706", "#0891b2", "#db2777", "#4b5563"];
  const charts = new Map(); // box id → { plot, shape, resize }
  const STEP_INCRS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7].map((p) => m * p)).sort((a, b) => a - b);
  const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // uPlot takes one x array for all series: the union of their steps, null where a series
  // has no point (spanGaps draws its line across those).
  function aligned(series) {
    const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    return [xs, ...series.map((s) => {
      const ys = new Array(xs.length).fill(null);
      for (const [x, y] of s.points) ys[at.get(x)] = y;
      return ys;
    })];
  }

  function chartOptions(box, series, fmtY) {
    const muted = cssVar("--muted"), line = cssVar("--line");
    const axis = { stroke: muted, font: "11px system-ui, sans-serif", grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1 } };
    return {
      width: box.clientWidth || 600,
      height: Number(box.dataset.height) || 220,
      scales: { x: { time: false } },
      axes: [
        { ...axis, incrs: STEP_INCRS, values: (u, ticks) => ticks.map((t) => fmtInt(t)) },
        { ...axis, size: 64, values: (u, ticks) => ticks.map(fmtY) },
      ],
      series: [
        { label: "step", value: (u, v) => (v === null || v === undefined ? "–" : fmtInt(v)) },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 2,
          dash: s.dash,
          spanGaps: true,
          points: s.dots ? { show: true, size: 6, fill: s.color } : {},
          value: (u, v) => (v === null || v === undefined ? "–" : fmtY(v)),
        })),
      ],
      cursor: { drag: { x: true, y: false } }, // drag to zoom on steps; double-click resets
    };
  }

  // series: [{key, label, color, dash, dots, points: [[x, y], ...] sorted by x}]. The chart
  // is made once per set of series and fed new data after that (live updates); the box
  // carries each series' point count (data-<key>-points) for the browser tests.
  function drawChart(box, series, fmtY) {
    const shape = JSON.stringify(series.map((s) => [s.label, s.color, s.dash || null, !!s.dots]));
    let chart = charts.get(box.id);
    if (chart && chart.shape !== shape) { dropChart(box); chart = null; }
    const data = aligned(series);
    if (!chart) {
      const plot = new uPlot(chartOptions(box, series, fmtY), data, box);
      const resize = new ResizeObserver(() => {
        if (box.clientWidth && box.clientWidth !== plot.width) plot.setSize({ width: box.clientWidth, height: plot.height });
      });
      resize.observe(box);
      chart = { plot, shape, resize };
      charts.set(box.id, chart);
    } else {
      // Zoomed in (dragged across steps): new points keep the zoom; else the axes follow them.
      const { plot } = chart, xs = plot.data[0], x = plot.scales.x;
      const zoomed = xs.length > 0 && (x.min > xs[0] || x.max < xs[xs.length - 1]);
      plot.setData(data, !zoomed);
    }
    for (const s of series) if (s.key) box.dataset[`${s.key}Points`] = String(s.points.length);
    box.classList.toggle("empty", !series.some((s) => s.points.length));
    return chart.plot;
  }

  function dropChart(box) {
    const chart = charts.get(box.id);
    if (chart) {
      chart.resize.disconnect();
      chart.plot.destroy();
      charts.delete(box.id);
    }
    box.replaceChildren();
    box.classList.add("empty");
    for (const k of Object.keys(box.dataset)) if (k !== "height") delete box.dataset[k];
  }

  // ------------------------------------------------------------------ one run
  // The run's view (GET /runs/{id}) and its curves (GET /runs/{id}/curves, newer points
  // only after the first read), both reduced from the events by the server.
  function newModel(id) {
    return {
      id, state: null, curves: { train: new Map(), val: new Map(), lr: new Map(), tps: new Map() },
      last: "", evalLoaded: false, params: null,
    };
  }

  // A run is over once it has an end time: its terminal event is the only one that sets it.
  const isOver = (st) => st.ended_at !== null && st.ended_at !== undefined;

  function addPoints(model, data) {
    const add = (map, pts) => { for (const [x, y] of pts || []) map.set(x, y); };
    add(model.curves.train, data.train_loss);
    add(model.curves.val, data.val_loss);
    add(model.curves.lr, data.lr);
    add(model.curves.tps, data.tokens_per_s);
    if (data.last) model.last = data.last;
  }

  const points = (map) => [...map.entries()].sort((a, b) => a[0] - b[0]);

  function renderRun(model) {
    const st = model.state || {};
    const status = st.status || "queued";
    const over = isOver(st);
    const badge = $("run-status");
    badge.textContent = status;
    badge.className = `badge ${status}`;
    $("run-message").textContent = st.cancel_requested && !over ? "cancel requested" : st.message || "";
    const cancel = $("cancel-button");
    cancel.hidden = over;

    const totalSteps = st.total_steps;
    $("stat-model").textContent = st.model_family ? `${st.model_family} / ${st.model_size}` : "–";
    $("stat-step").textContent = st.train_step ? `${st.train_step}${totalSteps ? ` / ${totalSteps}` : ""}` : "–";
    const epochs = st.total_epochs;
    $("stat-epoch").textContent = st.epoch ? `${st.epoch}${epochs ? ` / ${epochs}` : ""}` : "–";
    $("stat-loss").textContent = fmtNum(st.loss);
    const lastVal = points(model.curves.val).pop();
    $("stat-val-loss").textContent = fmtNum(lastVal ? lastVal[1] : st.val_loss);
    $("stat-lr").textContent = st.lr ? st.lr.toExponential(2) : "–";
    $("stat-tps").textContent = st.tokens_per_s ? fmtInt(st.tokens_per_s) : "–";
    $("stat-mfu").textContent = fmtPct(st.mfu);
    const trainingStarted = st.started_at !== null && st.started_at !== undefined;
    $("stat-recipe").textContent = trainingStarted ? recipeOf(st) : "–";
    $("stat-recipe").title = trainingStarted ? st.recipe || "" : "";
    const params = st.parameters || model.params;
    $("stat-params").textContent = params ? fmtInt(params) : "–";

    // The chain: every step of the run, in order, with its state.
    const steps = st.chain || {};
    const chain = (st.steps || []).length ? st.steps : Object.keys(steps);
    $("chain-steps").replaceChildren(...chain.map((name) => {
      const s = steps[name] || { state: "pending" };
      let state = s.state;
      if (state === "pending" && over && status !== "completed") state = "skipped";
      const detail = state === "done" && Number.isFinite(s.duration_s) ? fmtDuration(s.duration_s)
        : state === "running" && s.attempt > 1 ? `attempt ${s.attempt}`
          : state === "failed" ? s.error || "" : "";
      return el("li", { "data-step": name, "data-state": state, class: state, "data-testid": "chain-step" },
        el("span", { class: "step-name", text: name }),
        el("span", { class: "step-state", text: state }),
        el("span", { class: "step-detail", text: detail }));
    }));
    const started = st.started_at, ended = st.ended_at;
    kvTable($("run-facts"), [
      ["corpus", st.corpus || "–"],
      ["tokenizer", st.tokenizer_id || "–"],
      ["created", fmtTime(st.created_at)],
      ["training started", fmtTime(started)],
      ["ended", fmtTime(ended)],
      ["duration", ended && st.created_at ? fmtDuration(ended - st.created_at) : "–"],
      ["attempt", st.attempt ? String(st.attempt) : "–"],
      ["device", trainingStarted ? `${st.device} · ${st.precision}` : "–"],
      ["processes", trainingStarted ? processesOf(st) : "–", "fact-processes"],
      ["recipe", trainingStarted ? recipeOf(st) + (st.recipe ? `: ${st.recipe}` : "") : "–", "fact-recipe"],
      ["FLOPs per token", fmtFlops(st.flops_per_token)],
      ["measured peak", st.peak_flops ? `${fmtFlops(st.peak_flops)}/s` : "–"],
      ["MFU", fmtPct(st.mfu), "fact-mfu"],
    ]);

    drawChart($("loss-chart"), [
      { key: "train", label: "train", color: "#2563eb", points: points(model.curves.train) },
      { key: "val", label: "validation", color: "#dc2626", points: points(model.curves.val), dots: true },
    ], (y) => fmtNum(y, 3));
    drawChart($("lr-chart"), [{ key: "lr", label: "lr", color: "#7c3aed", points: points(model.curves.lr) }],
      (y) => y.toExponential(1));
    drawChart($("tps-chart"), [{ key: "tps", label: "tokens/s", color: "#059669", points: points(model.curves.tps) }],
      (y) => fmtInt(y));

    if (st.corpus_ready) {
      const c = st.corpus_ready;
      kvTable($("corpus-stats"), [
        ["corpus", c.corpus_id],
        ...Object.entries(c.chars || {}).map(([k, v]) => [`${k} chars`, fmtInt(v)]),
        ...Object.entries(c.lines || {}).map(([k, v]) => [`${k} lines`, fmtInt(v)]),
      ]);
    }
    if (st.tokenizer_ready) {
      const t = st.tokenizer_ready;
      kvTable($("tokenizer-stats"), [
        ["tokenizer", t.tokenizer_id, "tokenizer-id"],
        ["kind", t.tokenizer_kind || "–"],
        ...Object.entries(t.stats || {}).map(([k, v]) => [k, fmtNum(v), `tokenizer-stat-${k}`]),
      ]);
    }
    $("tokenizer-stats-empty").hidden = !!st.tokenizer_ready;
    if (st.train_completed) {
      const t = st.train_completed;
      kvTable($("train-summary"), [
        ["status", t.status],
        ["steps", fmtInt(t.steps)],
        ["tokens", fmtInt(t.tokens)],
        ["train loss", fmtNum(t.train_loss)],
        ["val loss", fmtNum(t.val_loss)],
        ["test loss", fmtNum(t.test_loss)],
        ["test perplexity", fmtNum(t.test_ppl, 2)],
        ["best step", fmtInt(t.best_step)],
        ["early stopped", t.early_stopped ? "yes" : "no"],
        ["tokens/s", fmtInt(t.tokens_per_s)],
        ["MFU", fmtPct(t.mfu), "train-summary-mfu"],
      ]);
    }
    $("train-summary-empty").hidden = !!st.train_completed;
    renderSamples(st);
    renderArtifact(model);
    const gen = $("generate-button");
    if (!gen.dataset.busy) {
      gen.disabled = status !== "completed";
      if (status !== "completed") $("generate-status").textContent = "Available once the run has completed.";
      else if ($("generate-status").textContent.startsWith("Available")) $("generate-status").textContent = "";
    }
  }

  // What the model wrote at its latest validation (the run state keeps the latest samples).
  function renderSamples(st) {
    const samples = st.samples || [];
    const box = $("train-samples");
    const key = JSON.stringify([st.samples_step, samples]);
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.replaceChildren(...samples.map((s) => el("div", { class: "sample", "data-testid": "train-sample" },
      el("span", { class: "prompt", text: s.prompt }), document.createTextNode(s.text))));
    $("train-samples-step").textContent = samples.length ? `(step ${fmtInt(st.samples_step)})` : "";
    $("train-samples-empty").hidden = samples.length > 0;
  }

  function renderArtifact(model) {
    const box = $("artifact");
    const raw = model.state && model.state.artifact;
    if (!raw || box.dataset.raw === raw) return;
    box.dataset.raw = raw;
    let a;
    try { a = JSON.parse(raw); } catch (e) { return; }
    const rows = el("table", { class: "kv" });
    kvTable(rows, [
      ["storage", a.storage],
      ["uri", a.uri || "–"],
      ["file id", a.file_id || "–"],
      ["size", fmtBytes(a.size)],
      ["sha256", a.sha256 || "–"],
    ]);
    const parts = [rows];
    if (a.storage === "local") {
      const target = a.target || "run";
      const id = target === "tokenizer" ? model.state.tokenizer_id : model.id;
      const href = `/artifacts/${target}/${encodeURIComponent(id)}`;
      const link = el("a", { id: "artifact-download", "data-testid": "artifact-download", href, download: `${id}.tar.gz`, class: "button", text: "Download .tar.gz" });
      link.addEventListener("click", (ev) => {
        if (!apiKey()) return; // a plain link works without a key
        ev.preventDefault();
        download(href, `${id}.tar.gz`).catch(globalError);
      });
      parts.push(link);
    } else if (a.uri) {
      parts.push(el("a", { id: "artifact-download", "data-testid": "artifact-download", href: a.uri, class: "button", text: "Open in the Data Bank" }));
    }
    box.replaceChildren(...parts);
  }

  // A download that needs the key header: fetch it, then hand the browser a blob URL.
  async function download(href, name) {
    const resp = await fetch(href, { headers: { "X-Api-Key": apiKey() } });
    if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => ({})));
    const url = URL.createObjectURL(await resp.blob());
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  async function loadEval(model, live) {
    model.evalLoaded = true;
    let data;
    try {
      ({ data } = await api("GET", `/runs/${encodeURIComponent(model.id)}/eval`));
    } catch (e) {
      if (e.status === 404) return;
      throw e;
    }
    if (!live()) return;
    const metrics = data.metrics || {};
    const rows = [];
    if (data.split || metrics.source) rows.push(["on", String(metrics.source || data.split)]);
    for (const [k, v] of Object.entries(metrics)) {
      if (typeof v === "number") rows.push([k, fmtNum(v), `eval-${k}`]);
    }
    if (metrics.model && metrics.model.parameters) model.params = metrics.model.parameters;
    kvTable($("eval-metrics"), rows);
    const samples = (data.samples || []).map((s) => el("div", { class: "sample", "data-testid": "eval-sample" },
      el("span", { class: "prompt", text: s.prompt || "" }), document.createTextNode(s.completion || "")));
    $("eval-samples").replaceChildren(...samples);
    $("eval-empty").hidden = true;
  }

  // Live: each event of the run asks for a re-fetch (throttled); the stream ends with the run.
  function followEvents(model, refresh) {
    let es = null;
    let closed = false;
    let timer = null;
    const soon = () => {
      if (timer) return;
      timer = setTimeout(() => { timer = null; refresh(); }, REFRESH_MS);
    };
    const close = () => { closed = true; clearTimeout(timer); if (es) es.close(); };
    es = new EventSource(withKey(`/runs/${encodeURIComponent(model.id)}/events`));
    for (const kind of EVENT_KINDS) es.addEventListener(kind, soon);
    es.onerror = () => {
      // The server ends the stream after the run's last event; the browser would
      // reconnect forever, so stop once the run is over (else let it resume).
      if (closed) return;
      if (es.readyState === EventSource.CLOSED || (model.state && isOver(model.state))) close();
    };
    onLeave(close);
    return close;
  }

  function followLogs(model) {
    const pre = $("log-tail");
    const state = $("log-state");
    state.textContent = "(live)";
    const es = new EventSource(withKey(`/runs/${encodeURIComponent(model.id)}/logs/stream?tail=200&follow=true`));
    let lines = 0;
    es.onmessage = (msg) => {
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
      pre.append(document.createTextNode(`${msg.data}\n`));
      lines += 1;
      while (lines > LOG_LINES && pre.firstChild) { pre.firstChild.remove(); lines -= 1; }
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    };
    es.addEventListener("end", () => { es.close(); state.textContent = "(run ended)"; });
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) state.textContent = "(disconnected)";
    };
    onLeave(() => es.close());
  }

  function bindRunControls(model, refresh) {
    const cancel = $("cancel-button");
    cancel.disabled = false;
    cancel.onclick = async () => {
      cancel.disabled = true;
      try {
        await api("POST", `/runs/${encodeURIComponent(model.id)}/cancel`);
        await refresh();
      } catch (e) {
        $("run-error").textContent = e.message;
        $("run-error").hidden = false;
        cancel.disabled = false;
      }
    };
    const form = $("generate-form");
    const status = $("generate-status");
    const button = $("generate-button");
    loadSchemas().then(() => hintFields(form, "GenerateRequest"));
    delete button.dataset.busy;
    $("generate-output").replaceChildren();
    status.textContent = "";
    let stopped = false;
    onLeave(() => { stopped = true; });
    form.onsubmit = async (ev) => {
      ev.preventDefault();
      const body = collect(form);
      body.prompt = $("prompt-input").value;
      button.disabled = true;
      button.dataset.busy = "1";
      status.textContent = "queued…";
      const base = `/runs/${encodeURIComponent(model.id)}/generate`;
      try {
        const { data: accepted } = await api("POST", base, body);
        const deadline = Date.now() + GENERATE_TIMEOUT_MS;
        status.textContent = "generating…";
        for (;;) {
          if (stopped) return;
          const { status: code, data } = await api("GET", `${base}/${encodeURIComponent(accepted.request_id)}`);
          if (stopped) return;
          if (code === 200) {
            const result = data.result || {};
            const out = (result.samples || []).map((s) => el("div", { class: "sample", "data-testid": "sample" },
              el("span", { class: "prompt", text: result.prompt ?? body.prompt }), document.createTextNode(s)));
            $("generate-output").replaceChildren(...out);
            status.textContent = `${out.length} sample${out.length === 1 ? "" : "s"}`;
            break;
          }
          if (Date.now() > deadline) throw new Error("no answer after 10 minutes");
          await new Promise((r) => setTimeout(r, GENERATE_POLL_MS));
        }
      } catch (e) {
        status.textContent = e.message;
        status.dataset.error = "1";
      } finally {
        delete button.dataset.busy;
        button.disabled = false;
      }
    };
  }

  // The run view is one set of elements reused for every run: nothing of the last run shown
  // may survive into the next (the tests read the charts' data-*-points, for one).
  function resetRunView(id) {
    $("run-id").textContent = id;
    $("run-error").hidden = true;
    $("run-status").textContent = "";
    $("run-status").className = "badge";
    $("run-message").textContent = "";
    $("cancel-button").hidden = true;
    for (const card of document.querySelectorAll("#view-run .card .value")) card.textContent = "–";
    $("stat-recipe").title = "";
    for (const t of ["corpus-stats", "tokenizer-stats", "train-summary", "eval-metrics", "eval-samples", "log-tail", "chain-steps", "run-facts", "generate-output"]) {
      $(t).replaceChildren();
    }
    for (const chart of ["loss-chart", "lr-chart", "tps-chart"]) dropChart($(chart));
    $("generate-status").textContent = "";
    delete $("generate-status").dataset.error;
    $("eval-empty").hidden = false;
    delete $("train-samples").dataset.key;
    $("train-samples").replaceChildren();
    $("train-samples-step").textContent = "";
    $("train-samples-empty").hidden = false;
    const art = $("artifact");
    delete art.dataset.raw;
    art.replaceChildren(el("p", { class: "muted", text: "Not stored yet." }));
  }

  async function showRun(id) {
    showView("run");
    resetRunView(id);
    const model = newModel(id);
    const token = viewToken;
    const live = () => token === viewToken;
    let pending = null;
    const render = () => {
      if (pending || !live()) return;
      pending = setTimeout(() => { pending = null; if (live()) renderRun(model); }, 60);
    };
    onLeave(() => clearTimeout(pending));
    let first = true;
    let stopEvents = null;
    const path = `/runs/${encodeURIComponent(id)}`;
    // One read at a time; a read asked for meanwhile runs once the current one is done.
    let busy = false;
    let dirty = false;
    const load = async () => {
      let state;
      try {
        ({ data: state } = await api("GET", path));
      } catch (e) {
        if (e.status === 404) {
          stop();
          $("run-error").textContent = e.message;
          $("run-error").hidden = false;
          return;
        }
        throw e;
      }
      if (!live()) return;
      const after = model.last ? `?after=${encodeURIComponent(model.last)}` : "";
      const { data: curves } = await api("GET", `${path}/curves${after}`);
      if (!live()) return;
      model.state = state;
      addPoints(model, curves);
      if (first) {
        first = false;
        bindRunControls(model, refresh);
        stopEvents = followEvents(model, () => refresh().catch((e) => globalError(e)));
        followLogs(model);
      }
      const evaluated = state.chain && state.chain.evaluator && state.chain.evaluator.state === "done";
      if ((state.status === "completed" || evaluated) && !model.evalLoaded) await loadEval(model, live);
      render();
      if (isOver(state)) {
        stop();
        if (stopEvents) stopEvents();
      }
    };
    const refresh = async () => {
      if (busy) { dirty = true; return; }
      busy = true;
      try {
        do { dirty = false; await load(); } while (dirty && live());
      } finally {
        busy = false;
      }
    };
    // Polled as well until the run is over (one last read after its end gives the artifact
    // pointer and the final message), should the event stream be cut.
    const stop = every(POLL_MS, refresh);
  }

  // ------------------------------------------------------------------ start
  document.addEventListener("DOMContentLoaded", () => {
    $("api-key-change").addEventListener("click", () => {
      askKey("Enter the API key of this server.").then(route, () => {});
    });
    window.addEventListener("hashchange", route);
    route();
  });
})();
