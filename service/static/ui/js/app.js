/* The gradstore web UI: pages over the /v1 API (datastores, examples, selection, jobs).
 *
 * The API key is asked for once per browser session, kept in sessionStorage only and sent as the
 * API-key header (its name comes from /ui/config.json, which also says whether a key is needed);
 * it is never put in a URL. Every failing call shows its {code, message} on the page. Pages are
 * addressed by the URL fragment: #/ (datastores), #/ds/NAME, #/ds/NAME/examples,
 * #/ds/NAME/select, #/jobs. */
(function () {
  "use strict";
  const { el, fmt, table, section, errorBox } = window.gs;
  const KEY_STORAGE = "gradstore.apiKey";
  const main = document.getElementById("main");
  let config = { auth_required: true, api_key_header: "X-API-Key" };
  let pollTimer = null;

  // -- API ----------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, detail) {
      super(message);
      Object.assign(this, { status, code, detail });
    }
  }

  async function call(method, path, body, raw) {
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers[config.api_key_header] = key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new ApiError(0, "network_error", `the service cannot be reached (${err.message})`);
    }
    if (!response.ok) {
      let error = { code: "http_error", message: `${method} ${path} answered ${response.status}` };
      try { error = await response.json(); } catch (_) { /* not JSON: keep the status line */ }
      throw new ApiError(response.status, error.code, error.message, error.detail);
    }
    return raw ? response : response.json();
  }
  const api = {
    get: (path) => call("GET", path),
    post: (path, body) => call("POST", path, body === undefined ? {} : body),
    raw: (path) => call("GET", path, undefined, true),
  };
  const enc = encodeURIComponent;

  // -- page plumbing ------------------------------------------------------------------------------

  function show(...nodes) {
    main.replaceChildren(...nodes);
  }

  /* Run a page: "loading" until it renders; its error on the page, the key prompt on a 401. */
  async function page(title, render) {
    document.title = `gradstore · ${title}`;
    show(el("p", { class: "muted loading" }, "loading…"));
    try {
      await render();
    } catch (err) {
      if (err.status === 401) return keyPrompt(err);
      show(el("h1", {}, title), errorBox(err));
    }
  }

  function keyPrompt(err) {
    const input = el("input", { type: "password", name: "api-key", id: "api-key", autocomplete: "off", required: true, placeholder: "API key" });
    const form = el("form", { class: "card key-form", onsubmit: (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, input.value);
      route();
    } }, el("h1", {}, "API key"),
      el("p", {}, "This service needs an API key. It is kept for this browser session only and sent in the ",
        el("code", {}, config.api_key_header), " header."),
      err ? errorBox(err) : null,
      input, el("button", { type: "submit", class: "primary" }, "Open"));
    sessionStorage.removeItem(KEY_STORAGE);
    show(form);
    input.focus();
  }

  function crumbs(name, current) {
    const link = (href, text) => (current === text ? el("strong", {}, text) : el("a", { href }, text));
    return el("nav", { class: "crumbs" }, el("a", { href: "#/" }, "datastores"), " / ", el("strong", {}, name), " : ",
      link(`#/ds/${enc(name)}`, "overview"), " · ", link(`#/ds/${enc(name)}/examples`, "examples"), " · ",
      link(`#/ds/${enc(name)}/select`, "select"));
  }

  // -- datastores ---------------------------------------------------------------------------------

  async function readiness() {
    const response = await fetch("/readyz");
    return response.json();
  }

  async function datastoresPage() {
    const [list, ready] = await Promise.all([api.get("/v1/datastores"), readiness()]);
    const states = Object.fromEntries(ready.datastores.map((s) => [s.name, s]));
    const rows = list.datastores.map((d) => [el("a", { href: `#/ds/${enc(d.name)}` }, d.name), fmt(d.examples), d.gradient_type,
      d.index || "none", d.checkpoints.map((c) => `${c.name} (${fmt(c.weight, 3)})`).join(", "),
      states[d.name] && !states[d.name].loaded ? el("span", { class: "bad" }, "unavailable") : el("span", { class: "ok" }, "ok")]);
    const broken = ready.datastores.filter((s) => !s.loaded);
    show(el("h1", {}, "Datastores"),
      rows.length ? table(["name", "examples", "gradients", "index", "checkpoints (weight)", "health"], rows, { class: "datastores" })
        : el("p", { class: "muted" }, "No datastore under the service root yet."),
      broken.length ? section("Datastores that cannot be opened", table(["name", "reason"], broken.map((s) => [el("a", { href: `#/ds/${enc(s.name)}` }, s.name), s.error]))) : null);
  }

  async function overviewPage(name) {
    const [detail, stats, ready] = await Promise.all([api.get(`/v1/datastores/${enc(name)}`), api.get(`/v1/datastores/${enc(name)}/stats`), readiness()]);
    const health = ready.datastores.find((s) => s.name === name);
    show(el("h1", {}, name), crumbs(name, "overview"), window.gs.renderOverview(detail, stats, health));
  }

  // -- examples -----------------------------------------------------------------------------------

  async function examplesPage(name, params) {
    const offset = Number(params.get("offset") || 0);
    const q = params.get("q") || "";
    const limit = 20;
    const query = new URLSearchParams({ offset, limit });
    if (q) query.set("q", q);
    const found = await api.get(`/v1/datastores/${enc(name)}/examples?${query}`);
    const go = (o, text) => { location.hash = `#/ds/${enc(name)}/examples?${new URLSearchParams(text ? { offset: o, q: text } : { offset: o })}`; };
    const search = el("input", { type: "search", name: "q", value: q, placeholder: "id or text", class: "search" });
    const last = Math.max(0, found.total - 1);
    show(el("h1", {}, name), crumbs(name, "examples"),
      el("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); go(0, search.value); } }, search, el("button", { type: "submit" }, "Search"),
        el("span", { class: "muted count" }, found.total ? ` ${fmt(offset + 1)}–${fmt(Math.min(offset + limit, found.total))} of ${fmt(found.total)}${q ? ` matching “${q}”` : ""}` : " nothing found"),
        el("button", { type: "button", disabled: offset === 0, onclick: () => go(Math.max(0, offset - limit), q) }, "‹ previous"),
        el("button", { type: "button", class: "next", disabled: offset + limit > last, onclick: () => go(offset + limit, q) }, "next ›")),
      window.gs.exampleList(found.items));
  }

  // -- selection ----------------------------------------------------------------------------------

  /* The strategies the service offers (GET /v1/strategies), or LESS alone from a service that
   * predates the strategy registry. */
  async function strategies() {
    try {
      return { registry: true, list: (await api.get("/v1/strategies")).strategies };
    } catch (err) {
      if (err.status !== 404) throw err;
      return { registry: false, list: [{ name: "less", summary: "LESS: gradient cosine similarity to the targets", needs_targets: "required",
        options_schema: { type: "object", properties: { aggregation: { type: "string", enum: ["less", "max", "mean"], default: "less",
          description: "over the targets: mean within each subtask, max across (less), max or mean" } } } }] };
    }
  }

  /* A form for a strategy's options (its JSON schema's properties but the const `name`);
   * `choices` offers values for free-text properties the page knows (stored scores,
   * checkpoints). Returns [element, read() -> options object]; empty fields are left out. */
  function optionsForm(schema, choices) {
    const fields = [];
    const box = el("div", { class: "options" });
    for (const [key, prop] of Object.entries((schema && schema.properties) || {})) {
      if (prop.const !== undefined) continue;
      const variants = prop.anyOf || [prop];
      const main = variants.find((v) => v.type !== "null") || {};
      const type = main.type;
      const values = main.enum || (type === "string" && choices[key]) || null;
      const optional = variants.some((v) => v.type === "null");
      const initial = prop.default === null || prop.default === undefined ? "" : prop.default;
      let input;
      if (values) {
        input = el("select", { name: `opt-${key}` }, optional ? el("option", { value: "" }, "(default)") : null,
          values.map((c) => el("option", { value: c, selected: c === initial }, c)));
      } else if (type === "boolean") {
        input = el("input", { type: "checkbox", name: `opt-${key}`, checked: initial === true });
      } else if (type === "integer" || type === "number") {
        input = el("input", { type: "number", name: `opt-${key}`, step: type === "integer" ? 1 : "any", value: initial, min: main.minimum, max: main.maximum });
      } else {
        const hint = type === "array" ? "a,b" : type === "object" ? "a=0.7,b=0.3" : "";
        const text = Array.isArray(initial) ? initial.join(",") : typeof initial === "object" ? "" : initial;
        input = el("input", { type: "text", name: `opt-${key}`, value: text, placeholder: hint });
      }
      fields.push([key, type, input]);
      box.append(el("label", { title: prop.description || "" }, `${key.replace(/_/g, " ")} `, input));
    }
    const read = () => {
      const out = {};
      for (const [key, type, input] of fields) {
        if (input.type === "checkbox") out[key] = input.checked;
        else if (input.value === "") continue;
        else if (type === "integer" || type === "number") out[key] = Number(input.value);
        else if (type === "array") out[key] = input.value.split(",").map((v) => v.trim()).filter(Boolean);
        else if (type === "object") {
          out[key] = Object.fromEntries(input.value.split(",").filter((v) => v.trim()).map((pair) => {
            const [name, value] = pair.split("=");
            return [name.trim(), Number(value)];
          }));
        } else out[key] = input.value;
      }
      return out;
    };
    return [box, read];
  }

  function parseJsonl(text) {
    const records = [];
    text.split(/\r?\n/).forEach((line, i) => {
      if (!line.trim()) return;
      try {
        records.push(JSON.parse(line));
      } catch (err) {
        throw new ApiError(0, "invalid_targets", `targets line ${i + 1}: not JSON (${err.message})`);
      }
    });
    if (!records.length) throw new ApiError(0, "invalid_targets", "no target records: paste or upload JSON lines, one record each");
    return records;
  }

  async function selectPage(name) {
    const [detail, stats, offered] = await Promise.all([api.get(`/v1/datastores/${enc(name)}`), api.get(`/v1/datastores/${enc(name)}/stats`), strategies()]);
    const results = el("div", { id: "results" });
    const targets = el("textarea", { name: "targets", rows: 8, placeholder: '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}' });
    const upload = el("input", { type: "file", name: "targets-file", accept: ".jsonl,.json,application/x-ndjson" });
    upload.addEventListener("change", async () => { if (upload.files[0]) targets.value = await upload.files[0].text(); });
    const subtaskField = el("input", { type: "text", name: "subtask_field", placeholder: "e.g. task (optional)" });
    const strategy = el("select", { name: "strategy" }, offered.list.map((s) => el("option", { value: s.name }, s.name)));
    const strategyInfo = el("p", { class: "muted strategy-info" });
    const optionsBox = el("div");
    let readOptions = () => ({});
    const targetsBox = el("fieldset", {}, el("legend", {}, "Target records (JSON lines)"), targets, el("div", {}, upload, " ", el("label", {}, "subtask field ", subtaskField)));
    const chosen = () => offered.list.find((s) => s.name === strategy.value);
    const onStrategy = () => {
      const s = chosen();
      strategyInfo.textContent = `${s.summary || ""}${s.cost ? ` (${s.cost})` : ""}${s.needs_targets ? ` · targets: ${s.needs_targets}` : ""}`;
      const [box, read] = optionsForm(s.options_schema, { score: stats.scores, checkpoint: detail.checkpoints.map((c) => c.name) });
      optionsBox.replaceChildren(box);
      readOptions = read;
      targetsBox.hidden = s.needs_targets === "none";
    };
    strategy.addEventListener("change", onStrategy);
    onStrategy();
    const budgetKind = el("select", { name: "budget-kind" }, el("option", { value: "fraction" }, "fraction"), el("option", { value: "k" }, "k"));
    const budget = el("input", { type: "number", name: "budget", step: "any", min: 0, value: "0.05" });
    budgetKind.addEventListener("change", () => { budget.value = budgetKind.value === "k" ? Math.max(1, Math.ceil(0.05 * detail.examples)) : "0.05"; });
    const sourceBoxes = Object.keys(detail.sources).sort().map((s) => el("label", { class: "check" }, el("input", { type: "checkbox", name: "source", value: s, checked: true }), ` ${s}`));
    const cap = el("input", { type: "number", name: "per_source_cap", min: 1, step: 1 });
    const dedup = el("input", { type: "number", name: "dedup_threshold", step: "any", min: -1, max: 1 });
    const filterRows = el("div", { class: "filters" });
    const addFilter = () => filterRows.append(el("div", { class: "filter" },
      el("select", { name: "filter-score" }, stats.scores.map((s) => el("option", { value: s }, s))),
      el("select", { name: "filter-keep" }, el("option", { value: "below" }, "keep below"), el("option", { value: "above" }, "keep above")),
      el("input", { type: "number", name: "filter-quantile", step: "any", min: 0, max: 1, value: "0.95" }), " quantile ",
      el("button", { type: "button", onclick: (e) => e.target.parentNode.remove() }, "×")));
    const filtersBox = offered.registry && stats.scores.length
      ? el("fieldset", {}, el("legend", {}, "Score filters"), filterRows, el("button", { type: "button", onclick: addFilter }, "add a filter")) : null;

    const request = () => {
      const s = chosen();
      const body = { page_size: 100, export: "jsonl" };
      if (s.needs_targets !== "none" && (s.needs_targets === "required" || targets.value.trim())) {
        body.targets = { records: parseJsonl(targets.value) };
        if (subtaskField.value.trim()) body.targets.subtask_field = subtaskField.value.trim();
      }
      const options = readOptions();
      if (offered.registry) body.strategy = { name: s.name, ...options };
      else Object.assign(body, options);
      const value = Number(budget.value);
      body[budgetKind.value] = budgetKind.value === "k" ? Math.round(value) : value;
      const sources = sourceBoxes.map((l) => l.firstChild).filter((c) => c.checked).map((c) => c.value);
      if (sources.length !== sourceBoxes.length) body.sources = sources;
      if (cap.value) body.per_source_cap = Number(cap.value);
      if (dedup.value) body.dedup_threshold = Number(dedup.value);
      const filters = [...filterRows.children].map((row) => ({ score: row.children[0].value, keep: row.children[1].value, quantile: Number(row.children[2].value) }));
      if (filters.length) body.filters = filters;
      return body;
    };

    const run = el("button", { type: "submit", class: "primary" }, "Run selection");
    const form = el("form", { class: "card select-form", onsubmit: async (event) => {
      event.preventDefault();
      run.disabled = true;
      results.replaceChildren(el("p", { class: "muted loading" }, "selecting…"));
      try {
        await runSelection(name, request(), results);
      } catch (err) {
        if (err.status === 401) return keyPrompt(err);
        results.replaceChildren(errorBox(err));
      } finally {
        run.disabled = false;
      }
    } },
      el("fieldset", {}, el("legend", {}, "Strategy"), strategy, strategyInfo, optionsBox),
      targetsBox,
      el("fieldset", {}, el("legend", {}, "Budget"), budgetKind, " ", budget),
      el("fieldset", {}, el("legend", {}, "Filters"), el("div", {}, "sources: ", sourceBoxes),
        el("label", {}, "per-source cap ", cap), " ", el("label", {}, "dedup threshold ", dedup)),
      filtersBox, run);
    show(el("h1", {}, name), crumbs(name, "select"), form, results);
  }

  async function runSelection(name, body, results) {
    const base = `/v1/datastores/${enc(name)}`;
    const first = await api.post(`${base}/select`, body);
    const summary = await api.get(`${base}/selections/${first.selection_id}/summary`);
    let cursor = first.next_cursor;
    const more = async () => {
      const next = await api.get(`${base}/selections/${first.selection_id}?cursor=${enc(cursor)}&page_size=100`);
      cursor = next.next_cursor;
      return { items: next.items, hasMore: !!cursor };
    };
    let map = null;
    let mapError = null;
    try {
      map = await api.post(`${base}/map`, { sample: 2000, rows: first.items.map((i) => i.row), targets: body.targets });
    } catch (err) {
      mapError = err;
    }
    const download = el("button", { type: "button", class: "download", onclick: async () => {
      try {
        const response = await api.raw(`${base}/selections/${first.selection_id}/export?format=jsonl`);
        const url = URL.createObjectURL(await response.blob());
        const link = el("a", { href: url, download: `selection-${name}-${first.selection_id.slice(0, 12)}.jsonl` });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      } catch (err) {
        download.after(errorBox(err));
      }
    } }, "Download the export (JSONL)");
    const strategy = body.strategy ? body.strategy.name : "less";
    const view = window.gs.renderSelection({ summary, items: first.items, map, mapError, strategy, more: cursor ? more : null },
      (id) => api.get(`${base}/examples/${enc(id)}`));
    results.replaceChildren(el("div", { class: "toolbar" }, download), view);
    if (map && first.items.length < first.total) {
      view.append(el("p", { class: "muted" }, `The map marks the first ${first.items.length} selected examples.`));
    }
  }

  // -- jobs ---------------------------------------------------------------------------------------

  const ACTIVE = new Set(["queued", "running"]);

  async function jobsPage() {
    const listing = el("div", { id: "job-list" });
    const formError = el("div");
    const field = (label, input) => el("label", {}, label, " ", input);
    const inputs = {
      datastore: el("input", { name: "datastore", required: true, placeholder: "name of the new datastore" }),
      corpus: el("textarea", { name: "corpus", rows: 2, required: true, placeholder: "[NAME=]PATH, one per line" }),
      model: el("input", { name: "model", required: true, placeholder: "model folder on the service host" }),
      run: el("input", { name: "run", placeholder: "warmup run folder (optional)" }),
      checkpoints: el("textarea", { name: "checkpoints", rows: 2, placeholder: "[NAME=]DIR[:WEIGHT], one per line (optional)" }),
      gradient_type: el("select", { name: "gradient_type" }, ["adam", "sgd", "sign", "less"].map((g) => el("option", { value: g }, g))),
      proj_dim: el("input", { name: "proj_dim", type: "number", min: 1, value: 8192 }),
      max_length: el("input", { name: "max_length", type: "number", min: 1, value: 2048 }),
      lora_r: el("input", { name: "lora_r", type: "number", min: 1, value: 8 }),
      device: el("input", { name: "device", value: "auto" }),
      overwrite: el("input", { name: "overwrite", type: "checkbox" }),
      // Not named "append": a form's controls shadow its methods of the same name (form.append).
      append: el("input", { name: "append-corpus", type: "checkbox", onchange: () => appendMode() }),
      replace: el("input", { name: "replace", type: "checkbox", disabled: true }),
    };
    // An append takes the model, checkpoints and settings from the store: their fields are off.
    const STORE_SETTINGS = ["model", "run", "checkpoints", "gradient_type", "proj_dim", "max_length", "lora_r", "overwrite"];
    const appendHint = el("p", { class: "muted append-hint", hidden: true }, "Append: the corpus is indexed with the "
      + "store's own model, checkpoints and settings (the greyed fields do not apply) and published as its next version; "
      + "ids the store holds are refused unless replace is checked.");
    function appendMode() {
      const on = inputs.append.checked;
      appendHint.hidden = !on;
      for (const key of STORE_SETTINGS) inputs[key].disabled = on;
      inputs.model.required = !on;
      inputs.replace.disabled = !on;
      inputs.datastore.placeholder = on ? "name of the datastore to add to" : "name of the new datastore";
    }
    const lines = (text) => text.split(/\r?\n/).map((s) => s.trim()).filter(Boolean);
    const form = el("form", { class: "card job-form", onsubmit: async (event) => {
      event.preventDefault();
      formError.replaceChildren();
      const body = { datastore: inputs.datastore.value.trim(), corpus: lines(inputs.corpus.value),
        device: inputs.device.value.trim() || "auto" };
      if (inputs.append.checked) {
        Object.assign(body, { append: true, replace: inputs.replace.checked });
      } else {
        Object.assign(body, { model: inputs.model.value.trim(), checkpoints: lines(inputs.checkpoints.value),
          gradient_type: inputs.gradient_type.value, proj_dim: Number(inputs.proj_dim.value), max_length: Number(inputs.max_length.value),
          lora_r: Number(inputs.lora_r.value), overwrite: inputs.overwrite.checked });
        if (inputs.run.value.trim()) body.run = inputs.run.value.trim();
      }
      try {
        await api.post("/v1/jobs", body);
        await refresh();
      } catch (err) {
        if (err.status === 401) return keyPrompt(err);
        formError.replaceChildren(errorBox(err));
      }
    } }, el("h2", {}, "Start an indexing job"),
      el("div", { class: "form-grid" }, Object.entries(inputs).map(([key, input]) => field(key.replace("_", " "), input))),
      appendHint, el("button", { type: "submit", class: "primary" }, "Start"), formError);

    async function refresh() {
      let jobs;
      try {
        jobs = (await api.get("/v1/jobs")).jobs;
      } catch (err) {
        if (err.status === 401) return keyPrompt(err);
        listing.replaceChildren(errorBox(err));
        return;
      }
      const rows = jobs.map((job) => {
        const p = job.progress || {};
        const share = p.total ? p.done / p.total : 0;
        const cancel = ACTIVE.has(job.status) ? el("button", { class: "cancel", onclick: async (e) => {
          e.target.disabled = true;
          try { await api.post(`/v1/jobs/${enc(job.id)}/cancel`); } catch (err) { e.target.replaceWith(errorBox(err)); }
          await refresh();
        } }, "cancel") : "";
        return [el("code", {}, job.id.slice(0, 12)), job.request.datastore, el("span", { class: `status status-${job.status}` }, job.status),
          el("div", { class: "progress" }, el("div", { class: "bar" }, el("span", { style: `width:${(100 * share).toFixed(1)}%` })),
            `${fmt(p.done || 0)} / ${fmt(p.total || 0)}${p.eta_seconds ? ` · ETA ${Math.round(p.eta_seconds)} s` : ""}`),
          new Date(job.created_at).toLocaleString(), job.error ? el("span", { class: "bad" }, job.error) : "", cancel];
      });
      listing.replaceChildren(rows.length ? table(["job", "datastore", "status", "progress", "created", "error", ""], rows, { class: "jobs" })
        : el("p", { class: "muted" }, "No jobs yet."));
      clearTimeout(pollTimer);
      if (jobs.some((job) => ACTIVE.has(job.status)) && location.hash.startsWith("#/jobs")) pollTimer = setTimeout(refresh, 1000);
    }
    await api.get("/v1/jobs");  // a bad key or a stopped job manager shows before the form
    show(el("h1", {}, "Indexing jobs"), form, section("Jobs", listing));
    await refresh();
  }

  // -- routing ------------------------------------------------------------------------------------

  function route() {
    clearTimeout(pollTimer);
    if (config.auth_required && !sessionStorage.getItem(KEY_STORAGE)) return keyPrompt();
    const [path, query] = (location.hash.replace(/^#/, "") || "/").split("?");
    const params = new URLSearchParams(query || "");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    if (parts[0] === "jobs") return page("jobs", jobsPage);
    if (parts[0] === "ds" && parts[1]) {
      const name = parts[1];
      if (parts[2] === "examples") return page(`${name} examples`, () => examplesPage(name, params));
      if (parts[2] === "select") return page(`${name} selection`, () => selectPage(name));
      return page(name, () => overviewPage(name));
    }
    return page("datastores", datastoresPage);
  }

  async function start() {
    document.getElementById("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); route(); });
    try {
      config = await (await fetch("/ui/config.json")).json();
    } catch (err) {
      show(errorBox({ code: "network_error", message: `the service cannot be reached (${err.message})` }));
      return;
    }
    document.getElementById("forget-key").hidden = !config.auth_required;
    document.getElementById("version").textContent = `gradstore ${config.version}`;
    window.addEventListener("hashchange", route);
    route();
  }

  start();
})();
