// Runs list: paged, newest first, filtered by status on the server, a progress bar per run, actual vs
// estimated cost, and only the transitions the run's status allows.

import { api, ApiError } from "./api.js";
import { dollars, fill, flash, h, pager, progressBar, statusBadge, when } from "./ui.js";

export const STATUSES = ["pending", "running", "paused", "completed", "failed", "cancelled"];

// The API's allowed transitions (pending→running, running→paused, paused→running, any active→cancelled).
export const ACTIONS_BY_STATUS = {
  pending: ["start", "cancel"],
  running: ["pause", "cancel"],
  paused: ["resume", "cancel"],
};
const ACTION_LABELS = { start: "Start", pause: "Pause", resume: "Resume", cancel: "Cancel" };
const PAGE_SIZE = 20;
const REFRESH_MS = 2000;

/** Buttons for the transitions allowed from the run's status; onDone(status) after the API accepts one. */
export function actionButtons(run, onDone) {
  const actions = ACTIONS_BY_STATUS[run.status] || [];
  return h(
    "div",
    { class: "actions" },
    actions.map((action) =>
      h(
        "button",
        {
          type: "button",
          class: `btn btn--small btn--${action}`,
          dataset: { action },
          "aria-label": `${ACTION_LABELS[action]} run ${run.name}`,
          onclick: async (event) => {
            const button = event.currentTarget;
            if (action === "cancel" && !window.confirm(`Cancel the run "${run.name}"? It cannot be restarted.`)) return;
            for (const b of button.parentElement.querySelectorAll("button")) b.disabled = true;
            try {
              const result = await api.transition(run.id, action);
              flash(`${ACTION_LABELS[action]}: "${run.name}" is now ${result.status}.`, "ok");
              onDone(result.status);
            } catch (error) {
              for (const b of button.parentElement.querySelectorAll("button")) b.disabled = false;
              flash(error instanceof ApiError ? `${ACTION_LABELS[action]} refused (${error.status}): ${error.message}` : `${ACTION_LABELS[action]} failed: ${error.message}`, "error");
              onDone(null);
            }
          },
        },
        ACTION_LABELS[action],
      ),
    ),
  );
}

export function costCell(run) {
  return h(
    "div",
    { class: "cost" },
    h("span", { class: "cost__actual" }, dollars(run.actual_cost_cents)),
    h("span", { class: "cost__estimated" }, ` of est. ${dollars(run.estimated_cost_cents)}`),
  );
}

export function renderRuns(view, params) {
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const offset = Math.max(0, Number.parseInt(params.get("offset") || "0", 10) || 0);
  let controller = null;
  let timer = null;
  let disposed = false;

  const go = (next) => {
    const search = new URLSearchParams();
    if (next.status) search.set("status", next.status);
    if (next.offset) search.set("offset", String(next.offset));
    const text = search.toString();
    location.hash = text ? `#/runs?${text}` : "#/runs";
  };

  const filter = h(
    "select",
    { id: "status-filter", class: "input input--select", onchange: (e) => go({ status: e.target.value, offset: 0 }) },
    h("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => h("option", { value: s }, s)),
  );
  filter.value = status;
  const body = h("div", { class: "runs__body" }, h("p", { class: "empty" }, "Loading…"));
  fill(
    view,
    h(
      "section",
      { class: "card" },
      h(
        "div",
        { class: "card__head" },
        h("h2", {}, "Runs"),
        h("label", { class: "inline-label", for: "status-filter" }, "Status ", filter),
        h("a", { class: "btn btn--primary", href: "#/new" }, "New run"),
      ),
      body,
    ),
  );

  function table(page) {
    if (!page.runs.length) {
      return h("p", { class: "empty" }, status ? `No ${status} runs.` : "No runs yet. ", status ? null : h("a", { href: "#/new" }, "Create one."));
    }
    return [
      h(
        "table",
        { class: "table", id: "runs-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Name", "Status", "Progress", "Cost", "Created", "Actions"].map((title) => h("th", { scope: "col" }, title)),
          ),
        ),
        h(
          "tbody",
          {},
          page.runs.map((run) =>
            h(
              "tr",
              { dataset: { runId: run.id, status: run.status } },
              h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(run.id)}`, class: "run-link" }, run.name)),
              h("td", {}, statusBadge(run.status)),
              h("td", { class: "cell--progress" }, progressBar(run)),
              h("td", {}, costCell(run)),
              h("td", { class: "nowrap" }, when(run.created_at)),
              h("td", {}, actionButtons(run, () => load())),
            ),
          ),
        ),
      ),
      pager({
        offset,
        limit: PAGE_SIZE,
        total: page.total,
        estimated: Boolean(page.total_estimated),
        go: (next) => go({ status, offset: next }),
        label: "Runs pages",
      }),
    ];
  }

  async function load() {
    clearTimeout(timer);
    if (controller) controller.abort();
    controller = new AbortController();
    try {
      const page = await api.listRuns({ limit: PAGE_SIZE, offset, status }, { signal: controller.signal });
      if (disposed) return;
      if (!page.runs.length && offset > 0 && page.total > 0) return go({ status, offset: 0 });
      fill(body, table(page));
      // Keep the bars moving while something on this page is running.
      if (page.runs.some((run) => run.status === "running")) timer = setTimeout(load, REFRESH_MS);
    } catch (error) {
      if (error.name === "AbortError" || disposed) return;
      fill(body, h("p", { class: "form__error", role: "alert" }, `Cannot load the runs: ${error.message}`));
      timer = setTimeout(load, REFRESH_MS * 2);
    }
  }

  load();
  return () => {
    disposed = true;
    clearTimeout(timer);
    if (controller) controller.abort();
  };
}
