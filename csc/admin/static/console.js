// The CSC web console: reads this node's admin API every 2 s and shows it; it changes nothing.
// Times are shown as the API gives them: ISO 8601 UTC (2026-12-04T18:31:21Z). The traffic
// charts are SVG drawn here from GET /v1/admin/traffic (this node's last 15 minutes).
//
// The operator token is asked for once (a form), kept in the tab's sessionStorage and sent as
// "Authorization: Bearer"; a 401 forgets it and brings the form back. A refresh that fails
// otherwise keeps the last data on screen, marked stale. Data reaches the page only through
// textContent and DOM APIs, never as markup.
"use strict";

(() => {
  const API = "/v1/admin";
  const TOKEN_KEY = "csc-console-token";
  const REFRESH_MS = 2000;
  const ERRORS_SHOWN = 50;
  const SVG = "http://www.w3.org/2000/svg";
  const NO_ANSWER = "the CSC did not answer";

  const $ = (id) => document.getElementById(id);

  class Refused extends Error {}

  let timer = null;
  let round = 0; // bumped on every sign-in and sign-out: answers of an older round are dropped
  let lastGood = null;
  let memoryToken = null; // used when sessionStorage is unavailable

  // --- the token ------------------------------------------------------------------------------

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || memoryToken;
    } catch {
      return memoryToken;
    }
  }

  function remember(value) {
    memoryToken = value;
    try {
      sessionStorage.setItem(TOKEN_KEY, value);
    } catch {
      // private mode or storage disabled: the token lives in this page only
    }
  }

  function forget() {
    memoryToken = null;
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // nothing stored
    }
  }

  // --- the admin API --------------------------------------------------------------------------

  async function getJSON(path, secret) {
    let resp;
    try {
      resp = await fetch(API + path, {
        headers: { Authorization: `Bearer ${secret}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
    } catch {
      // the browser says only "Failed to fetch": the node is down or unreachable
      throw new Error(NO_ANSWER);
    }
    if (resp.status === 401) {
      throw new Refused("the operator token was refused");
    }
    let body = null;
    try {
      body = await resp.json();
    } catch {
      body = null;
    }
    if (!resp.ok) {
      const detail = body && typeof body.message === "string" ? `: ${body.message}` : "";
      throw new Error(`${path} answered ${resp.status}${detail}`);
    }
    if (body === null || typeof body !== "object") {
      throw new Error(`${path} did not answer a JSON object`);
    }
    return body;
  }

  async function load(secret) {
    const [node, tenants, aliases, sessions, errors, traffic] = await Promise.all([
      getJSON("/node", secret),
      getJSON("/tenants", secret),
      getJSON("/aliases", secret),
      getJSON("/sessions", secret),
      getJSON(`/errors?limit=${ERRORS_SHOWN}`, secret),
      getJSON("/traffic", secret),
    ]);
    return {
      traffic,
      node,
      tenants: tenants.tenants || [],
      aliases: aliases.aliases || [],
      sessions: sessions.sessions || [],
      errors: errors.errors || [],
      errorsTotal: errors.total,
    };
  }

  // --- building the page ----------------------------------------------------------------------

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    if (className) {
      node.className = className;
    }
    return node;
  }

  function badge(text, kind) {
    return el("span", text, `badge ${kind}`);
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) {
        td.append(cell);
      } else {
        td.textContent = cell === null || cell === undefined || cell === "" ? "–" : String(cell);
      }
      tr.append(td);
    }
    return tr;
  }

  function fill(tableId, rows, emptyText) {
    const table = $(tableId);
    if (!rows.length) {
      const tr = row([emptyText]);
      tr.className = "empty";
      tr.firstChild.colSpan = table.tHead.rows[0].cells.length;
      rows = [tr];
    }
    table.tBodies[0].replaceChildren(...rows);
  }

  function when(iso) {
    return typeof iso === "string" ? iso : "–";
  }

  function bytes(count) {
    if (typeof count !== "number") {
      return "–";
    }
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = count;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function limitsText(limits) {
    const parts = [];
    for (const [name, value] of Object.entries(limits || {})) {
      if (value !== null && value !== undefined) {
        parts.push(`${name.replace(/^max_/, "").replace(/_/g, " ")} ${value}`);
      }
    }
    return parts.length ? parts.join(", ") : "unlimited";
  }

  function tenantRow(t) {
    const tr = row([
      t.id,
      t.name,
      badge(t.state, t.state === "active" ? "ok" : "warn"),
      t.contact,
      limitsText(t.limits),
      (t.aliases || []).join(", "),
      t.sessions,
    ]);
    tr.dataset.tenant = t.id;
    return tr;
  }

  function aliasRow(a) {
    const online = Boolean(a.online);
    let seen = "now";
    if (!online) {
      seen = a.last_seen ? when(a.last_seen) : "not since this node started";
    }
    const tr = row([
      a.alias,
      a.tenant,
      badge(online ? "online" : "offline", online ? "ok" : "bad"),
      seen,
      a.sessions,
      when(a.assigned_at),
    ]);
    tr.dataset.alias = a.alias;
    tr.dataset.online = String(online);
    if (!online) {
      tr.className = "offline";
    }
    return tr;
  }

  function sessionRow(s) {
    const tr = row([
      s.tenant,
      (s.aliases || []).join(", "),
      s.node,
      s.remote,
      s.agent,
      when(s.since),
      badge(s.state, s.state === "active" ? "ok" : "warn"),
      `${s.streams} open, ${s.streams_total} in all`,
      bytes(s.bytes_in),
      bytes(s.bytes_out),
    ]);
    tr.dataset.session = s.id;
    return tr;
  }

  function errorRow(e) {
    const tr = row([
      when(e.at),
      e.kind,
      badge(e.error, e.status >= 500 ? "bad" : "warn"),
      e.status,
      e.tenant,
      e.request_id ? el("code", e.request_id) : null,
      e.message,
    ]);
    tr.dataset.error = e.error;
    return tr;
  }

  // --- traffic charts (SVG built with DOM APIs: nothing inline, the CSP stays strict) -----

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) {
      node.setAttribute(name, String(value));
    }
    return node;
  }

  function chart(values, points, kind, label, format) {
    const width = 180;
    const height = 40;
    const max = Math.max(1, ...values);
    const step = width / Math.max(1, values.length);
    const graphic = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: "img",
      class: `chart ${kind}`,
    });
    const total = values.reduce((sum, v) => sum + v, 0);
    const title = svg("title", {});
    title.textContent =
      `${label}: ${format(total)} in 15 minutes, at most ${format(max)} per bucket`;
    const axis = svg("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 });
    axis.setAttribute("class", "axis");
    graphic.append(title, axis);
    values.forEach((value, i) => {
      if (value > 0) {
        const h = Math.max(1.5, (value / max) * (height - 2));
        const bar = svg("rect", {
          x: i * step + 0.5,
          y: height - h,
          width: Math.max(1, step - 1),
          height: h,
        });
        const tip = svg("title", {});
        tip.textContent = `${points[i] || ""}: ${format(value)}`;
        bar.append(tip);
        graphic.append(bar);
      }
    });
    const figure = el("figure", null, "spark");
    figure.append(graphic, el("figcaption", `${label} ${format(total)}`));
    return figure;
  }

  function trafficRow(t, points) {
    const count = (v) => String(v);
    const tr = row([
      t.tenant,
      chart(t.requests || [], points, "requests", "requests", count),
      chart(t.errors || [], points, "errors", "errors", count),
      chart(t.bytes || [], points, "bytes", "bytes", bytes),
    ]);
    tr.dataset.traffic = t.tenant;
    return tr;
  }

  function render(data) {
    const node = data.node;
    $("node").textContent = node.node;
    $("count-node").replaceChildren(
      node.draining ? badge("draining", "warn") : badge("serving", "ok"),
    );
    const traffic = data.traffic || {};
    const points = traffic.points || [];
    const charts = (traffic.tenants || []).map((t) => trafficRow(t, points));
    fill("traffic", charts, "no requests in the last 15 minutes");
    $("count-tenants").textContent = String(data.tenants.length);
    const online = data.aliases.filter((a) => a.online).length;
    $("count-online").textContent = `${online} of ${data.aliases.length}`;
    $("count-sessions").textContent = String(node.sessions);
    $("count-streams").textContent = String(node.streams);
    $("count-errors").textContent = String(data.errorsTotal);
    fill("tenants", data.tenants.map(tenantRow), "no tenants");
    fill("aliases", data.aliases.map(aliasRow), "no aliases assigned");
    fill("sessions", data.sessions.map(sessionRow), "no agent connected");
    fill("errors", data.errors.map(errorRow), "no errors recorded");
  }

  // --- what is shown --------------------------------------------------------------------------

  function clock(date) {
    return date.toISOString().replace(/\.\d+Z$/, "Z");
  }

  function setStatus(state, text) {
    const status = $("status");
    status.dataset.state = state;
    status.textContent = text;
  }

  function clearTables() {
    for (const id of ["tenants", "aliases", "sessions", "errors", "traffic"]) {
      $(id).tBodies[0].replaceChildren();
    }
    $("node").textContent = "";
  }

  function showLogin(message) {
    $("dashboard").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message;
    document.body.classList.remove("stale");
    clearTables();
    lastGood = null;
    setStatus("signed-out", "signed out");
    $("token").focus();
  }

  function showFresh() {
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("sign-out").hidden = false;
    $("stale").hidden = true;
    document.body.classList.remove("stale");
    setStatus("live", `live · updated ${clock(lastGood)}`);
  }

  function showStale(err) {
    const since = lastGood ? `the data is from ${clock(lastGood)}` : "no data yet";
    const reason = err && err.message ? err.message : String(err);
    $("stale").textContent = `Stale: the last refresh failed (${reason}); ${since}. Retrying.`;
    $("stale").hidden = false;
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("sign-out").hidden = false;
    document.body.classList.add("stale");
    // what the node does now is unknown: never keep saying "serving"
    $("count-node").replaceChildren(badge("no answer", "bad"));
    setStatus("stale", `stale · refresh failed at ${clock(new Date())}`);
  }

  // --- the refresh loop -----------------------------------------------------------------------

  async function tick(mine) {
    const secret = token();
    if (!secret) {
      showLogin("");
      return;
    }
    try {
      const data = await load(secret);
      if (mine !== round) {
        return;
      }
      render(data);
      lastGood = new Date();
      showFresh();
    } catch (err) {
      if (mine !== round) {
        return;
      }
      if (err instanceof Refused) {
        forget();
        showLogin("The token was refused (401): enter a valid operator token.");
        return;
      }
      showStale(err);
    }
    clearTimeout(timer);
    timer = setTimeout(() => tick(mine), REFRESH_MS);
  }

  function restart() {
    round += 1;
    clearTimeout(timer);
    tick(round);
  }

  function init() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (!value) {
        $("login-error").textContent = "Enter an operator token.";
        return;
      }
      $("token").value = "";
      $("login-error").textContent = "";
      remember(value);
      setStatus("loading", "checking the token…");
      restart();
    });
    $("sign-out").addEventListener("click", () => {
      forget();
      round += 1;
      clearTimeout(timer);
      showLogin("Signed out.");
    });
    if (token()) {
      setStatus("loading", "loading…");
      restart();
    } else {
      showLogin("");
    }
  }

  init();
})();
