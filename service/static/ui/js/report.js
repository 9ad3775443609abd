/* A gradstore report: the web UI's views over the data inlined in the page (the JSON element
 * #report-data, written by `gradstore report`); nothing is fetched. Tabs: overview, examples,
 * and, for a selection report, the selection. */
(function () {
  "use strict";
  const { el, fmt, errorBox } = window.gs;
  const main = document.getElementById("main");

  function examplesView(page) {
    const list = el("div");
    const count = el("span", { class: "muted count" });
    const search = el("input", { type: "search", class: "search", placeholder: "id or text" });
    const filter = () => {
      const q = search.value.trim().toLowerCase();
      const found = q ? page.items.filter((ex) => ex.id.toLowerCase().includes(q) || JSON.stringify(ex.record).toLowerCase().includes(q)) : page.items;
      count.textContent = ` ${found.length} of the first ${page.items.length} of ${fmt(page.total)} examples`;
      list.replaceChildren(window.gs.exampleList(found));
    };
    search.addEventListener("input", filter);
    filter();
    return el("div", { "data-view": "examples" }, el("div", { class: "toolbar" }, search, count), list);
  }

  function selectionView(selection) {
    const records = selection.records;
    const loadExample = (id) => (records[id] ? Promise.resolve(records[id])
      : Promise.reject({ code: "not_in_report", message: `the record of ${id} is not in this report (see gradstore report --records)` }));
    return el("div", {},
      el("p", { class: "report-note" }, `Selection from ${selection.file}` +
        (selection.summary.pool_scores_known ? "." : "; the score histogram shows the selection alone (give --scores for the pool's).")),
      window.gs.renderSelection({ summary: selection.summary, items: selection.items, map: selection.map }, loadExample));
  }

  function render(data) {
    document.getElementById("version").textContent = `  ${data.datastore} · gradstore ${data.detail.gradstore_version}`;
    const views = { overview: () => el("div", {}, window.gs.renderOverview(data.detail, data.stats, null), data.map ? window.gs.section("Map", window.gs.mapChart(data.map)) : null),
      examples: () => examplesView(data.examples) };
    if (data.selection) views.selection = () => selectionView(data.selection);
    const body = el("div", { id: "view" });
    const tabs = el("nav", { class: "crumbs tabs" });
    const open = (name) => {
      for (const tab of tabs.children) tab.classList.toggle("active", tab.dataset.tab === name);
      try {
        body.replaceChildren(views[name]());
      } catch (err) {
        body.replaceChildren(errorBox({ code: "report_error", message: String(err) }));
      }
    };
    for (const name of Object.keys(views)) {
      tabs.append(el("button", { type: "button", class: "tab", dataset: { tab: name }, onclick: () => open(name) }, name), " ");
    }
    main.replaceChildren(el("h1", {}, data.datastore), tabs, body);
    open(data.selection ? "selection" : "overview");
  }

  try {
    render(JSON.parse(document.getElementById("report-data").textContent));
  } catch (err) {
    main.replaceChildren(errorBox({ code: "report_error", message: String(err) }));
  }
})();
