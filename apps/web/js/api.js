// The console's only way to the service: the public REST endpoints under /collection, with the
// bearer token pasted at sign-in. Errors come back as ApiError carrying the API's `detail` and `error`.

const TOKEN_KEY = "collection-admin.token";
const ORG_KEY = "collection-admin.org";
const API_ROOT = new URL("../collection", document.baseURI).pathname; // /collection beside /admin/

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  },
  get org() {
    return sessionStorage.getItem(ORG_KEY) || "";
  },
  save(token, org) {
    sessionStorage.setItem(TOKEN_KEY, token);
    if (org) sessionStorage.setItem(ORG_KEY, org);
    else sessionStorage.removeItem(ORG_KEY);
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(ORG_KEY);
  },
};

function describe(status, detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).slice(1).join(".") || "request"}: ${e.msg}`).join("; ");
  }
  return `The server answered HTTP ${status}`;
}

export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail !== undefined ? body.detail : null;
    super(describe(status, detail)); // one line for a person: the API's detail, or its 422 messages
    this.name = "ApiError";
    this.status = status;
    this.code = (body && body.error) || "http_error";
    this.detail = detail;
  }

  /** 422 validation errors by the body field they name: {field: [msg, ...]}; "" for the body itself. */
  fieldErrors() {
    const byField = {};
    if (!Array.isArray(this.detail)) return byField;
    for (const error of this.detail) {
      const loc = Array.isArray(error.loc) ? error.loc : [];
      const field = loc[0] === "body" && loc.length > 1 ? String(loc[1]) : "";
      const where = typeof loc[2] === "number" ? ` (entry ${loc[2] + 1})` : "";
      (byField[field] ||= []).push(`${error.msg}${where}`);
    }
    return byField;
  }
}

// Set by the app: what to do when the token is refused (401) or lacks the permission (403).
let onAuthFailure = () => {};
export function setAuthFailureHandler(handler) {
  onAuthFailure = handler;
}

function headers(hasBody) {
  const result = { Accept: "application/json", Authorization: `Bearer ${session.token}` };
  if (session.org) result["X-Org-Id"] = session.org;
  if (hasBody) result["Content-Type"] = "application/json";
  return result;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = { detail: response.statusText || `HTTP ${response.status}` };
  }
  const error = new ApiError(response.status, body);
  if (response.status === 401 || response.status === 403) onAuthFailure(error);
  return error;
}

/** Call the API; resolves to the parsed JSON body, rejects with ApiError (or a network TypeError). */
export async function request(method, path, body, { signal } = {}) {
  const response = await fetch(API_ROOT + path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  if (!response.ok) throw await errorFrom(response);
  return response.status === 204 ? null : response.json();
}

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

const runPath = (id) => `/runs/${encodeURIComponent(id)}`;

export const api = {
  getSettings: (opts) => request("GET", "/settings", undefined, opts),
  updateSettings: (changes) => request("PATCH", "/settings", changes),
  estimate: (categoryIds, opts) => request("POST", "/estimate", { category_ids: categoryIds }, opts),
  createRun: (name, categoryIds) => request("POST", "/runs", { name, category_ids: categoryIds }),
  listRuns: ({ limit, offset, status }, opts) => request("GET", `/runs${query({ limit, offset, status })}`, undefined, opts),
  getRun: (id, opts) => request("GET", runPath(id), undefined, opts),
  transition: (id, action) => request("POST", `${runPath(id)}/${action}`),
  listItems: (id, { limit, offset, status }, opts) =>
    request("GET", `${runPath(id)}/items${query({ limit, offset, status })}`, undefined, opts),
  listSellers: ({ limit, offset }, opts) => request("GET", `/sellers${query({ limit, offset })}`, undefined, opts),
};

/**
 * Read a run's Server-Sent Events. EventSource cannot send an Authorization header, so this reads the
 * stream with fetch() and parses the `event:`/`data:`/`id:` lines itself. Calls onEvent(type, data, id)
 * for each event whose data is JSON, `id` being the stream's last event id so far (what to send back as
 * `lastEventId` to resume after it); resolves when the server ends the stream (the run ended, or the
 * server is going away) or `signal` aborts. With `lastEventId` the server sends the current progress and
 * only what came after that event.
 */
export async function streamRunEvents(id, onEvent, { signal, lastEventId = "" } = {}) {
  const eventHeaders = { ...headers(false), Accept: "text/event-stream" };
  if (lastEventId) eventHeaders["Last-Event-ID"] = lastEventId;
  const response = await fetch(`${API_ROOT}${runPath(id)}/events`, { headers: eventHeaders, signal, cache: "no-store" });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventStreamParser(onEvent, lastEventId);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
    parser.end();
  } finally {
    reader.releaseLock();
  }
}

/** The event-stream format (WHATWG HTML, "Server-sent events"): lines, then a blank line ends an event. */
export class EventStreamParser {
  constructor(onEvent, lastEventId = "") {
    this.onEvent = onEvent;
    this.buffer = "";
    this.type = "";
    this.data = [];
    // An `id:` line counts once its event is complete: an event cut off by a dropped connection must be
    // sent again, so its id must not become the point to resume after.
    this.idBuffer = lastEventId;
    this.lastEventId = lastEventId;
  }

  push(text) {
    this.buffer += text;
    // A trailing "\r" may be half of "\r\n": keep it until the next chunk says.
    const lines = this.buffer.split(/\r\n|\n|\r(?!$)/);
    this.buffer = lines.pop();
    for (const line of lines) this.line(line);
  }

  /** The stream ended: an event without its closing blank line is incomplete, so it is dropped. */
  end() {
    if (this.buffer.endsWith("\r")) this.line(this.buffer.slice(0, -1)); // a final "\r" did end a line
    this.buffer = "";
    this.type = "";
    this.data = [];
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return undefined; // a comment: keep-alive pings
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.idBuffer = value;
    return undefined;
  }

  dispatch() {
    this.lastEventId = this.idBuffer; // kept for the events after it that carry no id of their own
    if (this.data.length) {
      const type = this.type || "message";
      let data;
      try {
        data = JSON.parse(this.data.join("\n"));
      } catch {
        data = null;
      }
      if (data !== null) this.onEvent(type, data, this.lastEventId);
    }
    this.type = "";
    this.data = [];
  }
}
