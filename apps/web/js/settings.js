// Settings: the budget cap (edited in dollars, sent as integer cents), the warning percent and the
// concurrent-run limit. The API validates; its 422 errors are shown beside the fields they name.

import { api, ApiError } from "./api.js";
import { clearFieldErrors, dollars, field, fill, flash, h, parseDollars, parseInteger, showFieldErrors, when } from "./ui.js";

export function renderSettings(view) {
  let loaded = null;
  const controller = new AbortController();

  const cap = h("input", { type: "text", inputmode: "decimal", autocomplete: "off", class: "input input--money" });
  const percentInput = h("input", { type: "text", inputmode: "numeric", autocomplete: "off", class: "input input--short" });
  const runs = h("input", { type: "text", inputmode: "numeric", autocomplete: "off", class: "input input--short" });
  const formError = h("p", { class: "form__error", role: "alert" });
  const saved = h("p", { class: "form__note", role: "status" });
  const save = h("button", { type: "submit", class: "btn btn--primary", disabled: true }, "Save settings");

  const form = h(
    "form",
    { class: "card form", id: "settings-form", novalidate: true, onsubmit: submit },
    h("h2", {}, "Settings"),
    h("p", { class: "card__lead" }, "These apply to the whole organisation."),
    field({
      name: "budget_cap_cents",
      label: "Budget cap (dollars)",
      hint: "A run whose estimate is above the cap is refused; a running run pauses when its cost reaches it.",
      input: h("div", { class: "money" }, h("span", { class: "money__sign", "aria-hidden": "true" }, "$"), cap),
      control: cap,
    }),
    field({
      name: "soft_warning_percent",
      label: "Warning at (% of the cap)",
      hint: "Estimates above this share of the cap are shown in amber.",
      input: percentInput,
    }),
    field({
      name: "max_concurrent_runs",
      label: "Concurrent runs",
      hint: "Most runs pending, running or paused at once.",
      input: runs,
    }),
    h("div", { class: "form__actions" }, save, saved),
    formError,
  );
  fill(view, form);

  function show(settings) {
    loaded = settings;
    cap.value = dollars(settings.budget_cap_cents).replace(/^\$/, "").replace(/,/g, "");
    percentInput.value = String(settings.soft_warning_percent);
    runs.value = String(settings.max_concurrent_runs);
    save.disabled = false;
  }

  async function submit(event) {
    event.preventDefault();
    clearFieldErrors(form);
    fill(formError);
    fill(saved);
    const local = {};
    const changes = {};
    const capCents = parseDollars(cap.value);
    if (capCents === null) local.budget_cap_cents = ["Enter an amount in dollars, such as 25 or 25.00"];
    else if (capCents !== loaded.budget_cap_cents) changes.budget_cap_cents = capCents;
    for (const [name, input] of [["soft_warning_percent", percentInput], ["max_concurrent_runs", runs]]) {
      const value = parseInteger(input.value);
      if (value === null) local[name] = ["Enter a whole number"];
      else if (value !== loaded[name]) changes[name] = value;
    }
    if (Object.keys(local).length) {
      showFieldErrors(form, local, formError);
      return;
    }
    if (!Object.keys(changes).length) {
      fill(saved, "Nothing changed.");
      return;
    }
    save.disabled = true;
    try {
      show(await api.updateSettings(changes));
      fill(saved, "Settings saved.");
      flash("Settings saved.", "ok");
    } catch (error) {
      if (error instanceof ApiError && error.status === 422) {
        showFieldErrors(form, error.fieldErrors(), formError);
      } else {
        fill(formError, error instanceof ApiError ? `Not saved (${error.status}): ${error.message}` : `Not saved: ${error.message}`);
      }
    } finally {
      save.disabled = false;
    }
  }

  api
    .getSettings({ signal: controller.signal })
    .then((settings) => {
      show(settings);
      if (settings.updated_at) fill(saved, `Last changed ${when(settings.updated_at)}.`);
    })
    .catch((error) => {
      if (error.name !== "AbortError") fill(formError, `Cannot load the settings: ${error.message}`);
    });

  return () => controller.abort();
}
