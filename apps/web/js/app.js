// The console's shell: sign-in, navigation and hash routing (#/runs, #/runs/<id>, #/new, #/settings).
// Each view renders into #view and returns a function that stops whatever it started (polls, streams).

import { api, ApiError, session, setAuthFailureHandler } from "./api.js";
import { renderNewRun } from "./new-run.js";
import { renderRunPage } from "./run-page.js";
import { renderRuns } from "./runs.js";
import { renderSettings } from "./settings.js";
import { fill, flash, flashOnNavigation, h } from "./ui.js";

const $ = (id) => document.getElementById(id);

let disposeView = () => {};

/** What a person should read when the API refuses the token (401) or the permission (403). */
export function authFailureMessage(error) {
  if (error.status === 401) {
    return `Not signed in (401): ${error.message}. Paste a valid, unexpired access token.`;
  }
  if (error.status === 403) {
    return `Permission denied (403): ${error.message}. Sign in as a user whose role holds admin.automation.`;
  }
  return error.message;
}

/** Who the token says it is, for display only: the API verifies it, the console does not. */
function tokenSubject(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, "=")));
    return claims.email || claims.sub || "";
  } catch {
    return "";
  }
}

function showSignIn(message, kind = "error") {
  disposeView();
  disposeView = () => {};
  session.clear();
  flash("");
  fill($("view"));
  $("nav").hidden = true;
  $("session").hidden = true;
  $("signin").hidden = false;
  const error = $("signin-error");
  fill(error, message || "");
  error.className = `signin__message signin__message--${kind}`;
  error.hidden = !message;
  $("signin-token").focus();
}

function showConsole() {
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("session").hidden = false;
  const who = tokenSubject(session.token);
  fill($("session-who"), who ? `Signed in as ${who}` : "Signed in", session.org ? ` · org ${session.org}` : "");
}

async function signIn(event) {
  event.preventDefault();
  const token = $("signin-token").value.trim().replace(/^Bearer\s+/i, "");
  const org = $("signin-org").value.trim();
  const error = $("signin-error");
  if (!token) {
    fill(error, "Paste a bearer token first.");
    error.hidden = false;
    return;
  }
  const button = $("signin-submit");
  button.disabled = true;
  fill(error);
  error.hidden = true;
  session.save(token, org);
  try {
    await api.getSettings(); // the cheapest call that needs the permission: proves the token works
    $("signin-token").value = "";
    showConsole();
    route();
  } catch (failure) {
    session.clear();
    error.className = "signin__message signin__message--error";
    fill(error, failure instanceof ApiError ? authFailureMessage(failure) : `Cannot reach the API: ${failure.message}`);
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
}

const ROUTES = [
  [/^#\/runs\/([^/?]+)$/, (view, match) => renderRunPage(view, decodeURIComponent(match[1]))],
  [/^#\/new$/, (view) => renderNewRun(view)],
  [/^#\/settings$/, (view) => renderSettings(view)],
  [/^#\/runs(?:\?(.*))?$/, (view, match) => renderRuns(view, new URLSearchParams(match[1] || ""))],
];

function route() {
  if (!session.token) return showSignIn();
  const hash = location.hash || "#/runs";
  disposeView();
  disposeView = () => {};
  flashOnNavigation();
  const view = fill($("view"));
  for (const link of document.querySelectorAll("#nav a")) {
    const section = link.getAttribute("href");
    link.classList.toggle("active", hash === section || (section === "#/runs" && hash.startsWith("#/runs")));
  }
  for (const [pattern, render] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      disposeView = render(view, match) || (() => {});
      return;
    }
  }
  fill(view, h("p", { class: "empty" }, "Nothing here. ", h("a", { href: "#/runs" }, "See the runs.")));
}

function start() {
  setAuthFailureHandler((error) => showSignIn(authFailureMessage(error)));
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => showSignIn("Signed out.", "info"));
  window.addEventListener("hashchange", route);
  if (session.token) {
    showConsole();
    route();
  } else {
    showSignIn();
  }
}

start();
