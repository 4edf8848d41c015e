// Trex Serve dashboard: talks to /v1/dashboard/* with the signed-in token. Plain DOM, no innerHTML
// with data (text only), charts drawn as inline SVG.
"use strict";

(function () {
  const API = "/v1/dashboard";
  const SVG = "http://www.w3.org/2000/svg";
  const store = window.sessionStorage;
  const $ = (id) => document.getElementById(id);
  let session = null;          // {token, accountId}
  let logCursors = [null];     // stack of "before" cursors; last = current page
  let nextBefore = null;

  // ---------------------------------------------------------------- helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
  const fmtNum = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString());
  const fmtCredits = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString(undefined, {maximumFractionDigits: 6}));

  function say(text) { $("status").textContent = text; }
  function fail(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = !text;
  }

  async function api(path, options) {
    const opts = Object.assign({method: "GET", headers: {}}, options || {});
    opts.headers = Object.assign({Authorization: "Bearer " + session.token}, opts.headers);
    if (opts.json !== undefined) {
      opts.body = JSON.stringify(opts.json);
      opts.headers["Content-Type"] = "application/json";
      delete opts.json;
    }
    let url = API + path;
    if (session.accountId) url += (url.includes("?") ? "&" : "?") + "account_id=" + encodeURIComponent(session.accountId);
    const resp = await fetch(url, opts);
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      const message = (data.error && data.error.message) || ("HTTP " + resp.status);
      if (resp.status === 401) signOut("Signed out: " + message);
      throw new Error(message);
    }
    return data;
  }

  function fillTable(id, rows, render, emptyText) {
    const body = $(id).tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      const cols = $(id).tHead.rows[0].cells.length;
      body.append(el("tr", {}, el("td", {colspan: String(cols), class: "empty"}, emptyText)));
      return;
    }
    for (const row of rows) body.append(el("tr", {}, ...render(row).map((c) => el("td", {}, c))));
  }

  function badge(text) { return el("span", {class: "badge b-" + String(text).replace(/[^a-z0-9_]/gi, "")}, String(text)); }

  async function guarded(fn, done) {
    fail("");
    try {
      await fn();
      if (done) say(done);
    } catch (err) {
      fail(err.message);
    }
  }

  // ---------------------------------------------------------------- session

  function signOut(message) {
    session = null;
    store.removeItem("trex.session");
    $("app").hidden = true;
    $("signin").hidden = false;
    $("signout").hidden = true;
    $("who").hidden = true;
    if (message) fail(message);
    $("token").focus();
  }

  async function signIn(token, accountId) {
    session = {token: token, accountId: accountId || ""};
    const view = await api("/account");
    store.setItem("trex.session", JSON.stringify(session));
    $("signin").hidden = true;
    $("app").hidden = false;
    $("signout").hidden = false;
    $("who").hidden = false;
    $("who").textContent = (view.viewer === "operator" ? "Operator view of " : "Signed in as ") +
      view.account.name + " (" + view.account.id + ")";
    renderAccount(view);
    await refreshAll();
    say("Signed in.");
  }

  async function refreshAll() {
    await Promise.all([loadUsage(), loadKeys(), loadBindings(), loadLogs(true), loadRisk(), loadAudit(), loadTraffic()]);
  }

  // ---------------------------------------------------------------- overview

  function facts(id, pairs) {
    const dl = $(id);
    dl.replaceChildren();
    for (const [k, v] of pairs) dl.append(el("div", {}, el("dt", {}, k), el("dd", {}, v)));
  }

  function renderAccount(view) {
    const a = view.account, p = view.plan || {};
    facts("account-facts", [
      ["Account", a.name],
      ["Account state", badge(a.state)],
      ["Plan", p.name || a.plan],
      ["Subscription", badge(view.subscription.state)],
      ["Rate limits", fmtNum(p.rpm) + " req/min · " + fmtNum(p.tpm) + " tokens/min"],
      ["Concurrency", fmtNum(p.concurrency) + (p.burst_concurrency ? " (burst " + fmtNum(p.burst_concurrency) + ")" : "")],
    ]);
    const select = $("binding-provider");
    select.replaceChildren(...view.providers.map((name) => el("option", {value: name}, name)));
  }

  function gauge(id, label, used, limit, unit, lowIsBad) {
    const box = $(id);
    box.replaceChildren();
    const known = limit !== null && limit !== undefined && limit > 0;
    const frac = known ? Math.max(0, Math.min(1, used / limit)) : 0;
    const text = known ? fmtNum(used) + " of " + fmtNum(limit) + " " + unit + " (" + Math.round(frac * 100) + "%)"
      : fmtNum(used) + " " + unit;
    const bar = svg("svg", {viewBox: "0 0 200 14", preserveAspectRatio: "none", class: "gauge-bar", role: "img",
      "aria-label": label + ": " + text});
    const risk = lowIsBad ? 1 - frac : frac;
    bar.append(svg("rect", {x: 0, y: 0, width: 200, height: 14, rx: 7, class: "g-track"}));
    bar.append(svg("rect", {x: 0, y: 0, width: (200 * frac).toFixed(1), height: 14, rx: 7,
      class: risk >= 0.9 ? "g-fill g-high" : risk >= 0.7 ? "g-fill g-mid" : "g-fill"}));
    box.append(el("h3", {}, label), bar, el("p", {class: "gauge-text"}, text));
  }

  async function loadUsage() {
    const u = await api("/usage");
    const q = u.quota || {};
    gauge("gauge-requests", "Daily requests used", q.requests_used || 0, q.requests_limit, "requests");
    gauge("gauge-tokens", "Daily tokens used", q.tokens_used || 0, q.tokens_limit, "tokens");
    const c = u.credits || {};
    // The API's balance already counts every answered request (the live balance when Redis has it).
    const balance = c.balance;
    gauge("gauge-credits", "Compute Credits left", balance || 0, c.granted + c.refunded + c.adjusted || 0, "credits", true);
    $("quota-reset").textContent = q.resets_in_s !== undefined
      ? "Daily quota resets in " + Math.floor(q.resets_in_s / 3600) + " h " + Math.floor((q.resets_in_s % 3600) / 60) + " min (UTC midnight)."
      : (q.error || "");
    facts("ledger-totals", [
      ["Credit balance", fmtCredits(balance)],
      ["Granted", fmtCredits(c.granted)],
      ["Charged", fmtCredits(c.charged)],
      ["Refunded", fmtCredits(c.refunded)],
      ["Held by requests in flight", fmtCredits(c.reserved || 0)],
    ]);
    // Today's tokens by class (all billing modes together): what the traffic was made of.
    const classes = {input: 0, cache_read: 0, cache_write: 0, cache_write_1h: 0, output: 0, reasoning: 0};
    for (const row of Object.values(u.tokens_today || {})) {
      for (const name of Object.keys(classes)) classes[name] += row[name] || 0;
    }
    facts("token-classes", [
      ["Input (uncached)", fmtNum(classes.input)],
      ["Cache reads", fmtNum(classes.cache_read)],
      ["Cache writes (5 min / 1 h)", fmtNum(classes.cache_write) + " / " + fmtNum(classes.cache_write_1h)],
      ["Output (of which reasoning)", fmtNum(classes.output) + " (" + fmtNum(classes.reasoning) + ")"],
    ]);
  }

  // ---------------------------------------------------------------- traffic charts

  function chart(id, buckets, series, kind) {
    const node = $(id);
    const desc = node.querySelector("desc");
    node.replaceChildren(desc);
    const W = 600, H = 170, L = 44, R = 8, T = 10, B = 26;
    const n = buckets.length;
    let max = 0;
    for (const s of series) for (const b of buckets) max = Math.max(max, b[s.key] || 0);
    const top = max > 0 ? niceCeil(max) : 1;
    const x = (i) => L + (W - L - R) * (n <= 1 ? 0 : i / (n - 1));
    const y = (v) => T + (H - T - B) * (1 - v / top);
    for (const frac of [0, 0.5, 1]) {
      const v = top * frac;
      node.append(svg("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}));
      node.append(svg("text", {x: L - 6, y: y(v) + 4, class: "axis", "text-anchor": "end"}, fmtAxis(v)));
    }
    node.append(svg("text", {x: L, y: H - 6, class: "axis"}, "−" + n + " min"));
    node.append(svg("text", {x: W - R, y: H - 6, class: "axis", "text-anchor": "end"}, "now"));
    if (kind === "bars") {
      const s = series[0];
      const w = Math.max(1, (W - L - R) / n - 2);
      buckets.forEach((b, i) => {
        const v = b[s.key] || 0;
        if (!v) return;
        const bx = L + (W - L - R) * (i / n) + 1;
        const rect = svg("rect", {x: bx.toFixed(1), y: y(v).toFixed(1), width: w.toFixed(1),
          height: (y(0) - y(v)).toFixed(1), class: s.cls});
        rect.append(svg("title", {}, new Date(b.t).toLocaleTimeString() + ": " + v));
        node.append(rect);
      });
    } else {
      for (const s of series) {
        let d = "", pen = false;
        buckets.forEach((b, i) => {
          const v = b[s.key];
          if (v === null || v === undefined) { pen = false; return; }
          d += (pen ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1) + " ";
          pen = true;
          const dot = svg("circle", {cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5, class: s.cls + " dot"});
          dot.append(svg("title", {}, new Date(b.t).toLocaleTimeString() + " " + s.name + ": " + v + " ms"));
          node.append(dot);
        });
        if (d) node.append(svg("path", {d: d.trim(), class: s.cls + " line"}));
      }
    }
    const total = series.map((s) => s.name + " " + summary(buckets, s.key, kind)).join("; ");
    desc.textContent = total;
  }

  function summary(buckets, key, kind) {
    const vals = buckets.map((b) => b[key]).filter((v) => v !== null && v !== undefined);
    if (kind === "bars") return "total " + vals.reduce((a, b) => a + b, 0) + ", peak " + Math.max(0, ...vals) + " per minute";
    return vals.length ? "max " + Math.max(...vals) + " ms" : "no data";
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function fmtAxis(v) { return v >= 1000 ? (v / 1000).toFixed(v % 1000 ? 1 : 0) + "k" : String(Math.round(v * 10) / 10); }

  async function loadTraffic() {
    const t = await api("/traffic?minutes=60");
    const b = t.buckets;
    chart("chart-requests", b, [{key: "requests", name: "Requests", cls: "s-req"}], "bars");
    chart("chart-errors", b, [{key: "errors", name: "Errors", cls: "s-err"}], "bars");
    chart("chart-fallbacks", b, [{key: "fallbacks", name: "Fallbacks", cls: "s-fb"}], "bars");
    chart("chart-latency", b, [{key: "p50_ms", name: "p50", cls: "s-p50"}, {key: "p95_ms", name: "p95", cls: "s-p95"}], "lines");
    $("traffic-totals").textContent = "Last " + t.minutes + " minutes: " + fmtNum(t.totals.requests) + " requests, " +
      fmtNum(t.totals.errors) + " errors, " + fmtNum(t.totals.fallbacks) + " fallbacks.";
  }

  // ---------------------------------------------------------------- keys

  async function loadKeys() {
    const keys = (await api("/keys")).data;
    fillTable("keys-table", keys, (k) => {
      const actions = el("span", {class: "actions"});
      const label = k.name || k.prefix;
      if (k.state === "active" || k.state === "inactive") {
        const next = k.state === "active" ? "inactive" : "active";
        actions.append(el("button", {type: "button", class: "secondary", "aria-label": (next === "active" ? "Activate " : "Deactivate ") + label,
          onclick: () => guarded(async () => { await api("/keys/" + encodeURIComponent(k.id), {method: "PATCH", json: {state: next}}); await loadKeys(); await loadAudit(); },
            "Key " + label + (next === "active" ? " activated." : " deactivated."))}, next === "active" ? "Activate" : "Deactivate"));
      }
      if (k.state !== "revoked") {
        actions.append(el("button", {type: "button", class: "danger", "aria-label": "Revoke " + label,
          onclick: () => {
            if (!window.confirm("Revoke key " + label + "? This cannot be undone.")) return;
            guarded(async () => { await api("/keys/" + encodeURIComponent(k.id), {method: "DELETE"}); await loadKeys(); await loadAudit(); }, "Key " + label + " revoked.");
          }}, "Revoke"));
      }
      return [k.name || "—", el("code", {}, k.prefix + "…"), badge(k.state), fmtTime(k.created_at), actions];
    }, "No keys yet: create one above.");
    const filter = $("f-key"), current = filter.value;
    filter.replaceChildren(el("option", {value: ""}, "Any key"),
      ...keys.map((k) => el("option", {value: k.id}, (k.name ? k.name + " · " : "") + k.prefix + "…")));
    filter.value = current;
  }

  async function createKey(event) {
    event.preventDefault();
    await guarded(async () => {
      const name = $("key-name").value.trim();
      const key = await api("/keys", {method: "POST", json: name ? {name: name} : {}});
      $("new-key-value").textContent = key.key;
      $("new-key").hidden = false;
      $("new-key").focus();
      $("key-name").value = "";
      await loadKeys();
      await loadAudit();
    }, "Key created. Copy it now: it is shown only once.");
  }

  // ---------------------------------------------------------------- bindings

  async function loadBindings() {
    const rows = (await api("/bindings")).data;
    fillTable("bindings-table", rows, (b) => [
      b.provider, el("code", {}, b.api_key), b.key_ids ? b.key_ids.length + " key(s)" : "All keys", fmtTime(b.updated_at),
      el("button", {type: "button", class: "danger", "aria-label": "Remove the " + b.provider + " binding",
        onclick: () => guarded(async () => {
          await api("/bindings/" + encodeURIComponent(b.provider), {method: "DELETE"});
          await loadBindings(); await loadAudit();
        }, "Binding for " + b.provider + " removed.")}, "Remove"),
    ], "No provider bindings.");
  }

  async function saveBinding(event) {
    event.preventDefault();
    await guarded(async () => {
      const provider = $("binding-provider").value;
      await api("/bindings/" + encodeURIComponent(provider), {method: "PUT", json: {api_key: $("binding-key").value}});
      $("binding-key").value = "";
      await loadBindings();
      await loadAudit();
    }, "Binding saved.");
  }

  // ---------------------------------------------------------------- logs

  // Totals in/out, and the classes within them when there are any (what each is billed at differs).
  function tokenCell(r) {
    const t = r.tokens || {};
    const parts = [];
    if (t.cache_read) parts.push(fmtNum(t.cache_read) + " cache read");
    if (t.cache_write) parts.push(fmtNum(t.cache_write) + " cache write");
    if (t.cache_write_1h) parts.push(fmtNum(t.cache_write_1h) + " cache write 1h");
    if (t.reasoning) parts.push(fmtNum(t.reasoning) + " reasoning");
    const total = fmtNum(r.tokens_in) + " / " + fmtNum(r.tokens_out);
    return parts.length ? el("span", {title: parts.join(", ")}, total, el("br"), el("small", {}, parts.join(" · ")))
      : total;
  }

  async function loadLogs(reset) {
    if (reset) logCursors = [null];
    const params = new URLSearchParams({limit: "25"});
    for (const name of ["status", "model", "key_id"]) {
      const v = $("logs-form").elements[name].value.trim();
      if (v) params.set(name, v);
    }
    const before = logCursors[logCursors.length - 1];
    if (before) params.set("before", before);
    const page = await api("/logs?" + params.toString());
    nextBefore = page.next_before;
    fillTable("logs-table", page.data, (r) => [
      fmtTime(r.created_at), el("code", {}, r.request_id), r.key_prefix ? el("code", {}, r.key_prefix + "…") : "—",
      r.model_requested || "—",
      r.cache === "hit" ? el("em", {}, "response cache") : r.provider ? r.provider + " / " + (r.model_served || "") : "—",
      String(r.attempts),
      badge(r.status), Math.round(r.latency_ms) + " ms", r.ttfb_ms === null ? "—" : Math.round(r.ttfb_ms) + " ms",
      tokenCell(r),
      r.billing ? r.billing + (r.credits_charged ? " · " + fmtCredits(r.credits_charged) + " cr" : "") : "—",
      r.error_code || "",
    ], "No requests match.");
    $("logs-newer").disabled = logCursors.length <= 1;
    $("logs-older").disabled = !nextBefore;
    $("logs-page").textContent = "Page " + logCursors.length;
  }

  // ---------------------------------------------------------------- risk and audit

  const brief = (v) => (v === null || v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));

  function change(before, after) {
    if (!before) return after ? "created" : "";
    if (!after) return "removed";
    const diffs = [];
    for (const k of Object.keys(after)) {
      if (["updated_at", "created_at"].includes(k)) continue;
      if (JSON.stringify(before[k]) !== JSON.stringify(after[k])) diffs.push(k + ": " + brief(before[k]) + " → " + brief(after[k]));
    }
    return diffs.join("; ") || "no change";
  }

  async function loadRisk() {
    const rows = (await api("/risk-events?limit=50")).data;
    fillTable("risk-table", rows, (e) => [fmtTime(e.created_at), badge(e.kind), e.key_id || "—", brief(e.detail)],
      "No risk events.");
  }

  async function loadAudit() {
    const rows = (await api("/audit?limit=50")).data;
    fillTable("audit-table", rows, (a) => [fmtTime(a.created_at), a.actor, a.action,
      a.target_type + " " + (a.target_id || ""), change(a.before, a.after)], "No audit rows.");
  }

  // ---------------------------------------------------------------- wiring

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      guarded(() => signIn($("token").value.trim(), $("account-id").value.trim()));
    });
    $("signout").addEventListener("click", () => { signOut(""); say("Signed out."); });
    $("key-form").addEventListener("submit", createKey);
    $("copy-key").addEventListener("click", () => {
      navigator.clipboard.writeText($("new-key-value").textContent).then(() => say("Key copied."), () => say("Copy failed: select the key and copy it."));
    });
    $("binding-form").addEventListener("submit", saveBinding);
    $("logs-form").addEventListener("submit", (event) => { event.preventDefault(); guarded(() => loadLogs(true)); });
    $("logs-older").addEventListener("click", () => { if (nextBefore) { logCursors.push(nextBefore); guarded(() => loadLogs(false)); } });
    $("logs-newer").addEventListener("click", () => { if (logCursors.length > 1) { logCursors.pop(); guarded(() => loadLogs(false)); } });
    // The usage figures (quota, credits, tokens by class) move with the traffic: refreshed together.
    $("traffic-refresh").addEventListener("click",
      () => guarded(() => Promise.all([loadTraffic(), loadUsage()]), "Traffic and usage refreshed."));
    const saved = store.getItem("trex.session");
    if (saved) {
      const s = JSON.parse(saved);
      guarded(() => signIn(s.token, s.accountId));
    } else {
      $("token").focus();
    }
  });
})();
