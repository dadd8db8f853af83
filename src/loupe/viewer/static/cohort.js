// The cohort table: one row per slide, sorted and filtered by the server, a page at a time.
"use strict";
(function () {
  const PAGE = 100;
  const state = new URLSearchParams(location.search);
  let columns = [];
  let timer = null;
  const $ = (id) => document.getElementById(id);

  function orderParams() {
    const p = new URLSearchParams();
    for (const [k, v] of state) if (k === "sort" || k === "order" || (k.startsWith("f_") && v)) p.set(k, v);
    return p;
  }

  function fmt(col, v) {
    if (v === null || v === undefined) return "";
    if (col.key === "probability") return v.toFixed(3);
    if (col.key === "time_s") return v.toFixed(2);
    return String(v);
  }

  function header() {
    const heads = $("heads"), filters = $("filters");
    heads.textContent = ""; filters.textContent = "";
    for (const col of columns) {
      const th = document.createElement("th");
      th.dataset.key = col.key;
      th.addEventListener("click", () => {
        const desc = state.get("sort") === col.key && state.get("order") !== "desc";
        state.set("sort", col.key); state.set("order", desc ? "desc" : "asc"); state.delete("offset");
        load();
      });
      heads.appendChild(th);
      const fth = document.createElement("th");
      const input = document.createElement("input");
      input.name = "f_" + col.key; input.value = state.get("f_" + col.key) || ""; input.placeholder = "filter";
      input.addEventListener("input", () => {
        clearTimeout(timer);
        timer = setTimeout(() => { state.set(input.name, input.value); state.delete("offset"); load(); }, 250);
      });
      fth.appendChild(input); filters.appendChild(fth);
    }
  }

  function arrows() {
    for (const th of $("heads").children) {
      const col = columns.find((c) => c.key === th.dataset.key);
      const sorted = state.get("sort") === col.key;
      th.textContent = col.title + (sorted ? (state.get("order") === "desc" ? " ▼" : " ▲") : "");
    }
  }

  function render(d) {
    $("title").textContent = d.title;
    $("counts").textContent = Object.entries(d.counts).map(([k, v]) => v + " " + k).join(", ");
    $("notice").hidden = !d.notice; $("notice").textContent = d.notice || "";
    if (!columns.length) { columns = d.columns; header(); }
    arrows();
    const body = $("rows");
    body.textContent = "";
    const link = orderParams().toString();
    for (const row of d.rows) {
      const tr = document.createElement("tr");
      tr.dataset.id = row.slide_id;
      for (const col of columns) {
        const td = document.createElement("td");
        const v = row[col.key];
        if (col.numeric) td.className = "num";
        if (col.key === "slide_id") {
          const a = document.createElement("a");
          a.href = "/slide/" + encodeURIComponent(v) + (link ? "?" + link : "");
          a.textContent = v; td.appendChild(a);
        } else {
          td.textContent = fmt(col, v);
          if (col.key === "status" && v === "failed") td.className = "failed";
          if (col.key === "correct" && v) td.className = v;
        }
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    const offset = d.offset;
    $("range").textContent = d.matched ? (offset + 1) + "–" + (offset + d.rows.length) + " of " + d.matched +
      (d.matched !== d.total ? " (filtered from " + d.total + ")" : "") : "no slides" + (d.total ? " match" : " yet");
    $("page-prev").disabled = offset <= 0;
    $("page-next").disabled = offset + d.rows.length >= d.matched;
    document.body.dataset.loaded = String(Date.now());
  }

  function load() {
    const p = new URLSearchParams(state); p.set("limit", PAGE);
    history.replaceState(null, "", "?" + state.toString());
    fetch("/api/cohort?" + p.toString()).then((r) => r.json().then((d) => ({ ok: r.ok, d }))).then(({ ok, d }) => {
      $("error").hidden = ok; $("error").textContent = ok ? "" : d.error;
      if (ok) render(d);
    });
  }

  $("page-prev").addEventListener("click", () => {
    state.set("offset", Math.max(0, (+state.get("offset") || 0) - PAGE)); load();
  });
  $("page-next").addEventListener("click", () => { state.set("offset", (+state.get("offset") || 0) + PAGE); load(); });
  load();
})();
