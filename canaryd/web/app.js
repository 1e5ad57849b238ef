/* canaryd dashboard: no dependencies, no inline code (the CSP forbids it).
 * Every piece of data is inserted with textContent or SVG attributes, never innerHTML. */
"use strict";

(function () {
  const API = "/api/v1";
  const TOKEN_KEY = "canaryd.token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const ACTIVE = new Set(["Progressing", "WaitingApproval", "Holding", "Promoting"]);
  const PHASE_WORDS = {
    Idle: "Idle",
    Progressing: "Progressing",
    WaitingApproval: "Waiting for approval",
    Holding: "Holding",
    Promoting: "Promoting",
    Succeeded: "Succeeded",
    RolledBack: "Rolled back",
    Failed: "Failed",
  };
  const DECISION_WORDS = {
    rollback: "Rolled back",
    pass: "Passed",
    hold: "Holding",
    continue: "Continuing",
  };

  const state = {
    rows: new Map(), // "ns/name" -> CanarySummary
    detailKey: null, // "ns/name" when the detail view is open
    detail: null,
    series: null,
    detailTimer: null,
    detailPending: null,
    listPending: null,
    es: null,
    flash: null, // {kind: "ok"|"error", text}
    slos: [], // GET /slos rows: each service's SLO figures and policy tier
  };
  const TIER_WORDS = {
    normal: "Normal",
    approval: "Every later step needs approval",
    override: "New rollouts need an override",
    frozen: "Frozen: fixes only",
  };
  const BURN_WINDOWS = [["5m", "300"], ["1h", "3600"], ["6h", "21600"], ["1d", "86400"]];

  // -- small helpers ------------------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") node.className = v;
        else if (k === "text") node.textContent = v;
        else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function put(node, ...children) {
    // replaceChildren() would insert null as the text "null"
    node.replaceChildren(...children.filter((c) => c !== null && c !== undefined && c !== false));
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    return node;
  }

  function keyOf(c) {
    return c.namespace + "/" + c.name;
  }

  function ms(t) {
    return t ? Date.parse(t) : NaN;
  }

  function ago(t) {
    const at = ms(t);
    if (!isFinite(at)) return "–";
    let s = Math.max(0, Math.round((Date.now() - at) / 1000));
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m" + (m < 10 ? " " + (s % 60) + "s" : "");
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h" + (h < 10 ? " " + (m % 60) + "m" : "");
    return Math.floor(h / 24) + "d";
  }

  function clock(t) {
    const at = ms(t);
    if (!isFinite(at)) return "–";
    return new Date(at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function fullTime(t) {
    const at = ms(t);
    return isFinite(at) ? new Date(at).toISOString() : "";
  }

  function num(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return v.toFixed(digits === undefined ? (a >= 100 ? 0 : a >= 10 ? 1 : 2) : digits);
  }

  function phaseClass(phase) {
    return "phase phase-" + String(phase || "Idle").toLowerCase();
  }

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  async function getJSON(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 10000);
    try {
      const resp = await fetch(API + path, { headers: { Accept: "application/json" }, cache: "no-store", signal: ctl.signal });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      return await resp.json();
    } catch (e) {
      if (e.name === "AbortError") throw new Error("the server did not answer within 10 s");
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.message) return body.message;
    } catch (e) {
      /* not JSON */
    }
    return "HTTP " + resp.status + " " + resp.statusText;
  }

  const STRATEGY_WORDS = {
    abTest: "A/B test: a cohort chosen by header goes to the canary",
    blueGreen: "blue/green: a warm-up, then all traffic at once (the old version kept)",
  };

  // "600s per step", or with a step of its own length (blue/green's switch, judged
  // for scaleDownDelay) "600s per step, the 100% step 30s"
  function stepDurations(spec) {
    const base = num(spec.stepDurationS) + "s per step";
    const own = (spec.stepDurationsS || [])
      .map((s, i) => [s, (spec.steps || [])[i]])
      .filter(([s]) => s !== spec.stepDurationS)
      .map(([s, w]) => "the " + w + "% step " + num(s) + "s");
    return own.length ? base + ", " + own.join(", ") : base;
  }

  function stepText(c) {
    const n = (c.steps || []).length;
    if (!n) return "–";
    if (c.phase === "Idle") return "– / " + n;
    return Math.min(c.stepIndex + 1, n) + " / " + n;
  }

  function decisionText(c) {
    if (!c.lastDecision) return "–";
    return DECISION_WORDS[c.lastDecision] || c.lastDecision;
  }

  // -- connection indicator -----------------------------------------------------------

  function setConn(kind, text) {
    const node = $("conn");
    node.className = "conn conn-" + kind;
    $("conn-text").textContent = text;
  }

  // -- token ------------------------------------------------------------------------------

  function renderToken() {
    const t = token();
    $("token-state").textContent = t ? "token set" : "read-only";
    $("token-state").className = "token-state" + (t ? " is-set" : "");
    $("token-input").value = "";
    $("token-input").placeholder = t ? "•••••• (set)" : "operator token";
    $("token-clear").disabled = !t;
  }

  function setupToken() {
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const v = $("token-input").value.trim();
      try {
        if (v) sessionStorage.setItem(TOKEN_KEY, v);
      } catch (e) {
        /* storage disabled */
      }
      renderToken();
      if (state.detail) renderDetail();
    });
    $("token-clear").addEventListener("click", () => {
      try {
        sessionStorage.removeItem(TOKEN_KEY);
      } catch (e) {
        /* storage disabled */
      }
      renderToken();
      if (state.detail) renderDetail();
    });
    renderToken();
  }

  // -- the table --------------------------------------------------------------------------

  function weightBar(weight, phase) {
    const bar = el("span", { class: "bar", "aria-hidden": "true" });
    const fill = el("span", { class: "bar-fill " + "fill-" + String(phase || "idle").toLowerCase() });
    fill.style.width = Math.max(0, Math.min(100, weight)) + "%";
    bar.append(fill);
    return bar;
  }

  function buildRow(c) {
    const key = keyOf(c);
    const tr = el("tr", { tabindex: "0", "data-key": key, class: "row" });
    tr.addEventListener("click", () => openDetail(key));
    tr.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") {
        ev.preventDefault();
        openDetail(key);
      } else if (ev.key === "ArrowDown" && tr.nextElementSibling) {
        ev.preventDefault();
        tr.nextElementSibling.focus();
      } else if (ev.key === "ArrowUp" && tr.previousElementSibling) {
        ev.preventDefault();
        tr.previousElementSibling.focus();
      }
    });
    const cells = {
      name: el("td", { class: "c-name", "data-label": "Canary" }),
      phase: el("td", { class: "c-phase", "data-label": "Phase" }),
      weight: el("td", { class: "c-weight", "data-label": "Weight" }),
      step: el("td", { class: "c-step num", "data-label": "Step" }),
      rev: el("td", { class: "c-rev col-rev", "data-label": "Revision" }),
      age: el("td", { class: "c-age col-age num", "data-label": "Age" }),
      decision: el("td", { class: "c-decision", "data-label": "Last decision" }),
    };
    for (const td of Object.values(cells)) tr.append(td);
    tr._cells = cells;
    fillRow(tr, c);
    return tr;
  }

  function fillRow(tr, c) {
    const cells = tr._cells;
    put(cells.name, 
      el("span", { class: "ns", text: c.namespace + "/" }),
      el("a", { class: "name", href: "#/" + encodeURIComponent(c.namespace) + "/" + encodeURIComponent(c.name), tabindex: "-1", text: c.name }),
      c.ready ? null : el("span", { class: "badge badge-bad", title: c.readyMessage || "not ready", text: "not ready" })
    );
    const phaseNode = el("span", { class: phaseClass(c.phase), text: PHASE_WORDS[c.phase] || c.phase });
    const extra = c.phase === "WaitingApproval" && c.waitingApprovalFor !== null ? el("span", { class: "sub", text: "approve " + c.waitingApprovalFor + "%" }) : null;
    put(cells.phase, phaseNode, extra);
    cells.phase.title = c.message || "";
    put(cells.weight, weightBar(c.canaryWeight, c.phase), el("span", { class: "weight-text num", text: c.canaryWeight + "%" }));
    cells.step.textContent = stepText(c);
    cells.rev.textContent = c.revision || "–";
    cells.age.textContent = ago(c.createdAt);
    cells.age.title = c.createdAt ? "created " + fullTime(c.createdAt) : "";
    const dec = el("span", { class: "decision dec-" + (c.lastDecision || "none"), text: decisionText(c) });
    const when = c.lastDecisionAt ? el("span", { class: "muted when", text: " " + ago(c.lastDecisionAt) + " ago" }) : null;
    const reason = c.lastReason ? el("span", { class: "reason", text: c.lastReason }) : null;
    put(cells.decision, el("span", { class: "dec-line" }, dec, when), reason);
    cells.decision.title = c.lastReason || "";
    tr.setAttribute("aria-label", c.namespace + "/" + c.name + ": " + (PHASE_WORDS[c.phase] || c.phase) + ", weight " + c.canaryWeight + "%, step " + stepText(c));
  }

  function renderTable() {
    const body = $("canary-rows");
    const keys = [...state.rows.keys()].sort();
    const existing = new Map();
    for (const tr of body.children) existing.set(tr.getAttribute("data-key"), tr);
    const focused = document.activeElement;
    keys.forEach((key, i) => {
      const c = state.rows.get(key);
      let tr = existing.get(key);
      if (tr) {
        fillRow(tr, c);
        existing.delete(key);
      } else {
        tr = buildRow(c);
      }
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    for (const tr of existing.values()) tr.remove();
    if (focused && document.body.contains(focused) && document.activeElement !== focused) focused.focus();
    $("list-count").textContent = keys.length ? "(" + keys.length + ")" : "";
    $("list-empty").hidden = keys.length > 0;
  }

  function updateRow(c) {
    const key = keyOf(c);
    state.rows.set(key, c);
    const tr = $("canary-rows").querySelector('tr[data-key="' + CSS.escape(key) + '"]');
    if (tr) fillRow(tr, c);
    else renderTable();
  }

  async function loadList() {
    if (state.listPending) return state.listPending;
    state.listPending = (async () => {
      try {
        const list = await getJSON("/canaries");
        state.rows = new Map(list.map((c) => [keyOf(c), c]));
        $("list-error").hidden = true;
        renderTable();
        loadSlos();
      } catch (e) {
        $("list-error").textContent = "Could not load the canaries: " + e.message;
        $("list-error").hidden = false;
      } finally {
        state.listPending = null;
      }
    })();
    return state.listPending;
  }


  // -- error budgets ------------------------------------------------------------------

  function pct(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    return (100 * v).toFixed(digits === undefined ? 1 : digits).replace(/\.0+$/, "") + "%";
  }

  function budgetLevel(left) {
    if (left === null || left === undefined) return "none";
    if (left <= 0) return "out";
    if (left < 0.2) return "low";
    if (left < 0.5) return "half";
    return "ok";
  }

  function budgetBar(left) {
    const bar = el("span", { class: "bar", "aria-hidden": "true" });
    const fill = el("span", { class: "bar-fill budget-" + budgetLevel(left) });
    fill.style.width = (left === null || left === undefined ? 0 : Math.max(0, Math.min(1, left)) * 100) + "%";
    bar.append(fill);
    return bar;
  }

  function tierNode(row) {
    const words = TIER_WORDS[row.tier] || row.tier;
    return el(
      "span",
      { class: "tier tier-" + row.tier + (row.enforced ? "" : " tier-off"), title: row.reason },
      words + (row.enforced ? "" : " (not enforced)")
    );
  }

  function burnText(o) {
    return BURN_WINDOWS.map(([, w]) => {
      const v = o.burn_rates[w];
      return v === null || v === undefined ? "–" : num(v, v >= 10 ? 0 : v >= 1 ? 1 : 2) + "×";
    }).join(" · ");
  }

  function sloCells(row, name, o, withService) {
    const firing = o.firing && o.firing.length ? el("span", { class: "badge badge-bad", title: "both windows of the pair burn faster than its factor", text: "burning " + o.firing.join(", ") }) : null;
    return [
      withService ? el("td", { class: "c-name", "data-label": "Service" }, el("span", { class: "ns", text: row.namespace + "/" }), el("span", { class: "name", text: row.service })) : null,
      el("td", { "data-label": "Objective", text: objectiveText(name, o) }),
      el("td", { class: "num", "data-label": "Achieved", text: pct(o.availability, 3) }),
      el("td", { class: "num c-budget", "data-label": "Budget left" }, budgetBar(o.error_budget_remaining), el("span", { class: "budget-text budget-" + budgetLevel(o.error_budget_remaining), text: pct(o.error_budget_remaining) })),
      el("td", { class: "num col-burn", "data-label": "Burn" }, burnText(o), firing),
    ];
  }

  function objectiveText(name, o) {
    const under = name === "latency" && o.threshold_ms ? " under " + num(o.threshold_ms, 0) + " ms" : "";
    return name + " " + pct(o.objective, 2) + under + " over " + duration(o.window_s);
  }

  function duration(s) {
    if (s % 86400 === 0) return s / 86400 + "d";
    if (s % 3600 === 0) return s / 3600 + "h";
    if (s % 60 === 0) return s / 60 + "m";
    return s + "s";
  }

  async function loadSlos() {
    try {
      state.slos = await getJSON("/slos");
      $("slo-error").hidden = true;
    } catch (e) {
      $("slo-error").textContent = "Could not load the error budgets: " + e.message;
      $("slo-error").hidden = false;
    }
    renderSlos();
  }

  function renderSlos() {
    const rows = [];
    for (const row of state.slos) {
      const names = Object.keys(row.objectives);
      names.forEach((name, i) => {
        const tr = el("tr", { class: "slo-row", "data-service": row.namespace + "/" + row.service }, ...sloCells(row, name, row.objectives[name], true));
        if (i === 0) tr.append(el("td", { "data-label": "Release policy", rowspan: String(names.length) }, tierNode(row)));
        if (i > 0) tr.firstChild.replaceChildren(); // the service is named once
        rows.push(tr);
      });
    }
    put($("slo-rows"), ...rows);
    $("slo-section").hidden = rows.length === 0 && $("slo-error").hidden;
  }

  function budgetNode(row) {
    if (!row) return null;
    const names = Object.keys(row.objectives);
    const table = el(
      "table",
      { class: "checks slo-detail" },
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Objective" }), el("th", { scope: "col", class: "num", text: "Achieved" }), el("th", { scope: "col", class: "num", text: "Budget left" }), el("th", { scope: "col", class: "num", text: "Burn 5m · 1h · 6h · 1d" }))),
      el("tbody", {}, ...names.map((name) => el("tr", {}, ...sloCells(row, name, row.objectives[name], false))))
    );
    const policy = el("p", { class: "policy" }, tierNode(row), el("span", { class: "muted policy-reason", text: " " + row.reason }));
    return section("Error budget · " + row.service, policy, table, el("p", { class: "muted small", text: "read " + ago(row.at) + " ago" }));
  }

  // -- events -----------------------------------------------------------------------------

  function connect() {
    if (state.es) state.es.close();
    setConn("connecting", "connecting");
    const es = new EventSource(API + "/events");
    state.es = es;
    let opened = false;
    es.onopen = () => {
      setConn("live", "live");
      if (opened) loadList(); // catch up after a reconnect (the stream also replays)
      opened = true;
    };
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) {
        setConn("down", "disconnected, retrying");
        setTimeout(() => {
          if (state.es === es) connect();
        }, 3000);
      } else {
        setConn("connecting", "reconnecting");
      }
    };
    for (const type of ["added", "deleted", "phase", "weight", "verdict", "reset"]) {
      es.addEventListener(type, (msg) => onEvent(type, msg));
    }
  }

  function onEvent(type, msg) {
    let ev;
    try {
      ev = JSON.parse(msg.data);
    } catch (e) {
      return;
    }
    if (type === "reset" || type === "added" || type === "deleted") {
      if (type === "deleted") state.rows.delete(ev.namespace + "/" + ev.name);
      loadList();
    } else if (ev.canary) {
      updateRow(ev.canary);
    }
    if (state.detailKey && (type === "reset" || ev.namespace + "/" + ev.name === state.detailKey)) {
      if (ev.canary && state.detail) {
        state.detail.summary = ev.canary;
        renderSummary();
      }
      scheduleDetail(150);
    }
  }

  // -- routing ----------------------------------------------------------------------------

  function openDetail(key) {
    const [ns, name] = key.split("/");
    location.hash = "#/" + encodeURIComponent(ns) + "/" + encodeURIComponent(name);
  }

  function route() {
    const m = /^#\/([^/]+)\/([^/]+)\/?$/.exec(location.hash);
    if (m) {
      const key = decodeURIComponent(m[1]) + "/" + decodeURIComponent(m[2]);
      const changed = key !== state.detailKey;
      state.detailKey = key;
      $("list-view").hidden = true;
      $("detail-view").hidden = false;
      if (changed) {
        state.detail = null;
        state.series = null;
        state.flash = null;
        state.focusHeading = true;
        window.scrollTo(0, 0);
        put($("detail"), el("p", { class: "muted", text: "Loading " + key + "…" }));
        document.title = key + " · canaryd";
      }
      loadDetail();
      clearInterval(state.detailTimer);
      state.detailTimer = setInterval(loadDetail, 3000);
    } else {
      const prev = state.detailKey;
      state.detailKey = null;
      state.detail = null;
      clearInterval(state.detailTimer);
      $("detail-view").hidden = true;
      $("list-view").hidden = false;
      document.title = "canaryd";
      if (prev) {
        const tr = $("canary-rows").querySelector('tr[data-key="' + CSS.escape(prev) + '"]');
        if (tr) tr.focus();
      }
    }
  }

  // -- detail -----------------------------------------------------------------------------

  function scheduleDetail(delay) {
    clearTimeout(state.detailPending);
    state.detailPending = setTimeout(loadDetail, delay);
  }

  let loading = false;
  async function loadDetail() {
    const key = state.detailKey;
    if (!key || loading) return;
    loading = true;
    const [ns, name] = key.split("/");
    const base = "/canaries/" + encodeURIComponent(ns) + "/" + encodeURIComponent(name);
    try {
      const [detail, series, slos] = await Promise.all([
        getJSON(base),
        getJSON(base + "/series"),
        getJSON("/slos?namespace=" + encodeURIComponent(ns)).catch(() => null),
      ]);
      if (state.detailKey !== key) return;
      state.detail = detail;
      state.series = series;
      const service = detail.spec && detail.spec.service;
      state.detailSlo = (slos || []).find((r) => r.service === service) || null;
      updateRow(detail.summary);
      renderDetail();
    } catch (e) {
      if (state.detailKey !== key) return;
      if (!state.detail) {
        put($("detail"), el("p", { class: "error", role: "alert", text: "Could not load " + key + ": " + e.message }));
      }
    } finally {
      loading = false;
    }
  }

  function section(title, ...children) {
    return el("section", { class: "card" }, el("h2", { text: title }), ...children);
  }

  function renderSummary() {
    const box = $("summary-box");
    if (!box || !state.detail) return;
    const c = state.detail.summary;
    const spec = state.detail.spec || {};
    const phase = el("span", { class: phaseClass(c.phase) + " big", text: PHASE_WORDS[c.phase] || c.phase });
    // an A/B test or a blue/green says so, and what the current step sends the canary
    // (a cohort, or mirrored copies: the weight alone would mislead)
    const strategy = STRATEGY_WORDS[spec.strategy] || null;
    const nowSends = ACTIVE.has(c.phase) && spec.stepTraffic ? spec.stepTraffic[c.stepIndex] || null : null;
    const facts = el(
      "dl",
      { class: "facts" },
      strategy ? el("dt", { text: "Strategy" }) : null,
      strategy ? el("dd", { text: strategy }) : null,
      el("dt", { text: "Weight" }),
      el("dd", {}, weightBar(c.canaryWeight, c.phase), el("span", { class: "weight-text num", text: c.canaryWeight + "%" })),
      el("dt", { text: "Step" }),
      el("dd", { class: "num", text: stepText(c) + (c.steps && c.steps.length ? "  (" + c.steps.join(" → ") + "%)" : "") }),
      nowSends ? el("dt", { text: "This step" }) : null,
      nowSends ? el("dd", { text: nowSends }) : null,
      el("dt", { text: "Revision" }),
      el("dd", { text: c.revision || "–" }),
      el("dt", { text: "In phase for" }),
      el("dd", { class: "num", text: ago(c.phaseSince), title: fullTime(c.phaseSince) }),
      el("dt", { text: "Created" }),
      el("dd", { class: "num", text: ago(c.createdAt) + " ago", title: fullTime(c.createdAt) })
    );
    const msg = c.message ? el("p", { class: "message", text: c.message }) : null;
    const notReady = c.ready ? null : el("p", { class: "error", text: "Not ready: " + (c.readyMessage || "canaryd cannot act on this Canary") });
    put(box, el("div", { class: "summary-head" }, phase, c.phase === "WaitingApproval" && c.waitingApprovalFor !== null ? el("span", { class: "sub", text: "step " + c.waitingApprovalFor + "% waits for approval" }) : null), facts, msg, notReady);
    renderActions();
  }

  function renderActions() {
    const box = $("actions-box");
    if (!box || !state.detail) return;
    const c = state.detail.summary;
    const t = token();
    const can = {
      approve: c.phase === "WaitingApproval",
      abort: ACTIVE.has(c.phase),
      skip: c.phase === "Progressing" || c.phase === "Holding",
    };
    const why = {
      approve: "only when a step waits for approval",
      abort: "only while a rollout is under way",
      skip: "only while progressing or holding",
    };
    const prev = $("reason-input");
    const reasonValue = prev ? prev.value : "";
    const hadFocus = document.activeElement && box.contains(document.activeElement) ? document.activeElement.id : null;
    const reason = el("input", { id: "reason-input", type: "text", placeholder: "reason (optional)", maxlength: "500", "aria-label": "Reason for the command" });
    reason.value = reasonValue;
    const buttons = ["approve", "abort", "skip"].map((kind) => {
      const label = kind === "approve" && c.waitingApprovalFor !== null ? "Approve " + c.waitingApprovalFor + "%" : kind[0].toUpperCase() + kind.slice(1);
      const b = el("button", { id: "btn-" + kind, type: "button", class: "btn btn-" + kind, "data-kind": kind, text: label });
      b.disabled = !t || !can[kind];
      b.title = !t ? "enter an operator token in the header first" : can[kind] ? "" : why[kind];
      b.addEventListener("click", () => sendCommand(kind, b));
      return b;
    });
    const hint = !t ? el("p", { class: "hint", text: "Read-only: enter an operator token in the header to approve, abort or skip." }) : null;
    const flash = state.flash ? el("p", { class: "flash flash-" + state.flash.kind, role: state.flash.kind === "error" ? "alert" : "status", text: state.flash.text }) : null;
    put(box, el("div", { class: "actions" }, ...buttons, reason), hint, flash);
    if (hadFocus && $(hadFocus) && !$(hadFocus).disabled) $(hadFocus).focus();
  }

  async function sendCommand(kind, button) {
    const c = state.detail && state.detail.summary;
    if (!c) return;
    if (kind === "abort" && !confirm("Abort the rollout of " + keyOf(c) + "? Traffic goes back to stable.")) return;
    button.disabled = true;
    const reason = ($("reason-input") && $("reason-input").value.trim()) || "";
    const body = reason ? { reason: reason } : {};
    try {
      const resp = await fetch(API + "/canaries/" + encodeURIComponent(c.namespace) + "/" + encodeURIComponent(c.name) + "/" + kind, {
        method: "POST",
        headers: { Authorization: "Bearer " + token(), "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      if (resp.status === 202) {
        const ok = await resp.json();
        state.flash = { kind: "ok", text: kind[0].toUpperCase() + kind.slice(1) + " accepted (command " + ok.id + " by " + ok.by + ")." };
        if ($("reason-input")) $("reason-input").value = "";
      } else {
        state.flash = { kind: "error", text: kind[0].toUpperCase() + kind.slice(1) + " refused: " + (await errorMessage(resp)) };
      }
    } catch (e) {
      state.flash = { kind: "error", text: kind + " failed: " + e.message };
    }
    renderActions();
    scheduleDetail(300);
  }

  function renderDetail() {
    const d = state.detail;
    if (!d) return;
    const c = d.summary;
    const root = $("detail");
    const scrollY = window.scrollY;
    // keep what the person was doing across the re-render: focus, the reason being typed
    const active = document.activeElement;
    const focusId = active && root.contains(active) ? active.id : null;
    const oldReason = $("reason-input");
    const reasonState = oldReason ? [oldReason.value, oldReason.selectionStart, oldReason.selectionEnd] : null;
    const header = el(
      "div",
      { class: "detail-head" },
      el("h1", { id: "detail-title", tabindex: "-1" }, el("span", { class: "ns", text: c.namespace + "/" }), c.name),
      d.spec ? el("span", { class: "muted", text: "service " + (d.spec.service || "–") + " · every " + num(d.spec.intervalS) + "s · " + stepDurations(d.spec) + " · " + d.spec.promotionMode }) : null
    );
    const top = el("div", { class: "grid2" }, section("Status", el("div", { id: "summary-box" })), section("Commands", el("div", { id: "actions-box" })));
    const charts = section("Current rollout" + (d.summary.revision ? " · " + d.summary.revision : ""), el("div", { id: "charts", class: "charts" }));
    put(root, 
      header,
      d.specError ? el("p", { class: "error", role: "alert", text: "Spec error: " + d.specError }) : null,
      top,
      charts,
      budgetNode(state.detailSlo),
      section("Last verdict", verdictNode(d.lastVerdict)),
      el("div", { class: "grid2" }, section("Step history", historyNode(d.history)), section("Approvals", approvalsNode(d.approvals, d.spec))),
      section("Recent events", eventsNode(d.events))
    );
    renderSummary();
    renderCharts();
    const reasonInput = $("reason-input");
    if (reasonState && reasonInput) reasonInput.value = reasonState[0];
    if (focusId && $(focusId)) {
      $(focusId).focus({ preventScroll: true });
      if (focusId === "reason-input" && reasonState) reasonInput.setSelectionRange(reasonState[1], reasonState[2]);
    } else if (state.focusHeading) {
      const h = $("detail-title");
      if (h) h.focus({ preventScroll: true });
    }
    state.focusHeading = false;
    window.scrollTo(0, scrollY);
  }

  function verdictNode(v) {
    if (!v) return el("p", { class: "muted", text: "No verdict yet." });
    const head = el("p", {}, el("span", { class: "decision dec-" + v.decision, text: DECISION_WORDS[v.decision] || v.decision }), el("span", { class: "muted", text: " at " + clock(v.at) + " (" + ago(v.at) + " ago)" }));
    const checks = v.checks || [];
    let table = null;
    if (checks.length) {
      table = el(
        "table",
        { class: "checks" },
        el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Check" }), el("th", { scope: "col", text: "Status" }), el("th", { scope: "col", class: "num", text: "e-value / threshold" }), el("th", { scope: "col", text: "Reason" }))),
        el(
          "tbody",
          {},
          ...checks.map((ch) => {
            const over = ch.eValue !== null && ch.threshold !== null && ch.eValue >= ch.threshold;
            return el(
              "tr",
              {},
              el("td", { class: "mono", "data-label": "Check", text: ch.name }),
              el("td", { "data-label": "Status" }, el("span", { class: "status st-" + ch.status, text: ch.status })),
              el("td", { class: "num", "data-label": "e-value / threshold" }, el("span", { class: over ? "evalue over" : "evalue", text: num(ch.eValue) }), el("span", { class: "muted", text: (over ? " ≥ " : " < ") + num(ch.threshold) })),
              el("td", { class: "reason-cell", "data-label": "Reason", text: ch.reason })
            );
          })
        )
      );
    }
    const reasons = !checks.length && v.reasons && v.reasons.length ? el("ul", { class: "reasons" }, ...v.reasons.map((r) => el("li", { text: r }))) : null;
    return el("div", {}, head, table, reasons);
  }

  function historyNode(history) {
    if (!history || !history.length) return el("p", { class: "muted", text: "No steps yet." });
    return el(
      "table",
      { class: "history" },
      el("thead", {}, el("tr", {}, el("th", { scope: "col", class: "num", text: "#" }), el("th", { scope: "col", class: "num", text: "Weight" }), el("th", { scope: "col", text: "Started" }), el("th", { scope: "col", text: "Ended" }), el("th", { scope: "col", text: "Verdict" }))),
      el(
        "tbody",
        {},
        ...history.map((h) =>
          el(
            "tr",
            { title: (h.reasons || []).join("\n") },
            el("td", { class: "num", text: String(h.index + 1) }),
            el("td", { class: "num", text: h.weight + "%" }),
            el("td", { class: "num", text: clock(h.startedAt) }),
            el("td", { class: "num", text: h.endedAt ? clock(h.endedAt) : "running" }),
            el("td", {}, h.verdict ? el("span", { class: "decision dec-" + h.verdict, text: DECISION_WORDS[h.verdict] || h.verdict }) : el("span", { class: "muted", text: "–" }))
          )
        )
      )
    );
  }

  function approvalsNode(approvals, spec) {
    const gates = spec && spec.approvalsBefore && spec.approvalsBefore.length ? el("p", { class: "muted", text: "Needs approval before " + spec.approvalsBefore.map((w) => w + "%").join(", ") + "." }) : el("p", { class: "muted", text: "No approval gates." });
    if (!approvals || !approvals.length) return el("div", {}, gates, el("p", { class: "muted", text: "No approvals in this rollout." }));
    return el("div", {}, gates, el("ul", { class: "plain" }, ...approvals.map((a) => el("li", {}, el("strong", { text: a.weight + "%" }), " approved by " + a.by + " at " + clock(a.at)))));
  }

  function eventsNode(events) {
    if (!events || !events.length) return el("p", { class: "muted", text: "No events yet." });
    // Rollout events tell phase changes and verdicts in words: when there are any, the
    // derived phase and verdict events would only say the same thing twice.
    const told = events.some((e) => e.type === "rollout" && e.event);
    const shown = told ? events.filter((e) => e.type !== "phase" && e.type !== "verdict") : events;
    const recent = shown.slice(-15).reverse();
    const row = (e) => {
      const ev = e.type === "rollout" ? e.event : null;
      const kind = ev ? ev.reason : e.type;
      const cls = "etype et-" + e.type + (ev && ev.warning ? " et-warning" : "");
      return el("li", {}, el("time", { class: "num muted", datetime: e.at, text: clock(e.at) }), el("span", { class: cls, text: kind }), el("span", { class: "emsg", text: ev ? ev.message : e.message }));
    };
    return el("ol", { class: "events" }, ...recent.map(row));
  }

  // -- charts (hand-written SVG) ------------------------------------------------------------

  function renderCharts() {
    const box = $("charts");
    if (!box) return;
    const pts = (state.series && state.series.points) || [];
    if (!pts.length) {
      put(box, el("p", { class: "muted", text: "No intervals observed in this rollout yet." }));
      return;
    }
    const times = pts.map((p) => ms(p.at));
    const markers = pts.map((p, i) => ({ t: times[i], decision: p.decision })).filter((m, i) => m.decision && m.decision !== "continue" && (i === 0 || pts[i - 1].decision !== m.decision));
    put(box);
    [
      {
        title: "Canary weight",
        unit: "%",
        times,
        yMax: 100,
        digits: 0,
        step: true,
        markers,
        series: [{ name: "canary weight", cls: "s-weight", values: pts.map((p) => p.canaryWeight) }],
      },
      {
        title: "Error rate",
        unit: "%",
        times,
        markers,
        series: [
          { name: "canary", cls: "s-canary", values: pts.map((p) => p.canary.errorRatePct) },
          { name: "stable", cls: "s-stable", values: pts.map((p) => p.stable.errorRatePct) },
        ],
      },
      {
        title: "Latency p50 / p99",
        unit: " ms",
        times,
        markers,
        series: [
          { name: "canary p99", cls: "s-canary", values: pts.map((p) => p.canary.p99Ms) },
          { name: "stable p99", cls: "s-stable", values: pts.map((p) => p.stable.p99Ms) },
          { name: "canary p50", cls: "s-canary dashed", values: pts.map((p) => p.canary.p50Ms) },
          { name: "stable p50", cls: "s-stable dashed", values: pts.map((p) => p.stable.p50Ms) },
        ],
      },
    ].forEach((opt) => chart(opt, box));
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 4, 6, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function chart(opt, box) {
    const fig = el("figure", { class: "chart" });
    const legend = el("figcaption", {}, el("span", { class: "chart-title", text: opt.title }));
    for (const s of opt.series) {
      const last = [...s.values].reverse().find((v) => v !== null && v !== undefined);
      legend.append(el("span", { class: "key " + s.cls.split(" ").map((c) => "k-" + c).join(" ") }, el("span", { class: "swatch", "aria-hidden": "true" }), s.name + " " + (last === undefined ? "–" : num(last, opt.digits) + opt.unit)));
    }
    const decisions = [...new Set(opt.markers.map((m) => m.decision))];
    for (const d of decisions) legend.append(el("span", { class: "key mk-" + d }, el("span", { class: "mk-swatch", "aria-hidden": "true" }), DECISION_WORDS[d] || d));
    fig.append(legend);
    box.append(fig);

    const W = Math.max(240, Math.floor(fig.clientWidth || 600));
    const H = 160;
    const pad = { l: 44, r: 10, t: 10, b: 22 };
    const all = opt.series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined && isFinite(v));
    const yMax = opt.yMax || niceMax(Math.max(...all, 0) * 1.1);
    const t0 = opt.times[0];
    let t1 = opt.times[opt.times.length - 1];
    if (t1 <= t0) t1 = t0 + 1000;
    const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * (W - pad.l - pad.r);
    const y = (v) => pad.t + (1 - v / yMax) * (H - pad.t - pad.b);
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, class: "plot", role: "img", "aria-label": opt.title + " over the current rollout" });
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      root.append(svg("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: "grid" }));
      root.append(svg("text", { x: pad.l - 6, y: y(v) + 4, class: "tick", "text-anchor": "end", text: String(+v.toFixed(2)) + (opt.unit === "%" ? "%" : "") }));
    }
    root.append(svg("text", { x: pad.l, y: H - 6, class: "tick", "text-anchor": "start", text: clock(new Date(t0).toISOString()) }));
    root.append(svg("text", { x: W - pad.r, y: H - 6, class: "tick", "text-anchor": "end", text: clock(new Date(t1).toISOString()) }));
    for (const m of opt.markers) {
      const mx = x(m.t);
      root.append(svg("line", { x1: mx, x2: mx, y1: pad.t, y2: H - pad.b, class: "marker mk-" + m.decision }));
      const dot = svg("circle", { cx: mx, cy: pad.t + 3, r: 4, class: "marker-dot mk-" + m.decision });
      dot.append(svg("title", { text: (DECISION_WORDS[m.decision] || m.decision) + " at " + clock(new Date(m.t).toISOString()) }));
      root.append(dot);
    }
    for (const s of opt.series) {
      let d = "";
      let pen = false;
      let prevY = null;
      let singles = [];
      s.values.forEach((v, i) => {
        if (v === null || v === undefined || !isFinite(v)) {
          pen = false;
          return;
        }
        const px = x(opt.times[i]).toFixed(1);
        const py = y(Math.min(v, yMax)).toFixed(1);
        if (!pen) {
          d += "M" + px + " " + py;
          singles.push([px, py]);
        } else if (opt.step) {
          d += "H" + px + "V" + py;
          singles = singles.slice(0, -1);
        } else {
          d += "L" + px + " " + py;
          singles = singles.slice(0, -1);
        }
        pen = true;
        prevY = py;
      });
      void prevY;
      if (d) root.append(svg("path", { d, class: "line " + s.cls }));
      if (opt.times.length <= 1 || singles.length) for (const [px, py] of singles) root.append(svg("circle", { cx: px, cy: py, r: 3.5, class: "pt " + s.cls }));
    }
    fig.append(root);
  }

  // -- start ------------------------------------------------------------------------------

  function tick() {
    // keep the ages fresh without a refetch
    for (const tr of $("canary-rows").children) {
      const c = state.rows.get(tr.getAttribute("data-key"));
      if (c) {
        tr._cells.age.textContent = ago(c.createdAt);
        const when = tr._cells.decision.querySelector(".when");
        if (when && c.lastDecisionAt) when.textContent = " " + ago(c.lastDecisionAt) + " ago";
      }
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupToken();
    window.addEventListener("hashchange", route);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(renderCharts, 150);
    });
    loadList();
    connect();
    route();
    setInterval(tick, 1000);
    setInterval(() => {
      if (!state.detailKey) loadList(); // a slow safety net; the stream does the real work
    }, 30000);
  });
})();
