/* Views shared by the web UI (app.js) and the self-contained reports (report.js): each takes data
 * as the /v1 API answers it and returns DOM elements; none fetches anything. Charts are drawn
 * with the vendored uPlot (window.uPlot). Everything is attached to window.gs. */
(function () {
  "use strict";
  const gs = (window.gs = window.gs || {});

  // -- DOM --------------------------------------------------------------------------------------

  /* el("div", {class: "x", onclick: f}, child, "text", [more children]) */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value) && digits === undefined) return value.toLocaleString("en-US");
    const d = digits === undefined ? 4 : digits;
    return Math.abs(value) >= 1e5 || (Math.abs(value) < 1e-3 && value !== 0) ? value.toExponential(2) : value.toFixed(d);
  }

  function table(headers, rows, attrs) {
    return el("table", attrs || {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
  }

  function section(title, ...children) {
    return el("section", { class: "card" }, el("h2", {}, title), children);
  }

  /* An API error ({status, code, message}) as a visible box: never a blank page. */
  function errorBox(err) {
    const code = err && err.code ? err.code : "error";
    const status = err && err.status ? ` (HTTP ${err.status})` : "";
    return el("div", { class: "error", role: "alert", "data-code": code },
      el("strong", {}, `${code}${status}: `), el("span", { class: "message" }, err && err.message ? err.message : String(err)));
  }

  // -- charts -----------------------------------------------------------------------------------

  // Pool sources; the selection (red) and the targets (black) stand out from all of them.
  const PALETTE = ["#4e79a7", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#bab0ac", "#86bcb6"];

  function histogramTitle(h) {
    return h.checkpoint ? `${h.name} · ${h.checkpoint}` : h.name;
  }

  /* A histogram (and optionally a second one in the same bins, drawn over it) with an optional
   * vertical cut-off line. */
  function histogramChart(h, options) {
    const opts = options || {};
    const box = el("div", { class: "chart", "data-chart": opts.name || h.name });
    box.append(el("div", { class: "chart-title" }, opts.title || histogramTitle(h),
      el("span", { class: "muted" }, `  n=${fmt(h.count)}${h.missing ? `, ${h.missing} missing` : ""}` +
        (h.mean !== null && h.mean !== undefined ? `, mean ${fmt(h.mean, 3)}` : ""))));
    if (!h.counts.length) {
      box.append(el("p", { class: "muted" }, "no finite values"));
      return box;
    }
    const xs = h.edges.slice(0, -1);
    const data = [xs, h.counts];
    const bars = uPlot.paths.bars({ size: [1, Infinity], align: 1, gap: 1 });
    const series = [{}, { label: opts.label || "pool", fill: "rgba(78,121,167,0.55)", stroke: "#4e79a7", paths: bars, points: { show: false } }];
    if (opts.overlay) {
      data.push(opts.overlay.counts);
      series.push({ label: opts.overlayLabel || "selected", fill: "rgba(242,142,43,0.8)", stroke: "#f28e2b", paths: bars, points: { show: false } });
    }
    const width = opts.width || 360;
    const step = h.edges[1] - h.edges[0];
    const plot = new uPlot({
      width, height: opts.height || 170, legend: { show: !!opts.overlay, live: false },
      cursor: { show: false },
      scales: { x: { time: false, range: () => [h.edges[0], h.edges[h.edges.length - 1]] }, y: { range: (u, lo, hi) => [0, Math.max(1, hi) * 1.05] } },
      axes: [{ size: 30, values: (u, ticks) => ticks.map((t) => fmt(t, 2)) }, { size: 44 }],
      series,
      hooks: {
        draw: [(u) => {
          if (opts.cutoff === null || opts.cutoff === undefined) return;
          const x = u.valToPos(opts.cutoff, "x", true);
          const ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = "#c0392b";
          ctx.lineWidth = 2 * devicePixelRatio;
          ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.restore();
        }],
      },
    }, data, box);
    box.uplot = plot;
    box.dataset.step = step;
    if (opts.cutoff !== null && opts.cutoff !== undefined) {
      box.append(el("div", { class: "muted cutoff" }, `cut-off (lowest selected score): ${fmt(opts.cutoff)}`));
    }
    return box;
  }

  /* The 2-D map: the sampled pool coloured by source, selected rows and targets marked. uPlot
   * draws points only, over one sorted x axis: every group is a series with nulls elsewhere. */
  function mapChart(map, options) {
    const opts = options || {};
    const groups = [];
    const sources = [...new Set(map.sample.sources || ["pool"])].sort();
    for (const source of sources) {
      const points = [];
      map.sample.x.forEach((x, i) => {
        if ((map.sample.sources ? map.sample.sources[i] : "pool") === source) points.push([x, map.sample.y[i]]);
      });
      groups.push({ label: `pool: ${source}`, points, color: PALETTE[sources.indexOf(source) % PALETTE.length] + "99", size: 6 });
    }
    if (map.rows && map.rows.x.length) {
      groups.push({ label: opts.rowsLabel || "selected", points: map.rows.x.map((x, i) => [x, map.rows.y[i]]), color: "#e15759", size: 9 });
    }
    if (map.targets && map.targets.x.length) {
      groups.push({ label: "targets", points: map.targets.x.map((x, i) => [x, map.targets.y[i]]), color: "#000000", size: 11, star: true });
    }
    const all = [];
    groups.forEach((g, gi) => g.points.forEach(([x, y]) => all.push([x, gi, y])));
    all.sort((a, b) => a[0] - b[0]);
    const data = [all.map((p) => p[0])];
    groups.forEach((g, gi) => data.push(all.map((p) => (p[1] === gi ? p[2] : null))));
    const box = el("div", { class: "chart map", "data-chart": "map" });
    const ev = map.explained_variance || [0, 0];
    box.append(el("div", { class: "chart-title" }, "Map of the pool (PCA of the stored features)",
      el("span", { class: "muted" }, `  ${map.sample.x.length} of ${fmt(map.examples)} examples sampled; axes explain ` +
        `${(100 * ev[0]).toFixed(1)} % and ${(100 * ev[1]).toFixed(1)} % of the variance`)));
    new uPlot({
      width: opts.width || 720, height: opts.height || 440,
      cursor: { show: false }, legend: { show: true, live: false },
      scales: { x: { time: false } },
      axes: [{ label: "PC 1", values: (u, t) => t.map((v) => fmt(v, 2)) }, { label: "PC 2", size: 50, values: (u, t) => t.map((v) => fmt(v, 2)) }],
      series: [{}].concat(groups.map((g) => ({
        label: g.label, stroke: g.color, fill: g.color, paths: () => null,
        points: { show: true, size: g.size, width: g.star ? 2 : 1, stroke: g.star ? "#ffffff" : g.color, fill: g.color, space: 0 },
      }))),
    }, data, box);
    return box;
  }

  // -- datastore overview -----------------------------------------------------------------------

  function sourcesTable(sources, selected) {
    const total = Object.values(sources).reduce((a, b) => a + b, 0) || 1;
    const rows = Object.entries(sources).sort((a, b) => b[1] - a[1]).map(([name, count]) => [
      name, fmt(count), el("div", { class: "bar" }, el("span", { style: `width:${(100 * count / total).toFixed(1)}%` })),
      `${(100 * count / total).toFixed(1)} %`]);
    return table(["source", "examples", "", "share"], rows, { class: "sources" });
  }

  function renderOverview(detail, stats, health) {
    const root = el("div", { class: "overview", "data-view": "overview" });
    const state = health ? (health.loaded ? el("span", { class: "ok" }, "loaded") : el("span", { class: "bad" }, `unavailable: ${health.error}`)) : "–";
    root.append(section("Datastore",
      table(["", ""], [
        ["examples", fmt(detail.examples)], ["health", state], ["gradient type", detail.gradient_type],
        ["index", detail.index || "none (exact scans)"], ["feature dimension", fmt(detail.dim)],
        ["model", detail.model && (detail.model.path || detail.model.architecture)],
        ["projection", detail.projection ? `${detail.projection.kind || ""} k=${detail.projection.dim} seed=${detail.projection.seed}` : "–"],
        ["created", detail.created_at],
        ["version", detail.version == null ? "–" : `${detail.version} (published ${detail.updated_at})`],
        ["gradstore", detail.gradstore_version],
      ], { class: "kv" })));
    root.append(section("Checkpoints and weights",
      table(["checkpoint", "weight", "learning rate"], detail.checkpoints.map((c) => [c.name, fmt(c.weight, 4), fmt(c.learning_rate)]))));
    root.append(section("Examples per source", sourcesTable(stats.sources)));
    const grid = el("div", { class: "grid" });
    for (const h of stats.histograms) grid.append(histogramChart(h));
    root.append(section(`Distributions${stats.scores.length ? "" : " (this store keeps no quality scores)"}`, grid));
    return root;
  }

  // -- examples ---------------------------------------------------------------------------------

  function messagesOf(record) {
    if (Array.isArray(record.messages)) return record.messages;
    if (record.prompt !== undefined) return [{ role: "user", content: record.prompt }, { role: "assistant", content: record.completion }];
    if (record.text !== undefined) return [{ role: "text", content: record.text }];
    return [{ role: "record", content: JSON.stringify(record, null, 2) }];
  }

  /* One stored example as a chat, with its stored scores and its other fields. */
  function renderExample(example, extra) {
    const chat = el("div", { class: "chat" }, messagesOf(example.record).map((m) =>
      el("div", { class: `msg role-${String(m.role).replace(/[^a-z]/g, "")}` }, el("div", { class: "role" }, m.role), el("pre", {}, String(m.content)))));
    const facts = [["id", example.id], ["source", example.source], ["row", fmt(example.row)],
      ["tokens", `${fmt(example.num_tokens)} (${fmt(example.num_label_tokens)} with loss)${example.truncated ? ", truncated" : ""}`]];
    for (const [key, value] of Object.entries(extra || {})) facts.push([key, value]);
    const other = Object.fromEntries(Object.entries(example.record).filter(([k]) => !["messages", "prompt", "completion", "text", "id"].includes(k)));
    const scores = (example.scores || []).map((s) => [s.name, s.checkpoint || "–", fmt(s.value)]);
    return el("div", { class: "example", "data-id": example.id },
      chat,
      el("div", { class: "example-side" },
        table(["", ""], facts, { class: "kv" }),
        scores.length ? table(["score", "checkpoint", "value"], scores, { class: "scores" }) : null,
        Object.keys(other).length ? el("pre", { class: "fields" }, JSON.stringify(other, null, 2)) : null));
  }

  function exampleList(items, onOpen) {
    return el("div", { class: "example-list" }, items.map((ex) => {
      const first = messagesOf(ex.record)[0];
      const detail = el("div", { class: "expand" });
      const row = el("div", { class: "example-row", "data-id": ex.id },
        el("button", { class: "link", onclick: () => {
          if (detail.childNodes.length) { detail.replaceChildren(); return; }
          detail.replaceChildren(renderExample(ex));
          if (onOpen) onOpen(ex);
        } }, ex.id),
        el("span", { class: "muted" }, ` ${ex.source} · ${ex.num_tokens} tokens · `),
        el("span", { class: "snippet" }, String(first.content).slice(0, 140)));
      return el("div", {}, row, detail);
    }));
  }

  // -- selection results ------------------------------------------------------------------------

  /* The ranked list (rows expand to the record, fetched or looked up by loadExample(id) ->
   * Promise<Example>), composition, score histogram with the cut-off, subtasks and the map. */
  function renderSelection(result, loadExample) {
    const { summary, items } = result;
    const root = el("div", { class: "selection", "data-view": "selection" });
    root.append(el("p", { class: "summary-line" },
      `Selected ${fmt(summary.total)} of ${fmt(summary.pool)} eligible examples` +
      (result.strategy ? ` with ${result.strategy}` : "") + `; cut-off score ${fmt(summary.cutoff)}.`));
    const ranked = el("tbody");
    const addRows = (list) => {
      for (const item of list) {
        const detail = el("tr", { class: "detail", hidden: true }, el("td", { colspan: 5 }));
        const subs = Object.entries(item.subtask_scores || {}).map(([k, v]) => `${k} ${fmt(v, 3)}`).join(", ");
        const row = el("tr", { class: "ranked", "data-id": item.id, onclick: async () => {
          if (!detail.hidden) { detail.hidden = true; return; }
          detail.hidden = false;
          const cell = detail.firstChild;
          cell.replaceChildren(el("span", { class: "muted" }, "loading…"));
          try {
            const example = await loadExample(item.id);
            cell.replaceChildren(renderExample(example, { score: fmt(item.score), rank: item.rank }));
          } catch (err) {
            cell.replaceChildren(errorBox(err));
          }
        } }, el("td", {}, item.rank), el("td", {}, fmt(item.score)), el("td", { class: "id" }, item.id), el("td", {}, item.source), el("td", { class: "muted" }, subs));
        ranked.append(row, detail);
      }
    };
    addRows(items);
    const list = el("table", { class: "ranking" }, el("thead", {}, el("tr", {}, ["rank", "score", "id", "source", "subtask scores"].map((h) => el("th", {}, h)))), ranked);
    const more = result.more ? el("button", { class: "more", onclick: async (event) => {
      const button = event.target;
      button.disabled = true;
      try {
        const next = await result.more();
        addRows(next.items);
        if (!next.hasMore) button.remove(); else button.disabled = false;
      } catch (err) {
        button.replaceWith(errorBox(err));
      }
    } }, "more") : null;
    root.append(section("Ranked selection (click a row for its record)", el("div", { class: "scroll" }, list), more));

    const composition = summary.composition.map((s) => [s.source, fmt(s.pool), fmt(s.selected),
      `${(100 * s.pool / Math.max(1, summary.pool)).toFixed(1)} %`, `${(100 * s.selected / Math.max(1, summary.total)).toFixed(1)} %`,
      el("div", { class: "bar pair" }, el("span", { class: "pool", style: `width:${(100 * s.pool / Math.max(1, summary.pool)).toFixed(1)}%` }),
        el("span", { class: "sel", style: `width:${(100 * s.selected / Math.max(1, summary.total)).toFixed(1)}%` }))]);
    root.append(section("Composition per source: selection against the pool",
      table(["source", "pool", "selected", "pool share", "selected share", ""], composition, { class: "composition" })));
    root.append(section("Scores",
      histogramChart(summary.pool_scores, { title: summary.pool_scores_known === false ? "score of the selected examples" : "score of every eligible example", overlay: summary.selected_scores, cutoff: summary.cutoff, width: 620, height: 220, name: "scores" })));
    if (summary.subtasks.length) root.append(section("Per subtask",
      table(["subtask", "targets", "mean score of the selection", "selected examples scoring highest on it"],
        summary.subtasks.map((s) => [s.name, fmt(s.targets), fmt(s.mean_score), fmt(s.best_for)]), { class: "subtasks" })));
    if (result.map) root.append(section("Map", mapChart(result.map)));
    else if (result.mapError) root.append(section("Map", errorBox(result.mapError)));
    return root;
  }

  Object.assign(gs, { el, append, fmt, table, section, errorBox, histogramChart, mapChart, renderOverview, renderExample, exampleList, renderSelection, messagesOf, sourcesTable });
})();
