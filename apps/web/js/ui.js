// DOM and formatting helpers. Every piece of data reaches the page as text (textContent, attribute
// values), never as markup: category ids, run names and errors may look like HTML or SQL.

/**
 * h("a", {href: "#/runs", class: "x", onclick: fn, dataset: {id}}, "text", child, [more]) builds an
 * element. Strings and numbers become text nodes; null, undefined and false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      element.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(element.dataset, value);
    } else if (key === "class") {
      element.className = value;
    } else if (key === "value" || key === "checked" || key === "disabled" || key === "hidden") {
      element[key] = value;
    } else {
      element.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's content with these children (text or nodes). */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

export function dollars(cents) {
  if (cents === null || cents === undefined || Number.isNaN(cents)) return "—";
  const sign = cents < 0 ? "-" : "";
  const abs = Math.abs(Math.trunc(cents));
  const whole = Math.floor(abs / 100).toLocaleString("en-US");
  return `${sign}$${whole}.${String(abs % 100).padStart(2, "0")}`;
}

/** "25", "25.5", "$1,234.56" → cents as an integer; null when it is not an amount of dollars. */
export function parseDollars(text) {
  const match = String(text).trim().replace(/^\$/, "").replace(/,/g, "").match(/^(-?)(\d*)(?:\.(\d{0,2}))?$/);
  if (!match || (match[2] === "" && !match[3])) return null;
  const cents = Number(match[2] || "0") * 100 + Number((match[3] || "").padEnd(2, "0"));
  return Number.isSafeInteger(cents) ? (match[1] ? -cents : cents) : null;
}

/** A whole number typed in a field; null when it is not one. */
export function parseInteger(text) {
  const trimmed = String(text).trim();
  return /^-?\d+$/.test(trimmed) && Number.isSafeInteger(Number(trimmed)) ? Number(trimmed) : null;
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function percent(part, whole) {
  if (!whole || whole <= 0) return 0;
  return Math.max(0, Math.min(100, (part / whole) * 100));
}

export function statusBadge(status) {
  return h("span", { class: `badge badge--${status}`, dataset: { status } }, status);
}

/** A progress bar of processed (done + failed) out of total, failed shown in its own colour. */
export function progressBar(run) {
  const total = run.total_items || 0;
  const processed = run.processed_items || 0;
  const failed = run.failed_items || 0;
  const label = total ? `${processed} / ${total}` : `${processed} / ?`;
  const bar = h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-label": "Items processed",
      "aria-valuemin": 0,
      "aria-valuemax": total,
      "aria-valuenow": processed,
      dataset: { processed, total, failed },
    },
    h("div", { class: "progress__done" }),
    h("div", { class: "progress__failed" }),
    h("span", { class: "progress__label" }, label, failed ? ` (${failed} failed)` : ""),
  );
  bar.children[0].style.width = `${percent(processed - failed, total)}%`;
  bar.children[1].style.width = `${percent(failed, total)}%`;
  return bar;
}

/**
 * A budget bar: `amount` against the cap, amber past the warning threshold, red past the cap. The
 * scale stretches to the amount when it is over the cap, so the cap's marker stays on the bar.
 */
export function budgetBar({ amount, cap, threshold, label }) {
  const level = amount > cap ? "over" : threshold !== null && threshold !== undefined && amount > threshold ? "warn" : "ok";
  const scale = Math.max(cap, amount, 1);
  const fillEl = h("div", { class: "budget__fill" });
  fillEl.style.width = `${percent(amount, scale)}%`;
  const capMarker = h("div", { class: "budget__marker budget__marker--cap", title: `Cap ${dollars(cap)}` });
  capMarker.style.left = `${percent(cap, scale)}%`;
  const markers = [capMarker];
  if (threshold !== null && threshold !== undefined) {
    const warn = h("div", { class: "budget__marker budget__marker--warn", title: `Warning at ${dollars(threshold)}` });
    warn.style.left = `${percent(threshold, scale)}%`;
    markers.push(warn);
  }
  return h(
    "div",
    { class: `budget budget--${level}`, dataset: { level }, role: "meter", "aria-label": label || "Budget", "aria-valuemin": 0, "aria-valuemax": cap, "aria-valuenow": amount },
    h("div", { class: "budget__track" }, fillEl, markers),
    h(
      "div",
      { class: "budget__legend" },
      h("span", {}, `${label || "Cost"}: `, h("strong", {}, dollars(amount))),
      threshold !== null && threshold !== undefined ? h("span", {}, `warning at ${dollars(threshold)}`) : null,
      h("span", {}, `cap ${dollars(cap)}`),
    ),
  );
}

