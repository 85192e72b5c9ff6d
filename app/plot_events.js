// The explorer's plot events: a thumbnail next to the cursor on hover, a click that makes a
// point the query, a box or lasso selection of the embedding map. Loaded once by the page
// (`app/plot_events.py` wraps it for `Blocks.launch(js=...)`) and called with its config:
//   plots:     {elem_id: [plotly events to bind]} of the gr.Plot blocks it serves
//   click:     elem_id of the hidden Textbox that gets "<file>|<nonce>" on a click
//   selection: elem_id of the hidden Textbox that gets a JSON list of files on a selection
//   tooltip:   id of the floating <img> it adds to the page
// Points name their image in customdata = [file, thumbnail URL] (`app/plots.py`); points
// without a file (the query's marker) are ignored. gr.Plot may redraw or replace its plotly
// div on any update, so a MutationObserver re-binds after every change: each handler is
// removed before it is added, so a div never gets one twice.
(config) => {
  if (window.__explorerPlotEvents) return;  // a second load (hot reload) would bind twice
  window.__explorerPlotEvents = config;

  const tooltip = document.createElement("img");
  tooltip.id = config.tooltip;
  tooltip.alt = "";
  Object.assign(tooltip.style, {
    position: "fixed", display: "none", zIndex: "10000", pointerEvents: "none",
    maxWidth: "160px", maxHeight: "160px", background: "white", padding: "3px",
    border: "1px solid #bbb", borderRadius: "4px", boxShadow: "0 2px 8px rgba(0,0,0,0.3)",
  });
  document.body.appendChild(tooltip);
  const GAP = 16;  // px between the cursor and the image

  const fileOf = (point) => {
    const data = point && point.customdata;
    return Array.isArray(data) && typeof data[0] === "string" && data[0] ? data[0] : null;
  };

  // Left of the cursor, centred on it (plotly puts its hover label on the right); right of
  // it where the left has no room; inside the window vertically.
  let cursor = [0, 0];
  const place = (x, y) => {
    cursor = [x, y];
    const width = tooltip.offsetWidth || 166, height = tooltip.offsetHeight || 166;
    const left = x - GAP - width >= 0 ? x - GAP - width : x + GAP;
    const top = Math.min(Math.max(0, y - height / 2), window.innerHeight - height);
    tooltip.style.left = `${left}px`;
    tooltip.style.top = `${Math.max(0, top)}px`;
  };

  tooltip.addEventListener("load", () => place(...cursor));  // its size is known now
  const hide = () => { tooltip.style.display = "none"; };

  // A Gradio 6 Textbox takes its value from its field's `input` event (which fires its
  // .change) but fires its .input on a `keypress` (gradio's textbox/shared/Textbox.svelte):
  // both are dispatched, so listen to one of them.
  const post = (elemId, value) => {
    const field = document.querySelector(`#${elemId} textarea, #${elemId} input`);
    if (!field) return;
    field.value = value;
    field.dispatchEvent(new Event("input", { bubbles: true }));
    field.dispatchEvent(new KeyboardEvent("keypress", { bubbles: true, key: "Unidentified" }));
  };

  let nonce = 0;
  const handlers = {
    plotly_hover: (data) => {
      const point = data && data.points && data.points[0];
      const url = point && Array.isArray(point.customdata) ? point.customdata[1] : "";
      if (!url) return hide();
      if (tooltip.getAttribute("src") !== url) tooltip.src = url;
      tooltip.style.display = "block";
      if (data.event) place(data.event.clientX, data.event.clientY);
    },
    plotly_unhover: hide,
    plotly_click: (data) => {
      const file = fileOf(data && data.points && data.points[0]);
      // the nonce makes a second click on the same point a new value
      if (file) post(config.click, `${file}|${Date.now()}-${++nonce}`);
    },
    plotly_selected: (data) => {
      const files = [...new Set(((data && data.points) || []).map(fileOf).filter(Boolean))];
      post(config.selection, JSON.stringify(files));
    },
    plotly_deselect: () => post(config.selection, "[]"),
  };

  const moving = new WeakSet();  // plot divs whose mouse moves already move the image
  const bind = () => {
    for (const [elemId, events] of Object.entries(config.plots)) {
      const plot = document.querySelector(`#${elemId} .js-plotly-plot`);
      if (!plot || typeof plot.on !== "function") continue;
      for (const name of events) {
        plot.removeListener(name, handlers[name]);
        plot.on(name, handlers[name]);
      }
      if (!moving.has(plot)) {
        moving.add(plot);
        plot.addEventListener("mousemove", (event) => {
          if (tooltip.style.display !== "none") place(event.clientX, event.clientY);
        });
        plot.addEventListener("mouseleave", hide);
      }
    }
  };

  let pending = false;
  new MutationObserver(() => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; bind(); });
  }).observe(document.body, { childList: true, subtree: true });
  bind();
}
