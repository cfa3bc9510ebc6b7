// New run: category ids → a live estimate (POST /collection/estimate) with its breakdown and a budget
// bar; Create (POST /collection/runs) only when the estimate is within the cap.

import { api, ApiError } from "./api.js";
import { budgetBar, clearFieldErrors, debounce, dollars, field, fill, flashAfterNavigation, h, showFieldErrors } from "./ui.js";

/** One id per line or comma-separated; blanks dropped. */
export function parseCategoryIds(text) {
  return text
    .split(/[\n,]/)
    .map((id) => id.trim())
    .filter((id) => id !== "");
}

export function renderNewRun(view) {
  let estimate = null; // the last estimate, for `estimatedKey`
  let estimatedKey = null;
  let inFlight = null;
  let sequence = 0;

  const name = h("input", { type: "text", autocomplete: "off", class: "input", maxlength: 200, placeholder: "Collection YYYY-MM-DD HH:MM (UTC) when blank" });
  const categories = h("textarea", { rows: 4, class: "input input--area", spellcheck: "false", placeholder: "electronics\nhome-garden" });
  const estimateButton = h("button", { type: "button", class: "btn", onclick: () => runEstimate() }, "Estimate");
  const estimatePanel = h("div", { class: "estimate", id: "estimate", "aria-live": "polite" });
  const create = h("button", { type: "submit", class: "btn btn--primary", id: "create-run", disabled: true }, "Create run");
  const reason = h("p", { class: "create__reason", id: "create-reason" });
  const formError = h("p", { class: "form__error", id: "create-error", role: "alert" });

  const form = h(
    "form",
    { class: "card form", id: "new-run-form", novalidate: true, onsubmit: submit },
    h("h2", {}, "New run"),
    field({ name: "name", label: "Name (optional)", input: name }),
    field({
      name: "category_ids",
      label: "Category ids",
      hint: "One per line or separated by commas. The estimate updates as you type.",
      input: categories,
    }),
    h("div", { class: "form__actions" }, estimateButton),
    estimatePanel,
    h("div", { class: "form__actions create" }, create, reason),
    formError,
  );
  fill(view, form);
  categories.focus();

  const key = (ids) => JSON.stringify(ids);

  function blockCreate(text) {
    create.disabled = true;
    fill(reason, text);
  }

  function showEstimate(result, ids) {
    estimate = result;
    estimatedKey = key(ids);
    const level = !result.within_budget ? "over" : result.exceeds_warning ? "warn" : "ok";
    const fromHistory = new Set(result.estimated_from_history || []);
    const rows = ids.map((id) =>
      h(
        "tr",
        { dataset: { category: id } },
        h("td", { class: "mono" }, id),
        h("td", { class: "num" }, dollars(result.breakdown[id])),
        h("td", {}, fromHistory.has(id) ? h("span", { class: "tag tag--history" }, "history") : h("span", { class: "tag" }, "plan default")),
      ),
    );
    fill(
      estimatePanel,
      h(
        "p",
        { class: "estimate__total" },
        "Estimated cost ",
        h("strong", { id: "estimate-total" }, dollars(result.total_cents)),
        ` for about ${result.total_items} products in ${ids.length} ${ids.length === 1 ? "category" : "categories"}.`,
      ),
      budgetBar({ amount: result.total_cents, cap: result.budget_cap_cents, threshold: result.warning_threshold_cents, label: "Estimate" }),
      level === "warn"
        ? h("p", { class: "estimate__note estimate__note--warn" }, `Above the warning threshold of ${dollars(result.warning_threshold_cents)}, within the cap.`)
        : null,
      h(
        "table",
        { class: "table table--compact", id: "estimate-breakdown" },
        h("caption", {}, "Breakdown by category"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Category"), h("th", { scope: "col", class: "num" }, "Estimate"), h("th", { scope: "col" }, "Priced from"))),
        h("tbody", {}, rows),
      ),
    );
    estimatePanel.dataset.level = level;
    if (!result.within_budget) {
      blockCreate(
        `Create is disabled: the estimate ${dollars(result.total_cents)} is above the budget cap ` +
          `${dollars(result.budget_cap_cents)}. Remove categories or raise the cap in Settings.`,
      );
    } else {
      create.disabled = false;
      fill(reason);
    }
  }

  async function runEstimate() {
    const ids = parseCategoryIds(categories.value);
    clearFieldErrors(form);
    fill(formError);
    if (inFlight) inFlight.abort();
    if (!ids.length) {
      estimate = null;
      estimatedKey = null;
      fill(estimatePanel);
      blockCreate("Enter at least one category id.");
      return;
    }
    if (estimate && estimatedKey === key(ids)) return showEstimate(estimate, ids);
    const mine = ++sequence;
    inFlight = new AbortController();
    blockCreate("Estimating…");
    try {
      const result = await api.estimate(ids, { signal: inFlight.signal });
      if (mine === sequence) showEstimate(result, ids);
    } catch (error) {
      if (error.name === "AbortError" || mine !== sequence) return;
      estimate = null;
      estimatedKey = null;
      fill(estimatePanel);
      if (error instanceof ApiError && error.status === 422) {
        showFieldErrors(form, error.fieldErrors(), formError);
        blockCreate("Fix the category ids to see an estimate.");
      } else {
        fill(formError, error instanceof ApiError ? `No estimate (${error.status}): ${error.message}` : `No estimate: ${error.message}`);
        blockCreate("No estimate yet.");
      }
    }
  }

  const estimateSoon = debounce(runEstimate, 300);
  categories.addEventListener("input", () => {
    blockCreate("Estimating…");
    estimateSoon();
  });

  async function submit(event) {
    event.preventDefault();
    const ids = parseCategoryIds(categories.value);
    if (!estimate || estimatedKey !== key(ids) || !estimate.within_budget) return;
    create.disabled = true;
    fill(formError);
    clearFieldErrors(form);
    try {
      const run = await api.createRun(name.value, ids);
      flashAfterNavigation(`Run "${run.name}" created. Start it when ready.`, "ok");
      location.hash = `#/runs/${encodeURIComponent(run.id)}`;
    } catch (error) {
      create.disabled = false;
      if (error instanceof ApiError && error.status === 422) {
        showFieldErrors(form, error.fieldErrors(), formError);
      } else if (error instanceof ApiError && (error.status === 400 || error.status === 429)) {
        const what = error.status === 429 ? "Too many active runs" : "Refused";
        fill(formError, `${what} (${error.status}): ${error.message}`);
      } else {
        fill(formError, error instanceof ApiError ? `Not created (${error.status}): ${error.message}` : `Not created: ${error.message}`);
      }
    }
  }

  blockCreate("Enter at least one category id.");
  return () => {
    sequence += 1;
    if (inFlight) inFlight.abort();
  };
}