let flashTimer = null;
const FLASH_MS = 8000;

/** Show a message in the page's flash area; kind: "error" | "ok" | "info". Errors stay; others fade. */
export function flash(text, kind = "info") {
  const area = document.getElementById("flash");
  clearTimeout(flashTimer);
  if (!text) return fill(area);
  const message = h("p", { class: `flash flash--${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  if (kind !== "error") flashTimer = setTimeout(() => message.remove(), FLASH_MS);
  return fill(area, message);
}

let carried = null;

/** A flash message for the view that the next navigation shows. */
export function flashAfterNavigation(text, kind = "info") {
  carried = { text, kind };
}

/** Called by the router on each navigation: show the carried message, or clear the area. */
export function flashOnNavigation() {
  const message = carried;
  carried = null;
  return message ? flash(message.text, message.kind) : flash("");
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** A pager: "1–20 of 45" (or "of about 120,000" when the API estimated the total) with previous/next
 * buttons calling go(newOffset). */
export function pager({ offset, limit, total, go, label = "Pages", estimated = false }) {
  const first = total ? offset + 1 : 0;
  const last = Math.min(offset + limit, total);
  const of = estimated ? `about ${total.toLocaleString("en-US")}` : String(total);
  return h(
    "nav",
    { class: "pager", "aria-label": label },
    h("button", { type: "button", class: "btn btn--small", disabled: offset <= 0, onclick: () => go(Math.max(0, offset - limit)) }, "← Previous"),
    h("span", { class: "pager__info" }, `${first}–${last} of ${of}`),
    h("button", { type: "button", class: "btn btn--small", disabled: offset + limit >= total, onclick: () => go(offset + limit) }, "Next →"),
  );
}

/** A labelled form field with a slot for its errors; `name` is the API's body field it edits. */
export function field({ name, label, hint, input, control = input }) {
  const id = `field-${name}`;
  control.id = id;
  control.name = name;
  const error = h("p", { class: "field__error", id: `${id}-error`, hidden: true });
  control.setAttribute("aria-describedby", `${id}-error`);
  return h(
    "div",
    { class: "field", dataset: { field: name } },
    h("label", { for: id }, label),
    input,
    hint ? h("p", { class: "field__hint" }, hint) : null,
    error,
  );
}

/** Show errors beside the fields they name ({field: [messages]}); the rest go to `fallback`. */
export function showFieldErrors(form, byField, fallback) {
  clearFieldErrors(form);
  const unplaced = [];
  for (const [name, messages] of Object.entries(byField)) {
    const slot = name ? form.querySelector(`[data-field="${CSS.escape(name)}"] .field__error`) : null;
    if (!slot) {
      unplaced.push(...messages.map((m) => (name ? `${name}: ${m}` : m)));
      continue;
    }
    fill(slot, messages.join("; "));
    slot.hidden = false;
    slot.closest(".field").querySelector("input, textarea, select")?.setAttribute("aria-invalid", "true");
  }
  if (fallback) fill(fallback, unplaced.join("; "));
  return unplaced;
}

export function clearFieldErrors(form) {
  for (const slot of form.querySelectorAll(".field__error")) {
    fill(slot);
    slot.hidden = true;
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}
