// One run, live: its event stream (GET /collection/runs/{id}/events, read with fetch) drives the progress
// bar, the cost against the cap, the status and its message; the items (with failures and their errors)
// and the organisation's sellers are reloaded as the run moves.

import { api, ApiError, streamRunEvents } from "./api.js";
import { actionButtons, costCell } from "./runs.js";
import { budgetBar, dollars, fill, h, pager, progressBar, statusBadge, when } from "./ui.js";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const ITEMS_PAGE = 25;
const SELLERS_PAGE = 10;
const TABLES_REFRESH_MS = 1500;
// After a dropped stream: the first retry soon, then doubling up to the cap while connecting fails.
const RECONNECT_FIRST_MS = 1000;
const RECONNECT_MAX_MS = 15000;

export function renderRunPage(view, runId) {
  const controller = new AbortController();
  const { signal } = controller;
  let run = null;
  let itemsStatus = "";
  let itemsOffset = 0;
  let sellersOffset = 0;
  let tablesTimer = null;
  let tablesDue = false;
  const shownTransitions = new Set(); // ids: a transition sent again after a reconnect is listed once

  const title = h("h2", { class: "run__name" }, "Loading run…");
  const badge = h("span", { id: "run-status" });
  const actions = h("div", { id: "run-actions" });
  const meta = h("dl", { class: "meta" });
  const progress = h("div", { id: "run-progress" });
  const message = h("p", { class: "run__message", id: "run-message" });
  const cost = h("div", { id: "run-cost" });
  const live = h("span", { class: "live", id: "run-live" }, "connecting…");
  const log = h("ol", { class: "log", id: "run-log" });
  const itemsFilter = h(
    "select",
    { id: "items-filter", class: "input input--select", onchange: (e) => ((itemsStatus = e.target.value), (itemsOffset = 0), loadItems()) },
    h("option", { value: "" }, "All items"),
    h("option", { value: "failed" }, "Failed"),
    h("option", { value: "done" }, "Done"),
    h("option", { value: "pending" }, "Pending"),
  );
  const items = h("div", { id: "run-items" });
  const sellers = h("div", { id: "run-sellers" });
  const pageError = h("p", { class: "form__error", role: "alert" });

  fill(
    view,
    h("p", { class: "crumbs" }, h("a", { href: "#/runs" }, "← All runs")),
    pageError,
    h(
      "section",
      { class: "card run", id: "run-page" },
      h("div", { class: "card__head" }, h("div", { class: "run__title" }, title, badge), actions),
      meta,
    ),
    h(
      "section",
      { class: "card" },
      h("div", { class: "card__head" }, h("h3", {}, "Progress"), live),
      progress,
      message,
      cost,
      h("details", { class: "log__wrap" }, h("summary", {}, "Status changes"), log),
    ),
    h(
      "section",
      { class: "card" },
      h("div", { class: "card__head" }, h("h3", {}, "Items"), h("label", { class: "inline-label", for: "items-filter" }, "Show ", itemsFilter)),
      items,
    ),
    h(
      "section",
      { class: "card" },
      h("div", { class: "card__head" }, h("h3", {}, "Sellers found"), h("span", { class: "card__note" }, "Across the organisation's runs, most listings first; those seen in this run are marked.")),
      sellers,
    ),
  );

  function showRun(next) {
    run = next;
    document.title = `${run.name} · Collection runs`;
    fill(title, run.name);
    fill(badge, statusBadge(run.status));
    fill(actions, actionButtons(run, (status) => (status ? applyStatus(status) : refreshRun())));
    fill(
      meta,
      metaRow("Run id", h("code", {}, run.id)),
      metaRow("Categories", h("span", { class: "chips" }, run.category_ids.map((id) => h("span", { class: "chip" }, id)))),
      metaRow("Provider", run.provider === "sandbox" ? "sandbox (simulated catalogue, no real charges)" : run.provider),
      metaRow("Created", when(run.created_at)),
      metaRow("Started", when(run.started_at)),
      run.paused_at ? metaRow("Paused", when(run.paused_at)) : null,
      metaRow("Finished", when(run.completed_at)),
      run.status === "completed" && typeof run.estimate_error_cents === "number"
        ? metaRow("Against the estimate", estimateError(run.estimate_error_cents))
        : null,
    );
    showProgress(run);
  }

  function estimateError(cents) {
    if (cents === 0) return "exactly as estimated";
    return `${dollars(Math.abs(cents))} ${cents < 0 ? "under" : "over"} (estimated ${dollars(run.estimated_cost_cents)})`;
  }

  function metaRow(label, value) {
    return [h("dt", {}, label), h("dd", {}, value)];
  }

  function showProgress(snapshot) {
    fill(progress, progressBar(snapshot));
    const text = snapshot.status_message || (snapshot.status === "pending" ? "Not started yet." : "");
    fill(message, text);
    message.hidden = !text;
    fill(
      cost,
      budgetBar({ amount: snapshot.actual_cost_cents, cap: snapshot.budget_cap_cents, threshold: null, label: "Cost so far" }),
      h(
        "p",
        { class: "cost__line" },
        costCell({ ...run, ...snapshot }),
        run && run.uncertain_cost_cents ? ` · ${dollars(run.uncertain_cost_cents)} uncertain (calls whose answer was lost)` : "",
        run && run.status_reason ? ` · reason: ${run.status_reason}` : "",
      ),
    );
  }

  function applyStatus(status) {
    if (!run || run.status === status) return;
    showRun({ ...run, status });
    refreshRun();
  }

  async function refreshRun() {
    try {
      showRun(await api.getRun(runId, { signal }));
      fill(pageError);
    } catch (error) {
      if (error.name !== "AbortError") fill(pageError, `Cannot load the run: ${error.message}`);
    }
  }

  // Items and sellers: reloaded at most every TABLES_REFRESH_MS while progress events arrive.
  function tablesSoon() {
    if (tablesTimer) {
      tablesDue = true;
      return;
    }
    loadTables();
    tablesTimer = setTimeout(() => {
      tablesTimer = null;
      if (tablesDue) {
        tablesDue = false;
        tablesSoon();
      }
    }, TABLES_REFRESH_MS);
  }

  function loadTables() {
    loadItems();
    loadSellers();
  }

  async function loadItems() {
    try {
      const page = await api.listItems(runId, { limit: ITEMS_PAGE, offset: itemsOffset, status: itemsStatus }, { signal });
      fill(items, itemsTable(page));
    } catch (error) {
      if (error.name !== "AbortError") fill(items, h("p", { class: "form__error" }, `Cannot load the items: ${error.message}`));
    }
  }

  function itemsTable(page) {
    if (!page.items.length) {
      const none = itemsStatus ? `No ${itemsStatus} items.` : run && run.status === "pending" ? "Items appear once the run starts and finds its products." : "No items yet.";
      return h("p", { class: "empty" }, none);
    }
    return [
      h(
        "table",
        { class: "table table--compact", id: "items-table" },
        h("thead", {}, h("tr", {}, ["Category", "Rank", "ASIN", "Product", "Status", "Attempts", "Cost", "Error"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          page.items.map((item) =>
            h(
              "tr",
              { dataset: { status: item.status, asin: item.asin }, class: item.status === "failed" ? "row--failed" : null },
              h("td", { class: "mono" }, item.category_id),
              h("td", { class: "num" }, item.position),
              h("td", { class: "mono" }, item.asin),
              h("td", {}, item.result && item.result.title ? item.result.title : "—"),
              h("td", {}, h("span", { class: `badge badge--item-${item.status}` }, item.status)),
              h("td", { class: "num" }, item.attempts),
              h("td", { class: "num" }, dollars(item.cost_cents)),
              h("td", { class: "item__error" }, item.last_error || ""),
            ),
          ),
        ),
      ),
      pager({ offset: itemsOffset, limit: ITEMS_PAGE, total: page.total, go: (next) => ((itemsOffset = next), loadItems()), label: "Items pages" }),
    ];
  }

  async function loadSellers() {
    try {
      const page = await api.listSellers({ limit: SELLERS_PAGE, offset: sellersOffset }, { signal });
      fill(sellers, sellersTable(page));
    } catch (error) {
      if (error.name !== "AbortError") fill(sellers, h("p", { class: "form__error" }, `Cannot load the sellers: ${error.message}`));
    }
  }

  function sellersTable(page) {
    if (!page.sellers.length) return h("p", { class: "empty" }, "No sellers found yet.");
    return [
      h(
        "table",
        { class: "table table--compact", id: "sellers-table" },
        h("thead", {}, h("tr", {}, ["Seller", "Listings", "Products", "Lowest price", "Last seen"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          page.sellers.map((seller) =>
            h(
              "tr",
              {},
              h("td", {}, seller.seller, seller.last_run_id === runId || seller.first_run_id === runId ? h("span", { class: "tag tag--this-run" }, "this run") : null),
              h("td", { class: "num" }, seller.listings_seen),
              h("td", { class: "num" }, seller.products_seen),
              h("td", { class: "num" }, seller.lowest_price_cents === null ? "—" : dollars(seller.lowest_price_cents)),
              h("td", { class: "nowrap" }, when(seller.last_seen_at)),
            ),
          ),
        ),
      ),
      pager({ offset: sellersOffset, limit: SELLERS_PAGE, total: page.total, go: (next) => ((sellersOffset = next), loadSellers()), label: "Sellers pages" }),
    ];
  }

  function onEvent(type, data) {
    if (!run) return;
    if (type === "progress") {
      const statusChanged = data.status !== run.status;
      run = { ...run, ...data };
      if (statusChanged) refreshRun(); // timestamps, reason and buttons come with the full run
      else showProgress(run);
      tablesSoon();
    } else if (type === "transition") {
      if (shownTransitions.has(data.id)) return;
      shownTransitions.add(data.id);
      log.append(
        h(
          "li",
          { dataset: { eventId: data.id } },
          h("time", {}, when(data.created_at)),
          ` ${data.from_status || "—"} → ${data.to_status}`,
          data.reason ? ` (${data.reason})` : "",
        ),
      );
    }
  }

  function setLive(text, state) {
    fill(live, text);
    live.dataset.state = state;
  }

  // Follows the stream until the run ends. A stream that drops or ends early (the server restarting) is
  // reconnected with the last event id received, so the server resumes after it: nothing sent twice,
  // nothing missed in between.
  async function follow() {
    let lastEventId = "";
    let delay = RECONNECT_FIRST_MS;
    const received = (type, data, id) => {
      lastEventId = id;
      delay = RECONNECT_FIRST_MS; // this connection worked: the next drop is retried soon again
      onEvent(type, data);
    };
    while (!signal.aborted) {
      try {
        setLive("live", "on");
        await streamRunEvents(runId, received, { signal, lastEventId });
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && (error.status === 404 || error.status === 401 || error.status === 403)) {
          setLive("not following", "off");
          return;
        }
        // An id the server refuses would be refused on every retry: start over (the list skips repeats).
        if (error instanceof ApiError && error.status === 422) lastEventId = "";
        setLive("reconnecting…", "off");
      }
      if (signal.aborted) return;
      await refreshRun();
      loadTables();
      if (run && TERMINAL.has(run.status)) {
        setLive(`ended: ${run.status}`, "off");
        return;
      }
      setLive("reconnecting…", "off");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, RECONNECT_MAX_MS);
    }
  }

  (async () => {
    try {
      showRun(await api.getRun(runId, { signal }));
    } catch (error) {
      if (error.name === "AbortError") return;
      fill(title, "Run not found");
      fill(pageError, error instanceof ApiError && error.status === 404 ? "No such run in your organisation." : `Cannot load the run: ${error.message}`);
      setLive("", "off");
      return;
    }
    loadTables();
    follow();
  })();

  return () => {
    controller.abort();
    clearTimeout(tablesTimer);
  };
}
