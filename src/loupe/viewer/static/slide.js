// The slide page: the slide in OpenSeadragon (Deep Zoom tiles), one attention layer per magnification, the tissue
// mask, the cells read (click: the patch as the model read it), the prediction panel; n/p step through the cohort.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const slideId = decodeURIComponent(location.pathname.replace(/^\/slide\//, ""));
  const enc = encodeURIComponent(slideId);
  const params = new URLSearchParams(location.search);
  // The same colours as the GeoJSON's magnification classes (matplotlib's tab10).
  const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  const marks = (window.loupeMarks = { start: performance.now() });
  let viewer = null, width0 = 1, data = null, selected = null;
  const layerItems = {}; // label -> tiled image
  const shown = {}; // label -> visible

  function orderParams() {
    const p = new URLSearchParams();
    for (const [k, v] of params) if (k === "sort" || k === "order" || k.startsWith("f_")) p.set(k, v);
    return p;
  }

  function row(table, cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = c;
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }

  function bar(value) {
    const span = document.createElement("span");
    span.className = "bar"; span.style.width = Math.round(100 * Math.max(0, Math.min(1, value))) + "px";
    return span;
  }

  function pct(v) { return (100 * v).toFixed(1) + "%"; }

  function error(text) {
    const p = document.createElement("p");
    p.className = "error"; p.textContent = text; $("errors").appendChild(p);
  }

  function opacity() { return +$("opacity").value / 100; }

  function applyLayers() {
    for (const [label, item] of Object.entries(layerItems)) {
      if (label === "tissue") item.setOpacity(shown[label] ? 1 : 0);
      else item.setOpacity(shown[label] ? opacity() : 0);
    }
  }

  let pending = 0;
  function addImage(url, x, y, w, key, visible) {
    shown[key] = visible;
    pending += 1;
    viewer.addTiledImage({
      tileSource: { type: "image", url: url, buildPyramid: false },
      x: x, y: y, width: w, opacity: 0, preload: true, // loaded while hidden: a toggle shows it at once
      success: (e) => {
        layerItems[key] = e.item; applyLayers();
        e.item.addHandler("fully-loaded-change", (f) => {
          if (f.fullyLoaded && !e.item.loupeLoaded) {
            e.item.loupeLoaded = true; pending -= 1;
            if (!pending) document.body.dataset.layers = "loaded";
          }
        });
      },
    });
  }

  function layerToggle(key, title, colour, visible) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = visible; box.dataset.layer = key;
    box.addEventListener("change", () => {
      shown[key] = box.checked;
      if (key === "cells") document.querySelectorAll(".cell-outline").forEach((el) => { el.hidden = !box.checked; });
      else applyLayers();
    });
    label.appendChild(box);
    if (colour) { const sw = document.createElement("span"); sw.className = "swatch"; sw.style.borderColor = colour; label.appendChild(sw); }
    label.appendChild(document.createTextNode(" " + title));
    $("layers").appendChild(label);
  }

  function panel(d) {
    const o = d.outputs, r = d.row;
    $("slide-id").textContent = slideId;
    document.title = slideId + " · loupe view";
    const truth = r.label ? " (true: " + r.label + (r.correct ? ", " + r.correct : "") + ")" : "";
    $("prediction").textContent = (o ? o.predicted : r.predicted || r.status) + truth;
    const probs = o ? o.probabilities : r.probabilities;
    for (const [c, p] of Object.entries(probs || {})) row($("probs"), [c, bar(p), p.toFixed(4)]);
    const shares = o ? o.attention_share : r.attention_share;
    for (const [m, s] of Object.entries(shares || {})) row($("shares"), [m, bar(s), pct(s)]);
    const timings = Object.keys(r.timings_s || {}).length ? r.timings_s : o ? o.timings_s : {};
    let total = 0;
    for (const [k, t] of Object.entries(timings || {})) { row($("timings"), [k, t.toFixed(3) + " s"]); total += t; }
    if (total) row($("timings"), ["total", total.toFixed(3) + " s"]);
    for (const name of d.files || []) {
      const li = document.createElement("li"), a = document.createElement("a");
      a.href = "/files/" + enc + "/" + encodeURIComponent(name); a.textContent = name;
      li.appendChild(a);
      if (name === "attention.geojson") li.appendChild(document.createTextNode(" (QuPath: File › Import objects)"));
      $("files").appendChild(li);
    }
    const stops = d.colormap;
    $("legend-bar").style.background = "linear-gradient(to right, " + stops.join(", ") + ")";
    if (o) { $("legend-max").textContent = o.vmax.toPrecision(3); $("legend-mid").textContent = (o.vmax / 2).toPrecision(3); }
  }

  function cellsRead(o) {
    const list = $("cells");
    o.cells_read.forEach((c, i) => {
      const j = o.layers.findIndex((l) => l.label === c.magnification);
      const colour = COLOURS[j % COLOURS.length];
      const [x, y, w, h] = c.rect0;
      const el = document.createElement("div");
      el.className = "cell-outline"; el.style.borderColor = colour; el.dataset.cell = c.cell;
      el.title = c.magnification + " cell (" + c.row + ", " + c.col + ")";
      viewer.addOverlay({ element: el, location: new OpenSeadragon.Rect(x / width0, y / width0, w / width0, h / width0) });
      new OpenSeadragon.MouseTracker({ element: el, clickHandler: () => showPatch(c) });
      const li = document.createElement("li");
      li.textContent = c.magnification + " (" + c.row + ", " + c.col + ") · attention " + c.attention.toPrecision(3) +
        (c.draws > 1 ? " · drawn " + c.draws + "×" : "");
      li.style.color = colour; li.dataset.cell = c.cell;
      li.addEventListener("click", () => {
        showPatch(c);
        viewer.viewport.fitBoundsWithConstraints(new OpenSeadragon.Rect((x - w) / width0, (y - h) / width0, 3 * w / width0, 3 * h / width0));
      });
      list.appendChild(li);
    });
  }

  function showPatch(c) {
    selected = c;
    document.querySelectorAll(".cell-outline").forEach((el) => el.classList.toggle("selected", +el.dataset.cell === c.cell));
    $("patch-box").hidden = false;
    $("patch").src = "/api/slides/" + enc + "/cells/" + c.cell + ".png";
    const t = $("patch-meta"); t.textContent = "";
    const [x, y, w, h] = c.rect0;
    row(t, ["magnification", c.magnification + " (cell " + c.row + ", " + c.col + ")"]);
    row(t, ["read as", c.patch_px + " × " + c.patch_px + " px"]);
    row(t, ["level 0", "x " + Math.round(x) + ", y " + Math.round(y) + ", " + Math.round(w) + " × " + Math.round(h) + " px"]);
    if (c.rect_um) row(t, ["µm", "x " + c.rect_um[0].toFixed(1) + ", y " + c.rect_um[1].toFixed(1) + ", " + c.rect_um[2].toFixed(1) + " µm wide"]);
    row(t, ["attention", c.attention.toPrecision(4)]);
    row(t, ["drawn", c.draws + "×"]);
    row(t, ["contribution", "not recorded by this model's outputs"]);
    document.body.dataset.patch = String(c.cell);
  }

  function valueUnderCursor(point) {
    const x0 = point.x * width0, y0 = point.y * width0;
    const parts = [];
    if (data && data.outputs) {
      const o = data.outputs;
      if (x0 < 0 || y0 < 0 || x0 >= o.dimensions[0] || y0 >= o.dimensions[1]) { $("value").textContent = ""; return; }
      for (const l of o.layers) {
        const col = Math.floor(x0 / l.cell_size0), r = Math.floor(y0 / l.cell_size0);
        if (col < l.cols && r < l.rows) parts.push(l.label + " " + l.values[r * l.cols + col].toPrecision(3));
      }
    }
    const mpp = data && data.slide ? data.slide.mpp : null;
    const where = "x " + Math.round(x0) + ", y " + Math.round(y0) + " px" + (mpp ? " (" + (x0 * mpp / 1000).toFixed(2) + ", " + (y0 * mpp / 1000).toFixed(2) + " mm)" : "");
    $("value").textContent = where + (parts.length ? " · attention " + parts.join(" · ") : "");
  }

  function keepViewportInUrl() {
    viewer.addHandler("animation-finish", () => {
      const c = viewer.viewport.getCenter(), z = viewer.viewport.getZoom();
      params.set("x", c.x.toFixed(5)); params.set("y", c.y.toFixed(5)); params.set("z", z.toFixed(4));
      history.replaceState(null, "", "?" + params.toString());
    });
  }

  function restoreViewport() {
    const x = parseFloat(params.get("x")), y = parseFloat(params.get("y")), z = parseFloat(params.get("z"));
    if (isFinite(x) && isFinite(y) && isFinite(z) && z > 0) {
      viewer.viewport.zoomTo(z, null, true); viewer.viewport.panTo(new OpenSeadragon.Point(x, y), true);
    }
  }

  function start(d) {
    data = d;
    panel(d);
    if (d.slide_error) error("slide file: " + d.slide_error);
    if (d.outputs_error) error(d.outputs_error);
    const o = d.outputs;
    const dims = d.slide ? d.slide.dimensions : o ? o.dimensions : null;
    if (!dims) return;
    width0 = dims[0];
    viewer = OpenSeadragon({
      id: "viewer",
      prefixUrl: "/static/vendor/openseadragon/images/",
      tileSources: d.slide ? "/dz/" + enc + ".dzi" : [],
      drawer: "canvas",
      showNavigator: true,
      navigatorPosition: "BOTTOM_LEFT",
      maxZoomPixelRatio: 4,
      visibilityRatio: 0.5,
      gestureSettingsMouse: { clickToZoom: false },
    });
    window.loupeViewer = viewer;
    viewer.addHandler("open", () => {
      const base = viewer.world.getItemAt(0);
      if (base && d.slide) {
        base.addHandler("fully-loaded-change", (e) => {
          if (e.fullyLoaded && !marks.fullyLoaded) { marks.fullyLoaded = performance.now(); document.body.dataset.tiles = "loaded"; }
        });
      }
      restoreViewport();
    });
    viewer.addHandler("tile-loaded", () => { if (!marks.firstTile) marks.firstTile = performance.now(); });
    if (o) {
      let best = 0;
      o.layers.forEach((l, i) => { if ((o.attention_share[l.label] || 0) > (o.attention_share[o.layers[best].label] || 0)) best = i; });
      o.layers.forEach((l, i) => {
        const w = l.cols * l.cell_size0 / width0;
        addImage("/api/slides/" + enc + "/layers/" + i + ".png", 0, 0, w, l.label, i === best);
        layerToggle(l.label, l.title + (l.exact ? "" : " (grid geometry estimated)"), null, i === best);
      });
      if (o.tissue) {
        addImage("/api/slides/" + enc + "/tissue.png", 0, 0, o.tissue.width0 / width0, "tissue", false);
        layerToggle("tissue", "tissue mask (background shaded)" + (o.tissue.mask ? "" : ", by cell"), null, false);
      } else {
        const note = document.createElement("div"); note.className = "hint";
        note.textContent = "no tissue mask: tissue detection was off for this prediction";
        $("layers").appendChild(note);
      }
      layerToggle("cells", "cells read (" + o.cells_read.length + ")", "#444", true);
      cellsRead(o);
    }
    const tracker = new OpenSeadragon.MouseTracker({
      element: viewer.container,
      moveHandler: (e) => valueUnderCursor(viewer.viewport.pointFromPixel(e.position)),
    });
    tracker.setTracking(true);
    keepViewportInUrl();
    $("opacity").addEventListener("input", applyLayers);
  }

  function neighbours() {
    const q = orderParams().toString();
    $("back").href = "/" + (q ? "?" + q : "");
    fetch("/api/cohort/neighbours/" + enc + (q ? "?" + q : "")).then((r) => r.json()).then((n) => {
      if (n.error) return;
      $("position").textContent = n.position + " / " + n.total;
      const go = (id) => { if (id) location.href = "/slide/" + encodeURIComponent(id) + (q ? "?" + q : ""); };
      $("prev-slide").disabled = !n.previous; $("next-slide").disabled = !n.next;
      $("prev-slide").onclick = () => go(n.previous);
      $("next-slide").onclick = () => go(n.next);
      document.addEventListener("keydown", (e) => {
        if (e.target instanceof HTMLInputElement || e.ctrlKey || e.metaKey || e.altKey) return;
        if (e.key === "n" || e.key === "PageDown") go(n.next);
        if (e.key === "p" || e.key === "PageUp") go(n.previous);
      });
    });
  }

  fetch("/api/slides/" + enc).then((r) => r.json().then((d) => ({ ok: r.ok, d }))).then(({ ok, d }) => {
    if (!ok) { error(d.error); return; }
    start(d);
    document.body.dataset.ready = "1";
  });
  neighbours();
})();
