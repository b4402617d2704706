// The admin page's script: no library, no build step, served by the host itself.
//
// - The token comes from the URL fragment (/#token=..., removed from the address bar at once)
//   or from the form, and stays in sessionStorage; every API call sends it as a bearer token.
//   A 401 forgets it and asks again. No cookies.
// - GET /api/status every 2 s, /api/series every 1 s (the chart), /api/history when status
//   shows that services, versions or events changed (it also lists the services kept but not
//   running). Polling pauses while the tab is hidden.
// - Operations are POSTs answering newline-delimited JSON: {"line": ...} as they go, then
//   {"done": true, "ok": ..., "summary": ...}; the lines are shown as they arrive.
// - The page runs under a strict Content-Security-Policy: no inline script or style, so the
//   DOM is built here and styled through classes (and the chart on a canvas).
"use strict";

(function () {
  const STATUS_EVERY_MS = 2000;
  const SERIES_EVERY_MS = 1000;
  const REQUEST_TIMEOUT_MS = 8000;
  const TOKEN_KEY = "host-admin-token";
  // The longest stretch the chart shows (the master keeps five minutes), and the shortest.
  const CHART_MAX_S = 300;
  const CHART_MIN_S = 60;

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null,
    // Bumped whenever the token is set or forgotten: stale polls check it and give up.
    session: 0,
    status: null,
    history: null,
    historyKey: "",
    series: null,
    busy: false,
    stopped: false,
    timers: { status: 0, series: 0 },
    // Per service: its DOM parts and what was last rendered into them.
    cards: new Map(),
  };

  class Unauthorized extends Error {}

  // ---------------------------------------------------------------- token

  function readStoredToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (e) {
      return null;
    }
  }

  function storeToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      // Storage refused (a privacy mode): the token lives as long as the page.
    }
  }

  // Takes a token from `#token=...` and removes it from the address bar and history. Not
  // URLSearchParams: it would turn a "+" of a base64 token into a space.
  function tokenFromFragment() {
    const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (!match) return null;
    history.replaceState(null, "", location.pathname + location.search);
    try {
      return decodeURIComponent(match[1]).trim() || null;
    } catch (e) {
      return match[1].trim() || null;
    }
  }

  function useToken(token) {
    state.token = token;
    state.session += 1;
    storeToken(token);
  }

  function forget(message) {
    stopPolling();
    state.token = null;
    state.session += 1;
    storeToken(null);
    state.status = null;
    state.history = null;
    state.historyKey = "";
    state.series = null;
    showLogin(message);
  }

  function showLogin(message) {
    $("dash").hidden = true;
    $("host-actions").hidden = true;
    $("master").textContent = "";
    setConn("", false);
    $("login").hidden = false;
    const msg = $("login-msg");
    msg.textContent = message || "";
    msg.classList.toggle("bad", Boolean(message));
    $("login-submit").disabled = false;
    $("token").value = "";
    $("token").focus();
  }

  // Checks a token with one status call (never two at once: the server slows down an
  // address that keeps failing) and opens the dashboard if it is accepted.
  async function signIn(token) {
    useToken(token);
    state.stopped = false;
    const session = state.session;
    $("login-submit").disabled = true;
    setConn("connecting…", false);
    try {
      const status = await getJson("/api/status");
      if (session !== state.session) return;
      $("login").hidden = true;
      $("dash").hidden = false;
      $("host-actions").hidden = false;
      state.status = status;
      render();
      startPolling();
    } catch (e) {
      if (session !== state.session) return;
      if (e instanceof Unauthorized) {
        forget("The token was refused. Check the admin token file and try again.");
      } else {
        $("login-submit").disabled = false;
        showLoginError("Could not reach the host: " + e.message);
      }
    }
  }

  function showLoginError(text) {
    $("login").hidden = false;
    const msg = $("login-msg");
    msg.textContent = text;
    msg.classList.add("bad");
    setConn("", false);
  }

  // ---------------------------------------------------------------- API

  function authHeaders() {
    return { Authorization: "Bearer " + state.token };
  }

  async function getJson(path) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      const res = await fetch(path, {
        headers: authHeaders(),
        cache: "no-store",
        credentials: "omit",
        signal: controller.signal,
      });
      if (res.status === 401) throw new Unauthorized();
      if (!res.ok) throw new Error(`${path}: ${res.status} ${(await res.text()).trim()}`);
      return await res.json();
    } catch (e) {
      if (e.name === "AbortError") throw new Error(`${path}: no answer in ${REQUEST_TIMEOUT_MS / 1000} s`);
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  // ---------------------------------------------------------------- polling

  function startPolling() {
    stopPolling();
    schedule("status", 0);
    schedule("series", 0);
  }

  function stopPolling() {
    clearTimeout(state.timers.status);
    clearTimeout(state.timers.series);
    state.timers.status = state.timers.series = 0;
  }

  function schedule(what, delay) {
    clearTimeout(state.timers[what]);
    state.timers[what] = setTimeout(what === "status" ? pollStatus : pollSeries, delay);
  }

  function pollAgain(what, every) {
    if (state.token && !state.stopped && !document.hidden) schedule(what, every);
  }

  async function pollStatus() {
    const session = state.session;
    try {
      const status = await getJson("/api/status");
      if (session !== state.session) return;
      state.status = status;
      const key = historyKey(status);
      if (key !== state.historyKey) {
        state.history = await getJson("/api/history");
        state.historyKey = key;
      }
      if (session !== state.session) return;
      render();
      setConn("updated " + clock(Date.now() / 1000), false);
      document.body.classList.remove("stale");
    } catch (e) {
      if (session !== state.session) return;
      if (e instanceof Unauthorized) return forget("The token was refused; enter it again.");
      setConn("no answer from the host: " + e.message, true);
      document.body.classList.add("stale");
    }
    pollAgain("status", STATUS_EVERY_MS);
  }

  async function pollSeries() {
    const session = state.session;
    try {
      const series = await getJson("/api/series");
      if (session !== state.session) return;
      state.series = series;
      drawCharts();
    } catch (e) {
      if (session !== state.session) return;
      if (e instanceof Unauthorized) return forget("The token was refused; enter it again.");
      // pollStatus reports the host unreachable; nothing more to say here.
    }
    pollAgain("series", SERIES_EVERY_MS);
  }

  // What /api/history adds to status changes only when a version or an event does.
  function historyKey(status) {
    return status.services
      .map((s) => [s.name, s.version, s.version_healthy, s.previous.length, s.recent.length,
        s.recent.length ? s.recent[0].at : 0].join(" "))
      .join("|");
  }

  function setConn(text, bad) {
    const conn = $("conn");
    conn.textContent = text;
    conn.classList.toggle("bad", bad);
  }

  // ---------------------------------------------------------------- formatting

  function duration(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return Math.round(ms) + " ms";
    const s = ms / 1000;
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.floor(s) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} m ${Math.floor(s % 60)} s`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h} h ${m % 60} m`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  function bytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
    if (n < 1024 * 1024 * 1024) return (n / (1024 * 1024)).toFixed(1) + " MiB";
    return (n / (1024 * 1024 * 1024)).toFixed(2) + " GiB";
  }

  const pad = (n) => String(n).padStart(2, "0");

  // Local wall-clock time of a Unix time in seconds: HH:MM:SS today, with the date otherwise.
  function clock(t) {
    const d = new Date(t * 1000);
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    if (d.toDateString() === new Date().toDateString()) return time;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
  }

  function rate(v) {
    return v < 10 ? v.toFixed(1) : Math.round(v).toLocaleString("en-US");
  }

  function millis(v) {
    if (v < 1) return v.toFixed(2) + " ms";
    if (v < 10) return v.toFixed(1) + " ms";
    return Math.round(v).toLocaleString("en-US") + " ms";
  }

  // ---------------------------------------------------------------- DOM helpers

  // An element with classes, attributes and children (strings become text: never HTML).
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "data") Object.entries(value).forEach(([k, v]) => (node.dataset[k] = v));
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // What each table body was last built from.
  const built = new WeakMap();

  // Replaces a table body's rows, unless what they show has not changed (so the buttons in
  // them keep focus across polls).
  function fillRows(tbody, key, build) {
    if (built.get(tbody) === key) return;
    built.set(tbody, key);
    tbody.replaceChildren(...build());
  }

  const cssClass = (text) => String(text).toLowerCase().replace(/[^a-z0-9]+/g, "-");

  // ---------------------------------------------------------------- rendering

  function render() {
    const status = state.status;
    if (!status) return;
    $("master").replaceChildren(
      "master pid ", el("span", { class: "mono" }, status.master_pid),
      ` · up ${duration(status.uptime_ms)} · host ${status.host_version} · build `,
      el("span", { class: "mono", title: status.executable }, status.build_id),
    );
    $("reload-all").hidden = status.services.length < 2;
    setBusy(state.busy);

    const container = $("services");
    const seen = new Set();
    status.services.forEach((svc, i) => {
      seen.add(svc.name);
      let card = state.cards.get(svc.name);
      if (!card) {
        card = makeCard(svc.name);
        state.cards.set(svc.name, card);
      }
      if (container.children[i] !== card.root) container.insertBefore(card.root, container.children[i] || null);
      renderService(card, svc);
    });
    for (const [name, card] of state.cards) {
      if (!seen.has(name)) {
        card.root.remove();
        state.cards.delete(name);
      }
    }
    renderDormant();
    drawCharts();
  }

  // The services whose history the host keeps but does not run (/api/history's not_running).
  function renderDormant() {
    const list = (state.history && state.history.not_running) || [];
    $("dormant").hidden = list.length === 0;
    fillRows($("dormant").querySelector("tbody"), JSON.stringify(list), () => list.map((svc) => {
      const live = svc.live;
      return el("tr", { data: { service: svc.name } },
        el("td", {}, el("strong", {}, svc.name)),
        el("td", {}, svc.last_ran ? clock(svc.last_ran) : "–"),
        el("td", {}, live ? el("code", {}, live.version) : "none"),
        el("td", { class: "wrap status" }, live ? versionStatus(live) : null),
        svc.previous.length
          ? el("td", { class: "mono wrap" }, svc.previous.map((v) => v.version).join(", "))
          : el("td", { class: "muted" }, "none"),
        el("td", { class: "mono wrap" }, live ? live.source : "–"));
    }));
  }

  let cardsMade = 0;

  function makeCard(name) {
    const root = $("service-template").content.firstElementChild.cloneNode(true);
    root.dataset.service = name;
    const part = (selector) => root.querySelector(selector);
    const card = {
      root,
      name: part(".name"),
      version: part(".version"),
      health: part(".health"),
      listen: part(".listen"),
      plugin: part(".plugin"),
      alerts: part(".alerts"),
      reload: part(".reload"),
      rollback: part(".rollback"),
      workers: part(".workers tbody"),
      versions: part(".versions tbody"),
      events: part(".events tbody"),
      canvas: part(".chart"),
      now: part(".chart-now"),
    };
    const headingId = `service-${++cardsMade}`;
    card.name.id = headingId;
    root.setAttribute("aria-labelledby", headingId);
    card.name.textContent = name;
    card.reload.dataset.service = name;
    card.rollback.dataset.service = name;
    card.reload.setAttribute("aria-label", `Reload ${name}`);
    card.rollback.setAttribute("aria-label", `Roll back ${name} to its previous version`);
    card.reload.addEventListener("click", () => reload(name));
    card.rollback.addEventListener("click", () => rollback(name, null));
    card.versions.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-version]");
      if (button) rollback(name, button.dataset.version);
    });
    return card;
  }

  function renderService(card, svc) {
    card.version.textContent = svc.version;
    card.version.title = "the plugin version new workers load";
    const health = liveHealth(svc);
    card.health.textContent = health.text;
    card.health.className = "health " + health.cls;
    card.listen.textContent = svc.listen.join(", ");
    card.plugin.textContent = svc.plugin;

    const alerts = [];
    if (svc.crashes_last_minute > 0) {
      alerts.push(el("span", { class: "bad" },
        `${svc.crashes_last_minute} worker crash${svc.crashes_last_minute === 1 ? "" : "es"} in the last minute`));
    }
    if (svc.held_back) {
      alerts.push(el("span", { class: "warn" }, `held back: ${svc.held_back}`));
    }
    if (!svc.reloadable) {
      alerts.push(el("span", { class: "muted" }, "reloadable = false: restart or upgrade the host to change it"));
    }
    card.alerts.hidden = alerts.length === 0;
    card.alerts.replaceChildren(...alerts.flatMap((a, i) => (i ? [" · ", a] : [a])));

    card.canReload = svc.reloadable;
    card.reload.title = svc.reloadable ? "Load the plugin file again, one worker at a time" : "reloadable = false";
    // What the server rolls back to when no version is named: the newest previous one.
    const previous = svc.previous[0];
    card.canRollback = svc.reloadable && Boolean(previous);
    card.rollback.title = !svc.reloadable ? "reloadable = false"
      : previous ? `Back to ${previous.version}` : "No earlier version is kept";

    renderWorkers(card, svc);
    renderVersions(card, svc);
    renderEvents(card, svc);
    enableButtons(card);
  }

  // How the live version stands; `short` leaves out what a failure would roll back to.
  function liveHealth(svc, short) {
    if (svc.probation_left_ms !== null && svc.probation_left_ms !== undefined) {
      return {
        text: `on probation, ${duration(svc.probation_left_ms)} left` +
          (svc.probation_fallback && !short ? ` (a crash rolls back to ${svc.probation_fallback})` : ""),
        cls: "warn",
      };
    }
    if (svc.version_healthy) return { text: "healthy", cls: "good" };
    return { text: "not yet proven healthy", cls: "muted" };
  }

  // One row per worker, grouped by slot; an empty slot (waiting out its restart backoff) gets
  // a row of its own, and a slot whose last worker ended unexpectedly a row saying how.
  function renderWorkers(card, svc) {
    const slots = new Map(svc.slots.map((s) => [s.slot, s]));
    const numbers = new Set([...slots.keys(), ...svc.workers.map((w) => w.slot)]);
    const rows = [];
    for (const n of [...numbers].sort((a, b) => a - b)) {
      const slot = slots.get(n);
      const workers = svc.workers.filter((w) => w.slot === n);
      const exit = slot && slot.last_exit ? lastExit(slot) : null;
      const span = Math.max(1, workers.length) + (exit ? 1 : 0);
      const slotCell = el("td", { class: "slot", rowspan: span > 1 ? span : null }, n);
      if (workers.length === 0) {
        const waiting = slot && slot.next_retry_in_ms !== null && slot.next_retry_in_ms !== undefined
          ? `empty: next start in ${duration(slot.next_retry_in_ms)}` : "empty";
        rows.push(el("tr", { data: { slot: n } }, slotCell,
          el("td", { colspan: 8 }, el("span", { class: "state state-empty" }, waiting))));
      }
      workers.forEach((w, i) => {
        const requests = w.requests === null || w.requests === undefined
          ? el("span", { title: "the worker did not answer in time" }, "?")
          : w.requests.toLocaleString("en-US");
        const heartbeat = w.heartbeat_age_ms === null || w.heartbeat_age_ms === undefined
          ? "–" : duration(w.heartbeat_age_ms) + " ago";
        rows.push(el("tr", { data: { pid: w.pid, state: w.state, slot: n } },
          i === 0 ? slotCell : null,
          el("td", { class: "mono pid" }, w.pid),
          el("td", {}, el("span", { class: "state state-" + cssClass(w.state) }, w.state)),
          el("td", { class: "mono" }, w.version),
          el("td", { class: "num" }, duration(w.uptime_ms)),
          el("td", { class: "num" }, requests),
          el("td", { class: "num" }, bytes(w.rss_bytes)),
          el("td", { class: "num" }, w.connections),
          el("td", { class: "num" + (w.heartbeat_age_ms > 5000 ? " bad" : "") }, heartbeat)));
      });
      if (exit) {
        rows.push(el("tr", { class: "exit-row", data: { slot: n } },
          el("td", { class: "exit" + (slot.crashes_in_a_row > 0 ? " bad" : ""), colspan: 8 }, exit)));
      }
    }
    // Uptimes and counts change on every poll: always rebuilt (nothing in it takes focus).
    card.workers.replaceChildren(...rows);
  }

  function lastExit(slot) {
    let text = `last exit ${duration(slot.last_exit_ago_ms || 0)} ago: ${slot.last_exit}`;
    if (slot.crashes_in_a_row > 0) text += ` (${slot.crashes_in_a_row} short-lived in a row)`;
    return text;
  }

  // The live version's details come from /api/history; status has the previous ones.
  function renderVersions(card, svc) {
    const hist = state.history && state.history.services.find((s) => s.name === svc.name);
    const live = hist && hist.live.version === svc.version ? hist.live : null;
    const key = JSON.stringify([svc.version, liveHealth(svc).text, live, svc.previous, svc.reloadable]);
    fillRows(card.versions, key, () => {
      const rows = [];
      rows.push(el("tr", { class: "live", data: { version: svc.version } },
        el("td", {}, el("code", {}, svc.version), " ", el("strong", {}, "live")),
        el("td", { class: "wrap " + liveHealth(svc).cls }, liveHealth(svc, true).text),
        el("td", {}, live ? clock(live.first_loaded) : "–"),
        el("td", { class: "num" }, live ? bytes(live.size) : "–"),
        el("td", { class: "mono wrap" }, live ? live.source : "–"),
        el("td", {})));
      for (const v of svc.previous) {
        rows.push(el("tr", { data: { version: v.version } },
          el("td", {}, el("code", {}, v.version)),
          el("td", { class: "wrap status" }, versionStatus(v)),
          el("td", {}, clock(v.first_loaded)),
          el("td", { class: "num" }, bytes(v.size)),
          el("td", { class: "mono wrap" }, v.source),
          el("td", {}, svc.reloadable ? el("button", {
            type: "button", class: "small", data: { version: v.version },
            "aria-label": `Roll back ${svc.name} to ${v.version}`,
          }, "Roll back") : null)));
      }
      if (svc.previous.length === 0) {
        rows.push(el("tr", {}, el("td", { class: "empty", colspan: 6 }, "no earlier version kept")));
      }
      return rows;
    });
  }

  // How a kept version stands, from its marks.
  function versionStatus(v) {
    if (v.failed) {
      return [el("span", { class: "outcome-failed" }, "failed"), el("span", { class: "detail", title: v.failed }, firstLine(v.failed))];
    }
    if (v.set_aside) {
      return [el("span", { class: "muted" }, "set aside"), el("span", { class: "detail", title: v.set_aside }, v.set_aside)];
    }
    return v.healthy ? el("span", { class: "good" }, "healthy") : el("span", { class: "muted" }, "never proven healthy");
  }

  function firstLine(text) {
    return String(text).split("\n")[0];
  }

  function renderEvents(card, svc) {
    fillRows(card.events, JSON.stringify(svc.recent), () => {
      if (svc.recent.length === 0) {
        return [el("tr", {}, el("td", { class: "empty", colspan: 5 }, "none recorded"))];
      }
      return svc.recent.map((e) => el("tr", {},
        el("td", {}, clock(e.at)),
        el("td", {}, e.kind),
        el("td", {}, el("code", {}, e.from), " → ", el("code", {}, e.to)),
        el("td", { class: "wrap" },
          el("span", { class: "outcome-" + cssClass(e.outcome) }, e.outcome),
          e.detail ? el("span", { class: "detail", title: e.detail }, firstLine(e.detail)) : null),
        el("td", { class: "num" }, duration(e.duration_ms))));
    });
  }

  // ---------------------------------------------------------------- chart

  // The chart's colours, from the style sheet's --chart-* properties (read once).
  let palette = null;

  function chartColors() {
    if (!palette) {
      const style = getComputedStyle(document.documentElement);
      palette = {};
      for (const name of ["grid", "axis", "rps", "p99", "reload", "rollback", "failed"]) {
        palette[name] = style.getPropertyValue("--chart-" + name).trim();
      }
    }
    return palette;
  }

  // A round axis maximum at or above `v`, and a step that divides it into `ticks`.
  function niceMax(v, ticks) {
    if (!(v > 0)) return { max: ticks, step: 1 };
    const raw = v / ticks;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw);
    return { max: step * ticks, step };
  }

  // A tick value with as many decimals as the step needs (0.25 -> 2, 2.5 -> 1, 50 -> 0).
  function axisLabel(v, step) {
    let decimals = 0;
    while (decimals < 4 && Math.abs(Math.round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-9) decimals++;
    return v.toFixed(decimals);
  }

  function drawCharts() {
    if (!state.status) return;
    for (const svc of state.status.services) {
      const card = state.cards.get(svc.name);
      if (card) drawChart(card, svc.name);
    }
  }

  function drawChart(card, name) {
    const canvas = card.canvas;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const colors = chartColors();
    ctx.font = "11px system-ui, sans-serif";

    const series = state.series;
    const points = (series && series.services[name]) || [];
    // The newest sample of any service is "now" on the server's clock.
    let end = 0;
    if (series) {
      for (const list of Object.values(series.services)) {
        if (list.length) end = Math.max(end, list[list.length - 1].t);
      }
    }
    if (!points.length || !end) {
      ctx.fillStyle = colors.axis;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(series ? "no requests yet" : "loading…", width / 2, height / 2);
      card.now.textContent = "";
      canvas.setAttribute("aria-label", `Traffic of ${name}: no requests yet`);
      return;
    }
    const interval = (series && series.interval_s) || 1;
    const span = Math.min(CHART_MAX_S, Math.max(CHART_MIN_S, end - points[0].t));
    const start = end - span;
    const shown = points.filter((p) => p.t >= start);

    const box = { left: 44, right: 52, top: 16, bottom: 18 };
    const plotW = width - box.left - box.right;
    const plotH = height - box.top - box.bottom;
    const x = (t) => box.left + ((t - start) / span) * plotW;
    const ticks = 4;
    const rpsAxis = niceMax(Math.max(0, ...shown.map((p) => p.rps)), ticks);
    const p99Axis = niceMax(Math.max(0, ...shown.map((p) => p.p99_ms || 0)), ticks);
    const yRps = (v) => box.top + plotH - (v / rpsAxis.max) * plotH;
    const yP99 = (v) => box.top + plotH - (v / p99Axis.max) * plotH;

    // Grid and value axes.
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    for (let i = 0; i <= ticks; i++) {
      const y = Math.round(box.top + plotH - (i / ticks) * plotH) + 0.5;
      ctx.strokeStyle = colors.grid;
      ctx.beginPath();
      ctx.moveTo(box.left, y);
      ctx.lineTo(box.left + plotW, y);
      ctx.stroke();
      ctx.fillStyle = colors.rps;
      ctx.textAlign = "right";
      ctx.fillText(axisLabel(i * rpsAxis.step, rpsAxis.step), box.left - 5, y);
      ctx.fillStyle = colors.p99;
      ctx.textAlign = "left";
      ctx.fillText(axisLabel(i * p99Axis.step, p99Axis.step) + (i === ticks ? " ms" : ""), box.left + plotW + 5, y);
    }

    // Time axis: local clock times at round steps, at least 70 px apart.
    const step = [5, 10, 15, 30, 60, 120, 300].find((s) => (s / span) * plotW >= 70) || 300;
    ctx.fillStyle = colors.axis;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let t = Math.ceil(start / step) * step; t <= end; t += step) {
      const px = Math.round(x(t)) + 0.5;
      ctx.strokeStyle = colors.grid;
      ctx.beginPath();
      ctx.moveTo(px, box.top);
      ctx.lineTo(px, box.top + plotH);
      ctx.stroke();
      const d = new Date(t * 1000);
      const label = step < 60 ? `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
        : `${pad(d.getHours())}:${pad(d.getMinutes())}`;
      ctx.fillText(label, px, box.top + plotH + 4);
    }

    // Reload and rollback markers: a band for how long it took, a line where it ended.
    const events = ((series && series.events) || []).filter((e) => e.service === name && e.at >= start && e.at <= end + interval);
    let lastLabelEnd = -Infinity;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    for (const e of events) {
      const failed = e.outcome !== "done";
      const color = failed ? colors.failed : e.kind === "reload" ? colors.reload : colors.rollback;
      const px = Math.round(x(Math.min(e.at, end))) + 0.5;
      const began = x(Math.max(start, e.at - e.duration_ms / 1000));
      if (px - began >= 2) {
        ctx.globalAlpha = 0.12;
        ctx.fillStyle = color;
        ctx.fillRect(began, box.top, px - began, plotH);
        ctx.globalAlpha = 1;
      }
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.setLineDash(failed ? [3, 3] : []);
      ctx.beginPath();
      ctx.moveTo(px, box.top - 2);
      ctx.lineTo(px, box.top + plotH);
      ctx.stroke();
      ctx.setLineDash([]);
      const label = (e.kind === "reload" ? "reload" : e.kind === "rollback" ? "rollback" : "auto rollback") +
        (failed ? " ✗" : "");
      const labelW = ctx.measureText(label).width;
      if (px + 3 > lastLabelEnd && px + 3 + labelW < width) {
        ctx.fillStyle = color;
        ctx.fillText(label, px + 3, 2);
        lastLabelEnd = px + 3 + labelW + 6;
      }
    }
    ctx.lineWidth = 1;

    // The two lines; a gap in the samples (or a second with no requests for p99) breaks them.
    const line = (value, y, color, dash, fill) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.setLineDash(dash);
      ctx.lineJoin = "round";
      let run = [];
      const runs = [];
      let prev = null;
      for (const p of shown) {
        const v = value(p);
        if (v === null || v === undefined || (prev && p.t - prev.t > 2 * interval)) {
          if (run.length) runs.push(run);
          run = [];
        }
        if (v !== null && v !== undefined) run.push([x(p.t), y(v)]);
        prev = p;
      }
      if (run.length) runs.push(run);
      for (const r of runs) {
        if (fill && r.length > 1) {
          ctx.globalAlpha = 0.08;
          ctx.fillStyle = color;
          ctx.beginPath();
          ctx.moveTo(r[0][0], box.top + plotH);
          r.forEach(([px, py]) => ctx.lineTo(px, py));
          ctx.lineTo(r[r.length - 1][0], box.top + plotH);
          ctx.closePath();
          ctx.fill();
          ctx.globalAlpha = 1;
        }
        ctx.beginPath();
        r.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
        if (r.length === 1) ctx.lineTo(r[0][0] + 1, r[0][1]);
        ctx.stroke();
      }
      ctx.setLineDash([]);
      ctx.lineWidth = 1;
    };
    line((p) => p.rps, yRps, colors.rps, [], true);
    line((p) => p.p99_ms, yP99, colors.p99, [5, 3], false);

    // Plot frame.
    ctx.strokeStyle = colors.axis;
    ctx.beginPath();
    ctx.moveTo(box.left + 0.5, box.top);
    ctx.lineTo(box.left + 0.5, box.top + plotH + 0.5);
    ctx.lineTo(box.left + plotW, box.top + plotH + 0.5);
    ctx.stroke();

    // The newest values, in words too (for the heading and for screen readers).
    const last = points[points.length - 1];
    const peak = Math.max(...shown.map((p) => p.rps));
    const now = `${rate(last.rps)} req/s · p99 ${last.p99_ms === null ? "–" : millis(last.p99_ms)}`;
    card.now.textContent = "now " + now;
    canvas.setAttribute("aria-label",
      `Traffic of ${name} over the last ${duration(span * 1000)}: now ${now}; peak ${rate(peak)} req/s; ` +
      `${events.length} reload${events.length === 1 ? "" : "s"} or rollback${events.length === 1 ? "" : "s"} shown`);
  }

  let resizeQueued = false;
  window.addEventListener("resize", () => {
    if (resizeQueued) return;
    resizeQueued = true;
    requestAnimationFrame(() => {
      resizeQueued = false;
      drawCharts();
    });
  });

  // ---------------------------------------------------------------- operations

  // One operation at a time (the host queues them anyway): buttons are off while one runs.
  function setBusy(busy) {
    state.busy = busy;
    const off = busy || state.stopped;
    for (const id of ["reload-all", "upgrade", "stop"]) $(id).disabled = off;
    for (const card of state.cards.values()) enableButtons(card);
  }

  function enableButtons(card) {
    const off = state.busy || state.stopped;
    card.reload.disabled = off || !card.canReload;
    card.rollback.disabled = off || !card.canRollback;
    card.versions.querySelectorAll("button").forEach((b) => (b.disabled = off));
  }

  function service(name) {
    return state.status && state.status.services.find((s) => s.name === name);
  }

  function reload(name) {
    const svc = service(name);
    const workers = svc ? svc.slots.length : "its";
    if (!confirm(`Reload ${name}?\n\nThe plugin is loaded again from ${svc ? svc.plugin : "its file"} ` +
      `and ${workers} workers are replaced one at a time; a new version that fails its canary is rolled back.`)) return;
    operation(`Reload ${name}`, "/api/reload?service=" + encodeURIComponent(name));
  }

  function reloadAll() {
    if (!confirm("Reload every reloadable service?\n\nEach one loads its plugin again and replaces its workers one at a time.")) return;
    operation("Reload all services", "/api/reload");
  }

  function rollback(name, to) {
    const svc = service(name);
    const target = to || (svc && svc.previous.length ? svc.previous[0].version : "the previous version");
    if (!confirm(`Roll ${name} back from ${svc ? svc.version : "its live version"} to ${target}?\n\n` +
      "Its workers are replaced one at a time with the kept copy of that version.")) return;
    let path = "/api/rollback?service=" + encodeURIComponent(name);
    if (to) path += "&to=" + encodeURIComponent(to);
    operation(`Roll back ${name} to ${target}`, path);
  }

  function upgrade() {
    const exe = $("upgrade-exe").value.trim();
    const from = exe || (state.status ? state.status.executable : "the same executable");
    if (!confirm(`Upgrade the host?\n\nA new master is started from ${from}; it takes over the listeners ` +
      "once its workers are ready, and this master drains and exits. If the new one fails, this one keeps serving.")) return;
    operation("Upgrade the host", "/api/upgrade" + (exe ? "?exe=" + encodeURIComponent(exe) : ""));
  }

  function stop() {
    if (!confirm("Stop the host?\n\nEvery service stops accepting connections, finishes the requests in flight, " +
      "and the master exits. Nothing restarts it from this page.")) return;
    operation("Stop the host", "/api/stop", true);
  }

  // Runs one POST operation, showing its progress lines as they stream in.
  async function operation(title, path, stopping) {
    if (state.busy) return;
    setBusy(true);
    const op = $("op");
    const log = $("op-log");
    op.hidden = false;
    op.classList.remove("ok", "failed");
    $("op-title").textContent = title;
    $("op-state").textContent = "running…";
    log.replaceChildren();
    const started = performance.now();
    const print = (text, cls) => {
      log.append(el("span", { class: cls }, text), "\n");
      log.scrollTop = log.scrollHeight;
    };
    let outcome = null;
    const handle = (text) => {
      if (!text.trim()) return;
      let msg;
      try {
        msg = JSON.parse(text);
      } catch (e) {
        return print(text);
      }
      if (msg.done) {
        outcome = msg;
        print(msg.summary, "outcome");
      } else if (msg.line !== undefined) {
        print(msg.line);
      }
    };
    try {
      const res = await fetch(path, { method: "POST", headers: authHeaders(), cache: "no-store", credentials: "omit" });
      if (res.status === 401) {
        finish(false, "the token was refused");
        forget("The token was refused; enter it again.");
        return;
      }
      if (!res.ok || !res.body) {
        const text = (await res.text()).trim();
        print(text || res.statusText);
        finish(false, `refused (${res.status})`);
        return;
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          handle(buffered.slice(0, newline));
          buffered = buffered.slice(newline + 1);
        }
      }
      handle(buffered + decoder.decode());
      if (!outcome) finish(false, "the connection closed before the outcome");
      else finish(outcome.ok, outcome.ok ? "done" : "failed");
    } catch (e) {
      print(String(e.message || e));
      finish(false, "the request failed");
    } finally {
      setBusy(false);
      if (stopping && outcome && outcome.ok) hostStopped();
      else if (state.token) schedule("status", 0);
    }

    function finish(ok, text) {
      op.classList.add(ok ? "ok" : "failed");
      $("op-state").textContent = `${text} · ${duration(performance.now() - started)}`;
    }
  }

  function hostStopped() {
    state.stopped = true;
    stopPolling();
    setBusy(false);
    setConn("the host has stopped", true);
    document.body.classList.add("stale");
  }

  // ---------------------------------------------------------------- start

  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (token) signIn(token);
    });
    $("forget").addEventListener("click", () => forget(""));
    $("reload-all").addEventListener("click", reloadAll);
    $("upgrade").addEventListener("click", upgrade);
    $("stop").addEventListener("click", stop);
    $("op-close").addEventListener("click", () => {
      $("op").hidden = true;
    });
    window.addEventListener("hashchange", () => {
      const token = tokenFromFragment();
      if (token) signIn(token);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.token && !state.stopped && !$("dash").hidden) startPolling();
    });

    const token = tokenFromFragment() || readStoredToken();
    if (token) signIn(token);
    else showLogin("");
  }

  start();
})();
