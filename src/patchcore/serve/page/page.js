/* The inspection page of `patchcore serve`: upload images, see each one's verdict, picture and
 * defect regions, and try other thresholds on the session's results. Plain JS, no libraries, no
 * network beyond this server. The threshold slider only re-cuts results in this page; the model
 * on the server is never changed. */
"use strict";

(() => {
  /** files per predict request, requests in flight, and how often a busy (503) request is retried */
  const GROUP_FILES = 8;
  const IN_FLIGHT = 3;
  const BUSY_RETRIES = 120;
  const NETWORK_RETRIES = 3;
  const SVG_NS = "http://www.w3.org/2000/svg";
  /** the overlay picture's caption band (render.predict_picture), used until the picture has loaded */
  const CAPTION_PX = 24;
  /** where the API key is kept: this tab's sessionStorage only (never a URL, localStorage or a cookie) */
  const KEY_STORE = "patchcore-api-key";
  /** the reviewer's name where the server has no API keys: asked once, kept in localStorage */
  const REVIEWER_STORE = "patchcore-reviewer";
  /** decisions a history page, and how often the drift watch is asked */
  const HISTORY_PAGE = 50;
  const DRIFT_EVERY_S = 30;

  const $ = (selector, root = document) => root.querySelector(selector);
  const el = {
    modelName: $("#model-name"),
    status: $("#server-status"),
    fileInput: $("#file-input"),
    dropZone: $("#drop-zone"),
    progressRow: $("#progress-row"),
    progressBar: $("#progress-bar"),
    progressText: $("#progress-text"),
    slider: $("#threshold-slider"),
    value: $("#threshold-value"),
    reset: $("#threshold-reset"),
    modelThresholdNote: $("#model-threshold-note"),
    strip: $("#score-strip"),
    summaryThreshold: $("#summary-threshold"),
    passCount: $("#pass-count"),
    failCount: $("#fail-count"),
    errorCount: $("#error-count"),
    errorCountWrap: $("#error-count-wrap"),
    goodRate: $("#good-rate"),
    table: $("#results-table"),
    tbody: $("#results-table tbody"),
    tableEmpty: $("#table-empty"),
    failedOnly: $("#failed-only"),
    exportCsv: $("#export-csv"),
    clear: $("#clear-session"),
    cards: $("#cards"),
    cardTemplate: $("#card-template"),
    modelLoading: $("#model-loading"),
    modelFacts: $("#model-facts"),
    modelWarning: $("#model-warning"),
    modelAside: $("#model-aside"),
    modelAsideText: $("#model-aside-text"),
    modelAsideList: $("#model-aside-list"),
    modelRule: $("#model-rule"),
    modelRuleText: $("#model-rule-text"),
    keyPanel: $("#key-panel"),
    keyForm: $("#key-form"),
    keyInput: $("#key-input"),
    keyButton: $("#key-button"),
    keyError: $("#key-error"),
    inspectView: $("#inspect-view"),
    historyView: $("#history-view"),
    tabInspect: $("#tab-inspect"),
    tabHistory: $("#tab-history"),
    driftBanner: $("#drift-banner"),
    driftList: $("#drift-list"),
    driftChecked: $("#drift-checked"),
    historyFilters: $("#history-filters"),
    filterDecision: $("#filter-decision"),
    filterReviewed: $("#filter-reviewed"),
    filterStation: $("#filter-station"),
    filterPart: $("#filter-part"),
    filterSince: $("#filter-since"),
    filterUntil: $("#filter-until"),
    historyRefresh: $("#history-refresh"),
    historyError: $("#history-error"),
    historyBody: $("#history-table tbody"),
    historyEmpty: $("#history-empty"),
    historyRange: $("#history-range"),
    historyNewer: $("#history-newer"),
    historyOlder: $("#history-older"),
    decisionPanel: $("#decision-panel"),
    decisionError: $("#decision-error"),
    decisionBody: $("#decision-body"),
    decisionFrame: $("#decision-frame"),
    decisionPicture: $("#decision-picture"),
    decisionRegions: $("#decision-regions"),
    decisionNoPicture: $("#decision-no-picture"),
    decisionFile: $("#decision-file"),
    decisionBadge: $("#decision-badge"),
    decisionFacts: $("#decision-facts"),
    decisionReviews: $("#decision-reviews"),
    decisionNoReviews: $("#decision-no-reviews"),
    decisionClose: $("#decision-close"),
    reviewForm: $("#review-form"),
    reviewerAsk: $("#reviewer-ask"),
    reviewerInput: $("#reviewer-input"),
    reviewerKnown: $("#reviewer-known"),
    reviewerName: $("#reviewer-name"),
    reviewerChange: $("#reviewer-change"),
    reviewerKey: $("#reviewer-key"),
    reviewNote: $("#review-note"),
    reviewButtons: Array.from(document.querySelectorAll("#review-form button[data-verdict]")),
    reviewError: $("#review-error"),
  };

  const state = {
    name: null, // the model's name on this server
    meta: null, // GET /v2/models/NAME
    modelThreshold: null,
    goodScores: [], // the training images' leave-one-out scores, ascending
    threshold: null, // the page's cut, raw score units
    entries: [], // one per file: {order, name, file, record, error, card, row, ...}
    waiting: [], // entries not yet sent
    inFlight: 0,
    queued: 0,
    done: 0,
    nextOrder: 1,
    sortKey: "order",
    sortDescending: false,
    csvUrl: null,
    apiKey: storedKey(), // sent as "Authorization: Bearer KEY" to /v2/models/...
    keyWanted: false, // the key form is up: nothing is sent until a key is accepted
    keysRequired: false, // the server has API keys: a review is signed with the key's name
    record: true, // the server keeps a decision record (GET /v2 "record"; false with --record off)
    view: "inspect",
    watching: false, // the drift poll and the history routes are started (after the first connect)
    history: { offset: 0, total: 0, rows: [], loaded: false, seq: 0 },
    openId: null, // the decision shown in the history's detail panel
    reviewing: false,
    reviewer: "", // the reviewer's name where localStorage is off
    // the drift watch's poll: asking (an answer in flight), again (ask once more after it), off
    // (the server has none), said (what the banner says now, as JSON)
    drift: { asking: false, again: false, off: false, timer: null, said: "[]" },
  };

  // ---------------------------------------------------------------------------------------------
  // Formatting

  const f2 = (x) => Number(x).toFixed(2);
  const f3 = (x) => Number(x).toFixed(3);
  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
  const grouped = (n) => Number(n).toLocaleString("en-US");

  function decisionOf(entry) {
    if (entry.error != null) return "error";
    return entry.record.score >= state.threshold ? "fail" : "pass";
  }

  const DECISION_TEXT = { pass: "PASS", fail: "FAIL", error: "ERROR" };
  const DECISION_RANK = { pass: 0, fail: 1, error: 2 };

  /** 2026-11-30 08:28:51, in the browser's time zone */
  function localTime(date) {
    const two = (n) => String(n).padStart(2, "0");
    return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
  }

  function setStatus(kind, text) {
    el.status.className = `status-pill ${kind}`;
    el.status.textContent = text;
  }

  const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

  // ---------------------------------------------------------------------------------------------
  // The API key, when the server asks for one: kept in this tab's sessionStorage, sent as a header

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || null;
    } catch (error) {
      return null; // storage off: the key lives in this page only
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (error) {
      /* storage off: the key lives in this page only */
    }
  }

  /** fetch() on /v2/models/NAME + path, with the key when there is one; a 401 asks for a key */
  async function modelFetch(path, options) {
    const key = state.apiKey;
    const headers = { ...((options && options.headers) || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    const reply = await fetch(`/v2/models/${encodeURIComponent(state.name)}${path}`, { ...options, headers });
    if (reply.status === 401 && key === state.apiKey) {
      // (a 401 for a key replaced meanwhile is stale: the caller tries again with the new one)
      const body = await reply.clone().json().catch(() => null);
      askForKey((body && body.error) || "the server refused the key (HTTP 401)");
    }
    return reply;
  }

  function askForKey(message) {
    state.apiKey = null;
    storeKey(null);
    state.keyWanted = true;
    el.keyPanel.hidden = false;
    el.keyError.hidden = !message;
    el.keyError.textContent = message || "";
    el.keyButton.disabled = false;
    setStatus("locked", "API key needed");
    el.keyInput.focus();
    el.keyInput.select();
  }

  function keyAccepted() {
    state.keyWanted = false;
    el.keyPanel.hidden = true;
    el.keyInput.value = "";
  }

  // ---------------------------------------------------------------------------------------------
  // The model

  /** A definition list of [term, value, title?] facts, as text (values may come from the network). */
  function showFacts(list, facts) {
    list.replaceChildren();
    for (const [term, value, title] of facts) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.fact = term.toLowerCase().replace(/[^a-z]+/g, "-");
      if (title) dd.title = String(title);
      list.append(dt, dd);
    }
  }

  // The training images the fit's contamination check set aside (or, reviewed as good, only
  // listed), so that someone can clean the folder: file name, score's robust z, and why.
  function showSetAside(check) {
    el.modelAsideList.replaceChildren();
    el.modelAside.hidden = !check;
    if (!check) return;
    el.modelAsideText.textContent = check.description;
    for (const suspect of check.suspects) {
      const item = document.createElement("li");
      item.textContent = `${suspect.name}${suspect.set_aside ? "" : " (kept: reviewed as good)"}`;
      item.title = suspect.reason;
      item.dataset.setAside = String(suspect.set_aside);
      el.modelAsideList.append(item);
    }
  }

  async function connect() {
    for (;;) {
      try {
        const server = await (await fetch("/v2", { cache: "no-store" })).json();
        state.name = server.models[0];
        state.keysRequired = Boolean(server.api_key_required);
        state.record = server.record !== false; // GET /v2 says whether decisions are kept (--record off: false)
        showRecordAvailability();
        if (server.api_key_required && !state.apiKey) return askForKey("");
        const reply = await modelFetch("", { cache: "no-store" });
        if (reply.status === 401) return; // the key form is up; "Use key" connects again
        const body = await reply.json();
        if (reply.ok) {
          keyAccepted();
          showModel(body);
          pump();
          startWatching();
          return;
        }
        setStatus("loading", body.error || "loading");
      } catch (error) {
        setStatus("offline", "server unreachable");
      }
      await sleep(1.5);
    }
  }

  async function refreshModel() {
    try {
      const reply = await modelFetch("", { cache: "no-store" });
      if (reply.ok) showModel(await reply.json());
    } catch (error) {
      /* keep the description there is */
    }
  }

  function showModel(meta) {
    const first = state.meta == null;
    const pc = meta.patchcore;
    state.meta = meta;
    state.goodScores = pc.good_scores.slice().sort((a, b) => a - b);
    const changed = state.modelThreshold !== pc.image_threshold;
    state.modelThreshold = pc.image_threshold;
    if (first || changed) state.threshold = pc.image_threshold;
    el.modelName.textContent = `${meta.name} · ${meta.versions[0]}`;
    el.modelName.title = `model ${meta.name}, version (file checksum) ${meta.versions[0]}`;
    setStatus("ready", "ready");

    const loaded = new Date(pc.loaded_at);
    const facts = [
      ["Model", meta.name],
      ["Backbone", pc.backbone],
      ["Layers", pc.layers.join(", ")],
      ["Input", pc.input.description],
      ["Memory bank", `${grouped(pc.memory_bank_shape[0])} × ${pc.memory_bank_shape[1]} patches`],
      ["Images fitted", grouped(pc.num_fit_images)],
      ["Image threshold", f3(pc.image_threshold)],
      ["Pixel threshold", f3(pc.pixel_threshold)],
      ["Good mean", f3(pc.image_good_mean)],
      ["False-alarm rate", `${(100 * pc.false_alarm_rate).toFixed(1)}%`],
      ["Scoring", `${pc.num_neighbors} neighbours, ${pc.index} index, ${pc.device}`],
      ["Checksum", pc.file_sha256.slice(0, 12), pc.file_sha256],
      ["Loaded", isNaN(loaded) ? pc.loaded_at : localTime(loaded), pc.loaded_at],
      ["Package", `patchcore ${pc.package_version}`],
      ["Model file", pc.model_file.split(/[\\/]/).pop(), pc.model_file],
      ["Limits", `${meta.server.max_request_mb} MB a request, ${(meta.server.max_image_pixels / 1e6).toFixed(0)} MP an image`],
    ];
    showFacts(el.modelFacts, facts);
    el.modelLoading.hidden = true;
    el.modelRule.hidden = false;
    el.modelRuleText.textContent = pc.decision_rule;
    el.modelWarning.hidden = !pc.calibration_warning;
    el.modelWarning.textContent = pc.calibration_warning ? `Calibration warning: ${pc.calibration_warning}` : "";
    el.modelThresholdNote.textContent = `model: ${f3(pc.image_threshold)}`;
    showSetAside(pc.contamination);

    el.slider.disabled = false;
    el.value.disabled = false;
    updateRange();
    recut();
  }

  // ---------------------------------------------------------------------------------------------
  // Uploads: groups of files, a few requests at a time; 503 waits for Retry-After and tries again

  function enqueue(files) {
    const list = Array.from(files || []);
    if (list.length === 0) return;
    for (const file of list) {
      const entry = { order: state.nextOrder++, name: file.name || `image ${state.nextOrder - 1}`, file, record: null, error: null, alone: false };
      state.waiting.push(entry);
      state.queued += 1;
    }
    showProgress();
    pump();
  }

  function takeGroup() {
    const limit = state.meta.server.max_request_mb * 1024 * 1024 * 0.9;
    // the server refuses (503) any request with more images than its queue holds, however long one waits
    const most = Math.max(1, Math.min(GROUP_FILES, state.meta.server.max_queue || GROUP_FILES));
    const group = [];
    let bytes = 0;
    while (state.waiting.length && group.length < most) {
      const next = state.waiting[0];
      if (next.file.size > limit) {
        state.waiting.shift();
        finish(next, { path: next.name, error: `'${next.name}': ${(next.file.size / 1048576).toFixed(1)} MB is more than the server takes in one request (${state.meta.server.max_request_mb} MB)` });
        continue;
      }
      if (group.length && (next.alone || group[0].alone || bytes + next.file.size > limit)) break;
      group.push(state.waiting.shift());
      bytes += next.file.size;
    }
    return group;
  }

  function pump() {
    if (!state.meta || state.keyWanted) return;
    while (state.inFlight < IN_FLIGHT && state.waiting.length) {
      const group = takeGroup();
      if (group.length === 0) break;
      state.inFlight += 1;
      send(group).finally(() => {
        state.inFlight -= 1;
        pump();
      });
    }
    refresh();
  }

  async function send(group) {
    let busy = 0;
    let failures = 0;
    for (;;) {
      const form = new FormData();
      for (const entry of group) form.append("file", entry.file, entry.name);
      let reply;
      let body = null;
      try {
        reply = await modelFetch("/predict?picture=true", { method: "POST", body: form });
        body = await reply.json().catch(() => null);
      } catch (error) {
        failures += 1;
        if (failures <= NETWORK_RETRIES) {
          setStatus("offline", "connection lost, retrying");
          await sleep(failures);
          continue;
        }
        for (const entry of group) finish(entry, { path: entry.name, error: `could not reach the server (${error.message})` });
        return;
      }
      if (reply.status === 401) {
        state.waiting.unshift(...group); // sent again once a key is accepted
        return;
      }
      if (reply.status === 503 && busy < BUSY_RETRIES) {
        busy += 1;
        const wait = Math.max(0.2, parseFloat(reply.headers.get("Retry-After")) || 1);
        setStatus("busy", `busy, retrying in ${wait} s`);
        await sleep(wait);
        continue;
      }
      if (state.meta) setStatus("ready", "ready");
      if (body && Array.isArray(body.results) && body.results.length === group.length) {
        if (body.model_version && body.model_version !== state.meta.versions[0]) refreshModel();
        group.forEach((entry, i) => finish(entry, body.results[i], body.model_version));
        afterScoring();
        return;
      }
      if (reply.status === 413 && group.length > 1) {
        // the body as a whole was too large: send each file on its own
        for (const entry of group.reverse()) {
          entry.alone = true;
          state.waiting.unshift(entry);
        }
        return;
      }
      const message = (body && body.error) || `the server answered HTTP ${reply.status}`;
      for (const entry of group) finish(entry, { path: entry.name, error: message });
      return;
    }
  }

  function finish(entry, record, version) {
    entry.modelVersion = version || null;
    if (record.error != null) {
      entry.error = record.error;
    } else {
      entry.record = record;
    }
    entry.file = entry.error != null ? null : entry.file; // keep the file only for "show original"
    state.entries.push(entry);
    state.done += 1;
    buildRow(entry);
    buildCard(entry);
    scheduleRefresh();
  }

  let refreshPending = false;
  function scheduleRefresh() {
    if (refreshPending) return;
    refreshPending = true;
    requestAnimationFrame(() => {
      refreshPending = false;
      refresh();
    });
  }

  function refresh() {
    showProgress();
    updateRange();
    sortEntries();
    recut();
  }

  function showProgress() {
    if (state.queued === 0) {
      el.progressRow.hidden = true;
      return;
    }
    el.progressRow.hidden = false;
    el.progressBar.max = state.queued;
    el.progressBar.value = state.done;
    el.progressText.textContent = `${state.done} of ${state.queued} done`;
  }

  // ---------------------------------------------------------------------------------------------
  // Threshold: slider over the session's and the good images' scores; re-cuts in the page only

  function scoreRange() {
    const values = state.goodScores.concat(state.entries.filter((e) => e.record).map((e) => e.record.score));
    if (state.modelThreshold != null) values.push(state.modelThreshold);
    let low = Math.min(...values);
    let high = Math.max(...values);
    const pad = Math.max(0.05 * (high - low), 0.05);
    // a little beyond the scores, so that every image can be passed or failed
    return [Math.floor((low - pad) * 100) / 100, Math.ceil((high + pad) * 100) / 100];
  }

  function updateRange() {
    if (state.modelThreshold == null) return;
    const [low, high] = scoreRange();
    el.slider.min = String(low);
    el.slider.max = String(high);
    el.slider.value = String(state.threshold);
  }

  function setThreshold(value, fromSlider = false) {
    if (!Number.isFinite(value)) return;
    state.threshold = value;
    if (!fromSlider) {
      const [low, high] = scoreRange();
      if (value < low || value > high) {
        el.slider.min = String(Math.min(low, Math.floor(value * 100) / 100));
        el.slider.max = String(Math.max(high, Math.ceil(value * 100) / 100));
      }
      el.slider.value = String(value);
    }
    if (state.sortKey === "decision") sortEntries();
    recut();
  }

  function recut() {
    if (state.threshold == null) return;
    if (document.activeElement !== el.value) el.value.value = f3(state.threshold); // not while someone types there
    el.summaryThreshold.textContent = f3(state.threshold);
    el.reset.disabled = state.threshold === state.modelThreshold;
    let pass = 0;
    let fail = 0;
    let errors = 0;
    for (const entry of state.entries) {
      const decision = decisionOf(entry);
      if (decision === "pass") pass += 1;
      else if (decision === "fail") fail += 1;
      else errors += 1;
      if (entry.decision !== decision) showDecision(entry, decision);
      if (entry.record) entry.scoreLine.textContent = `score ${f2(entry.record.score)} / threshold ${f2(state.threshold)}`;
    }
    el.passCount.textContent = String(pass);
    el.failCount.textContent = String(fail);
    el.errorCount.textContent = String(errors);
    el.errorCountWrap.hidden = errors === 0;
    const good = state.goodScores;
    if (good.length) {
      const flagged = good.filter((s) => s >= state.threshold).length;
      el.goodRate.textContent = `would flag ${(100 * flagged / good.length).toFixed(1)}% of the good training images (${flagged} of ${good.length})`;
    }
    applyFilter();
    drawStrip();
    updateCsvState();
  }

  function showDecision(entry, decision) {
    entry.decision = decision;
    for (const badge of [entry.badge, entry.rowBadge]) {
      badge.classList.remove("pass", "fail", "error");
      badge.classList.add(decision);
      badge.textContent = DECISION_TEXT[decision];
    }
    entry.card.classList.toggle("is-fail", decision === "fail");
    entry.card.classList.toggle("is-pass", decision === "pass");
    entry.row.dataset.decision = decision;
  }

  /** The scores on the slider's scale: good training images as ticks, the session's as dots. */
  function drawStrip() {
    const svg = el.strip;
    const width = svg.clientWidth;
    const height = 64;
    if (!width || state.modelThreshold == null) return;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const low = parseFloat(el.slider.min);
    const high = parseFloat(el.slider.max);
    const inset = 10; // half the slider thumb: its centre spans the track less this on each side
    const x = (v) => inset + ((Math.min(Math.max(v, low), high) - low) / (high - low || 1)) * (width - 2 * inset);
    const parts = [];
    const line = (x1, y1, x2, y2, cls) => `<line x1="${x1}" y1="${y1}" x2="${x2}" y2="${y2}" class="${cls}"/>`;
    parts.push(`<rect x="${x(low)}" y="20" width="${Math.max(0, x(state.threshold) - x(low))}" height="34" class="zone-pass"/>`);
    parts.push(`<rect x="${x(state.threshold)}" y="20" width="${Math.max(0, x(high) - x(state.threshold))}" height="34" class="zone-fail"/>`);
    for (const score of state.goodScores) parts.push(line(x(score).toFixed(1), 38, x(score).toFixed(1), 52, "good-tick"));
    const mx = x(state.modelThreshold);
    parts.push(line(mx, 14, mx, 58, "model-line"));
    parts.push(`<text x="${mx}" y="10" class="model-label" text-anchor="middle">model</text>`);
    for (const entry of state.entries) {
      if (!entry.record) continue;
      parts.push(`<circle cx="${x(entry.record.score).toFixed(1)}" cy="29" r="5" class="dot ${decisionOf(entry)}"/>`);
    }
    const tx = x(state.threshold);
    parts.push(line(tx, 16, tx, 58, "cut-line"));
    parts.push(`<text x="2" y="63" class="axis-label">${f2(low)}</text>`);
    parts.push(`<text x="${width - 2}" y="63" class="axis-label" text-anchor="end">${f2(high)}</text>`);
    svg.innerHTML = parts.join("");
  }

  // ---------------------------------------------------------------------------------------------
  // Cards and rows

  function buildCard(entry) {
    const card = el.cardTemplate.content.firstElementChild.cloneNode(true);
    card.id = `card-${entry.order}`;
    card.dataset.order = String(entry.order);
    const title = $(".file-name", card);
    // long names wrap after _ - . rather than anywhere
    for (const piece of entry.name.split(/(?<=[_\-.])/)) {
      if (title.firstChild) title.append(document.createElement("wbr"));
      title.append(piece);
    }
    title.title = entry.name;
    entry.badge = $(".badge", card);
    entry.badge.setAttribute("role", "status");
    entry.scoreLine = $(".score", card);
    entry.card = card;
    const frame = $(".picture-frame", card);
    const body = $(".card-body", card);
    if (entry.error != null) {
      card.classList.add("error-card");
      frame.remove();
      body.replaceChildren();
      const message = document.createElement("p");
      message.className = "error-message";
      message.textContent = entry.error;
      body.append(message);
    } else {
      const record = entry.record;
      const [w, h] = record.image_size;
      const img = $(".picture", card);
      const svg = $(".regions-layer", card);
      entry.img = img;
      frame.style.aspectRatio = `${w} / ${h}`;
      cropCaption(img, w, h, w, h + CAPTION_PX);
      img.addEventListener("load", () => {
        if (entry.showing === "original") img.style.marginTop = "0";
        else cropCaption(img, w, h, img.naturalWidth, img.naturalHeight);
      });
      img.alt = `Heat map of ${entry.name}${record.regions.length ? " with the defect regions outlined" : ""}`;
      img.src = record.picture;
      entry.showing = "overlay";
      svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
      const fontSize = Math.max(w, h) / 18;
      record.regions.forEach((region, i) => {
        const polygon = document.createElementNS(SVG_NS, "polygon");
        polygon.setAttribute("class", "region-outline");
        polygon.setAttribute("points", region.polygon.map(([px, py]) => `${px},${py}`).join(" "));
        polygon.dataset.region = String(i + 1);
        const label = document.createElementNS(SVG_NS, "text");
        label.setAttribute("class", "region-label");
        // beside the outline's topmost point, kept inside the picture
        const [topX, topY] = region.polygon.reduce((best, point) => (point[1] < best[1] ? point : best), region.polygon[0]);
        label.setAttribute("x", String(Math.min(Math.max(topX - fontSize * 0.9, 2), w - fontSize)));
        label.setAttribute("y", String(Math.max(fontSize, topY)));
        label.setAttribute("font-size", fontSize.toFixed(0));
        label.textContent = String(i + 1);
        svg.append(polygon, label);
      });
      $(".normalized", card).textContent = `normalized ${f2(record.normalized_score)}`;
      $(".normalized", card).title = "0 = a typical good image, 1 = the model's threshold";
      const count = record.regions.length;
      $(".regions-count", card).textContent = count ? plural(count, "region", "regions") : "no regions over the pixel threshold";
      const list = $(".regions-list", card);
      if (!count) list.remove();
      record.regions.forEach((region, i) => {
        const item = document.createElement("li");
        const [bx, by, bw, bh] = region.box;
        item.textContent = `box ${bx}, ${by}, ${bw} × ${bh} px · area ${grouped(region.area)} px · peak ${f2(region.peak_normalized_score)}`;
        item.tabIndex = 0;
        item.title = "box: left, top, width × height in the image's pixels; peak: the map's highest value, 1 = pixel threshold";
        const polygon = svg.querySelector(`polygon[data-region="${i + 1}"]`);
        const on = () => polygon.classList.add("highlight");
        const off = () => polygon.classList.remove("highlight");
        item.addEventListener("mouseenter", on);
        item.addEventListener("mouseleave", off);
        item.addEventListener("focus", on);
        item.addEventListener("blur", off);
        list.append(item);
      });
      const toggle = $(".view-toggle", card);
      toggle.addEventListener("click", () => toggleOriginal(entry, toggle));
      const link = $(".history-link", card);
      if (record.decision_id) {
        // the server's record of this decision: where it is reviewed
        link.href = `#decision/${encodeURIComponent(record.decision_id)}`;
        link.hidden = false;
        link.title = `decision ${record.decision_id}`;
      } else {
        link.remove();
      }
    }
    el.cards.append(card);
  }

  /** Hide the picture's caption band (its verdict is the model's, not the page's threshold): the
   * frame has the image's aspect ratio, and the picture is moved up by the band's height. */
  function cropCaption(img, w, h, naturalWidth, naturalHeight) {
    const scale = naturalWidth / w;
    const band = Math.max(0, naturalHeight - h * scale);
    img.style.marginTop = `${(-100 * band / naturalWidth).toFixed(4)}%`; // margins are in % of the width
  }

  function toggleOriginal(entry, button) {
    if (entry.showing === "overlay") {
      if (!entry.originalUrl) entry.originalUrl = URL.createObjectURL(entry.file);
      entry.showing = "original";
      entry.img.onerror = () => {
        entry.img.onerror = null;
        entry.showing = "overlay";
        entry.img.src = entry.record.picture;
        button.textContent = "Original not viewable here";
        button.disabled = true;
      };
      entry.img.src = entry.originalUrl;
      entry.img.alt = `${entry.name} as uploaded`;
      button.textContent = "Show heat map";
    } else {
      entry.showing = "overlay";
      entry.img.onerror = null;
      entry.img.src = entry.record.picture;
      entry.img.alt = `Heat map of ${entry.name}`;
      button.textContent = "Show original";
    }
  }

  function buildRow(entry) {
    const row = document.createElement("tr");
    row.tabIndex = 0;
    row.dataset.order = String(entry.order);
    const cells = [
      [String(entry.order), "num"],
      [entry.name, "name"],
      [entry.record ? f2(entry.record.score) : "–", "num"],
      [entry.record ? f2(entry.record.normalized_score) : "–", "num"],
      ["", "decision-cell"],
      [entry.record ? String(entry.record.regions.length) : "–", "num"],
    ];
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.className = cls;
      td.textContent = text;
      row.append(td);
    }
    entry.rowBadge = document.createElement("span");
    entry.rowBadge.className = "decision";
    row.children[4].append(entry.rowBadge);
    if (entry.error != null) {
      const note = document.createElement("span");
      note.className = "row-error";
      note.textContent = entry.error;
      row.children[1].append(note);
    }
    row.addEventListener("click", () => showCard(entry));
    row.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        showCard(entry);
      }
    });
    entry.row = row;
    el.tbody.append(row);
  }

  function showCard(entry) {
    for (const other of state.entries) {
      other.row.classList.toggle("selected", other === entry);
      other.card.classList.toggle("selected", other === entry);
    }
    entry.card.scrollIntoView({ behavior: "smooth", block: "center" });
    entry.card.focus({ preventScroll: true });
  }

  // ---------------------------------------------------------------------------------------------
  // Sorting, filtering, export

  function sortValue(entry, key) {
    switch (key) {
      case "name": return entry.name.toLowerCase();
      case "score": return entry.record ? entry.record.score : -Infinity;
      case "normalized": return entry.record ? entry.record.normalized_score : -Infinity;
      case "decision": return DECISION_RANK[decisionOf(entry)];
      case "regions": return entry.record ? entry.record.regions.length : -1;
      default: return entry.order;
    }
  }

  function sortEntries() {
    const key = state.sortKey;
    const sign = state.sortDescending ? -1 : 1;
    state.entries.sort((a, b) => {
      const va = sortValue(a, key);
      const vb = sortValue(b, key);
      if (va < vb) return -sign;
      if (va > vb) return sign;
      return a.order - b.order;
    });
    el.tbody.append(...state.entries.map((e) => e.row));
    el.cards.append(...state.entries.map((e) => e.card));
    for (const th of el.table.querySelectorAll("th[data-sort]")) {
      const active = th.dataset.sort === key;
      th.setAttribute("aria-sort", active ? (state.sortDescending ? "descending" : "ascending") : "none");
    }
  }

  function applyFilter() {
    const failedOnly = el.failedOnly.checked;
    let visible = 0;
    for (const entry of state.entries) {
      const hide = failedOnly && decisionOf(entry) === "pass";
      entry.row.hidden = hide;
      entry.card.hidden = hide;
      if (!hide) visible += 1;
    }
    el.tableEmpty.hidden = visible > 0;
    el.tableEmpty.textContent = state.entries.length ? "No failed images at this threshold." : "No images yet. Results appear here as they are scored.";
  }

  /** One CSV cell. Text (file names, errors: from users and the network) that a spreadsheet would
   * run as a formula, = + - @ tab or CR first, gets a ' in front (OWASP); numbers stay numbers. */
  function csvField(value, isText = false) {
    let text = value == null ? "" : String(value);
    if (isText && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
    return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function buildCsv() {
    const lines = [["order", "file", "score", "normalized_score", "threshold", "decision", "regions", "model_version", "error", "decision_id"].join(",")];
    const number = (x) => csvField(x);
    const text = (x) => csvField(x, true);
    for (const entry of state.entries) {
      const r = entry.record;
      lines.push([
        number(entry.order), text(entry.name), number(r ? r.score : ""), number(r ? r.normalized_score : ""), number(state.threshold),
        text(DECISION_TEXT[decisionOf(entry)]), number(r ? r.regions.length : ""), text(entry.modelVersion), text(entry.error),
        text(r ? r.decision_id : ""),
      ].join(","));
    }
    return lines.join("\r\n") + "\r\n";
  }

  function updateCsvState() {
    el.exportCsv.setAttribute("aria-disabled", state.entries.length ? "false" : "true");
  }

  // ---------------------------------------------------------------------------------------------
  // The record: history of past decisions, one decision's picture and reviews, the drift banner.
  // Everything the server sends (file names, notes, reasons, stations, parts) goes in as text.

  const VERDICT_TEXT = { false_alarm: "False alarm", confirmed_defect: "Confirmed defect" };

  function storedReviewer() {
    try {
      return localStorage.getItem(REVIEWER_STORE) || "";
    } catch (error) {
      return state.reviewer || "";
    }
  }

  function storeReviewer(name) {
    state.reviewer = name;
    try {
      localStorage.setItem(REVIEWER_STORE, name);
    } catch (error) {
      /* storage off: the name lives in this page only */
    }
  }

  /** "2026-12-07 08:12:03" in the browser's time zone; the UTC text as it came when unreadable */
  function recordTime(iso) {
    const date = new Date(iso);
    return isNaN(date) ? String(iso) : localTime(date);
  }

  function recordDecisionText(decision) {
    return decision === "anomalous" ? "FAIL" : decision === "good" ? "PASS" : String(decision);
  }

  function recordDecisionClass(decision) {
    return decision === "anomalous" ? "fail" : decision === "good" ? "pass" : "error";
  }

  /** the regions of a row: a list (as in the predict answer), or that list as JSON text */
  function regionsOf(row) {
    let regions = row.regions;
    if (typeof regions === "string") {
      try {
        regions = JSON.parse(regions);
      } catch (error) {
        regions = [];
      }
    }
    return Array.isArray(regions) ? regions : [];
  }

  function reviewText(review) {
    if (!review) return "–";
    const verdict = VERDICT_TEXT[review.verdict] || String(review.verdict);
    return review.reviewer ? `${verdict} · ${review.reviewer}` : verdict;
  }

  async function errorOf(reply) {
    const body = await reply.json().catch(() => null);
    return (body && (typeof body.error === "string" ? body.error : body.detail && JSON.stringify(body.detail))) || `the server answered HTTP ${reply.status}`;
  }

  function showRecordAvailability() {
    el.tabHistory.hidden = !state.record;
    if (!state.record) {
      el.driftBanner.hidden = true;
      if (state.view === "history") showView("inspect");
    }
  }

  // ---- views: #inspect, #history, #decision/ID ----

  function showView(view) {
    state.view = view;
    el.inspectView.hidden = view !== "inspect";
    el.historyView.hidden = view !== "history";
    for (const [tab, name] of [[el.tabInspect, "inspect"], [el.tabHistory, "history"]]) {
      if (view === name) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
    if (view === "inspect") drawStrip(); // its width was 0 while hidden
  }

  function route() {
    let hash = location.hash.replace(/^#/, "");
    try {
      hash = decodeURIComponent(hash);
    } catch (error) {
      /* a hand-typed address that is not percent-encoded: taken as it is */
    }
    const opened = /^decision\/(.+)$/.exec(hash);
    if ((hash === "history" || opened) && state.record) {
      showView("history");
      if (!state.watching) return; // connect() routes again once the model is there
      loadHistory();
      if (opened) openDecision(opened[1]);
      else closeDecision();
    } else {
      showView("inspect");
    }
  }

  /** after the first successful connect (and each accepted key): the drift watch and the view the address names */
  function startWatching() {
    state.watching = true;
    pollDrift();
    route();
  }

  function afterScoring() {
    // a batch was just answered (so the server is there): the drift watch has new decisions,
    // and an open history's first page its new rows
    pollDrift();
    if (state.view === "history" && state.history.offset === 0) loadHistory();
  }

  // ---- the list ----

  function historyQuery() {
    const query = new URLSearchParams();
    const put = (key, value) => {
      if (value) query.set(key, value);
    };
    put("decision", el.filterDecision.value);
    put("reviewed", el.filterReviewed.value);
    put("station", el.filterStation.value.trim());
    put("part", el.filterPart.value.trim());
    // datetime-local is the browser's local time; the record's times are UTC
    for (const [key, input] of [["since", el.filterSince], ["until", el.filterUntil]]) {
      const date = input.value ? new Date(input.value) : null;
      if (date && !isNaN(date)) query.set(key, date.toISOString());
    }
    query.set("limit", String(HISTORY_PAGE));
    query.set("offset", String(state.history.offset));
    return query;
  }

  async function loadHistory() {
    if (!state.name || state.keyWanted || !state.record) return;
    const seq = ++state.history.seq; // only the latest request's answer is shown
    el.historyRefresh.disabled = true;
    let reply;
    try {
      reply = await modelFetch(`/decisions?${historyQuery()}`, { cache: "no-store" });
    } catch (error) {
      if (seq === state.history.seq) showHistoryError(`could not reach the server (${error.message})`);
      return;
    } finally {
      if (seq === state.history.seq) el.historyRefresh.disabled = false;
    }
    if (seq !== state.history.seq) return;
    if (reply.status === 401) return; // the key form is up; an accepted key routes again
    if (!reply.ok) {
      showHistoryError(await errorOf(reply));
      return;
    }
    const body = await reply.json();
    if (seq !== state.history.seq) return;
    el.historyError.hidden = true;
    state.history.loaded = true;
    state.history.rows = body.decisions || [];
    state.history.total = body.total != null ? body.total : state.history.rows.length;
    if (state.history.rows.length === 0 && state.history.offset > 0 && state.history.total > 0) {
      // the page went past the end (rows were pruned): back to the first
      state.history.offset = 0;
      loadHistory();
      return;
    }
    showHistory();
  }

  function showHistoryError(message) {
    el.historyError.hidden = false;
    el.historyError.textContent = `The history could not be read: ${message}`;
  }

  function showHistory() {
    const { rows, total, offset } = state.history;
    el.historyBody.replaceChildren(...rows.map(historyRow));
    el.historyEmpty.hidden = rows.length > 0;
    el.historyEmpty.textContent = "No decisions match these filters.";
    el.historyRange.textContent = rows.length ? `${grouped(offset + 1)}–${grouped(offset + rows.length)} of ${grouped(total)}` : `0 of ${grouped(total)}`;
    el.historyNewer.disabled = offset === 0;
    el.historyOlder.disabled = offset + rows.length >= total;
  }

  function historyRow(row) {
    const tr = document.createElement("tr");
    tr.dataset.id = row.id;
    const href = `#decision/${encodeURIComponent(row.id)}`;
    const cells = [
      [recordTime(row.time), "time", row.time],
      [row.station == null ? "–" : String(row.station), "station"],
      [row.part == null ? "–" : String(row.part), "part"],
      [row.file_name == null ? "(no file name)" : String(row.file_name), "name"],
      [row.score == null ? "–" : f2(row.score), "num"],
      ["", "decision-cell"],
      [reviewText(row.review), "review"],
    ];
    for (const [text, cls, title] of cells) {
      const td = document.createElement("td");
      td.className = cls;
      if (cls === "name") {
        // the keyboard's and a screen reader's way in: a link per row (the row itself is a mouse target)
        const link = document.createElement("a");
        link.href = href;
        link.textContent = text;
        td.append(link);
      } else {
        td.textContent = text;
      }
      if (title) td.title = title;
      tr.append(td);
    }
    const badge = document.createElement("span");
    badge.className = `decision ${recordDecisionClass(row.decision)}`;
    badge.textContent = recordDecisionText(row.decision);
    tr.children[5].append(badge);
    if (row.review) tr.children[6].classList.add(`verdict-${row.review.verdict}`);
    tr.addEventListener("click", (event) => {
      if (!event.target.closest("a")) location.hash = href;
    });
    if (row.id === state.openId) {
      tr.classList.add("selected");
      tr.querySelector("td.name a").setAttribute("aria-current", "true");
    }
    return tr;
  }

  function markSelectedRow() {
    for (const tr of el.historyBody.children) {
      const open = tr.dataset.id === state.openId;
      tr.classList.toggle("selected", open);
      const link = tr.querySelector("td.name a");
      if (open) link.setAttribute("aria-current", "true");
      else link.removeAttribute("aria-current");
    }
  }

  // ---- one decision ----

  async function openDecision(id, { scroll = true } = {}) {
    state.openId = id;
    markSelectedRow();
    el.decisionPanel.hidden = false;
    let reply;
    try {
      reply = await modelFetch(`/decisions/${encodeURIComponent(id)}`, { cache: "no-store" });
    } catch (error) {
      if (state.openId === id) showDecisionError(`could not reach the server (${error.message})`);
      return;
    }
    if (state.openId !== id || reply.status === 401) return;
    if (!reply.ok) {
      showDecisionError(reply.status === 404 ? `no decision ${id} in this server's record` : await errorOf(reply));
      return;
    }
    const row = await reply.json();
    if (state.openId !== id) return;
    showRecordedDecision(row);
    if (scroll) {
      el.decisionPanel.scrollIntoView({ behavior: "smooth", block: "start" });
      el.decisionPanel.focus({ preventScroll: true });
    }
  }

  function closeDecision() {
    state.openId = null;
    el.decisionPanel.hidden = true;
    markSelectedRow();
  }

  function showDecisionError(message) {
    el.decisionError.hidden = false;
    el.decisionError.textContent = message;
    el.decisionBody.hidden = true;
  }

  function showRecordedDecision(row) {
    el.decisionError.hidden = true;
    el.decisionBody.hidden = false;
    el.decisionPanel.dataset.id = row.id;
    const name = row.file_name == null ? "(no file name)" : String(row.file_name);
    el.decisionFile.textContent = name;
    el.decisionFile.title = name;
    el.decisionBadge.className = `badge ${recordDecisionClass(row.decision)}`;
    el.decisionBadge.textContent = recordDecisionText(row.decision);

    // the kept picture, the regions outlined in the image's own pixels
    const regions = regionsOf(row);
    const w = row.width;
    const h = row.height;
    el.decisionRegions.replaceChildren();
    if (row.picture) {
      el.decisionFrame.hidden = false;
      el.decisionNoPicture.hidden = true;
      if (w && h) el.decisionFrame.style.aspectRatio = `${w} / ${h}`;
      el.decisionPicture.src = row.picture;
      el.decisionPicture.alt = `${name} as kept${regions.length ? ", the defect regions outlined" : ""}`;
      if (w && h) {
        el.decisionRegions.setAttribute("viewBox", `0 0 ${w} ${h}`);
        for (const region of regions) {
          if (!Array.isArray(region.polygon)) continue;
          const polygon = document.createElementNS(SVG_NS, "polygon");
          polygon.setAttribute("class", "region-outline");
          polygon.setAttribute("points", region.polygon.map(([px, py]) => `${Number(px)},${Number(py)}`).join(" "));
          el.decisionRegions.append(polygon);
        }
      }
    } else {
      el.decisionFrame.hidden = true;
      el.decisionPicture.removeAttribute("src");
      el.decisionNoPicture.hidden = false;
      el.decisionNoPicture.textContent = "image not kept";
    }

    const sha = (text) => (text ? String(text).slice(0, 12) : "–");
    const facts = [
      ["Time", recordTime(row.time), row.time],
      ["Station", row.station == null ? "–" : String(row.station)],
      ["Part", row.part == null ? "–" : String(row.part)],
      ["Score", row.score == null ? "–" : `${f3(row.score)} / threshold ${f3(row.threshold)}`],
      ["Normalized", row.normalized_score == null ? "–" : f2(row.normalized_score)],
      ["Regions", String(regions.length)],
      ["Image", w && h ? `${w} × ${h} px` : "–"],
      ["Image checksum", sha(row.image_sha256), row.image_sha256],
      ["Model", `${row.model_name == null ? "–" : row.model_name} · ${sha(row.model_sha256)}`, row.model_sha256],
      ["Decision rule", row.decision_rule == null ? "–" : String(row.decision_rule)],
      ["Engine", row.engine == null ? "–" : String(row.engine)],
      ["Latency", row.latency_ms == null ? "–" : `${Number(row.latency_ms).toFixed(1)} ms`],
      ["Decision id", String(row.id)],
    ];
    showFacts(el.decisionFacts, facts);

    // reviews, oldest first; the last one is the decision's review
    const reviews = Array.isArray(row.reviews) ? row.reviews : row.review ? [row.review] : [];
    el.decisionReviews.replaceChildren();
    reviews.forEach((review, i) => {
      const item = document.createElement("li");
      item.className = `review verdict-${review.verdict}`;
      if (i === reviews.length - 1) item.classList.add("current");
      const verdict = document.createElement("strong");
      verdict.className = "verdict";
      verdict.textContent = VERDICT_TEXT[review.verdict] || String(review.verdict);
      const who = document.createElement("span");
      who.className = "reviewer";
      who.textContent = ` by ${review.reviewer == null ? "–" : review.reviewer}, ${recordTime(review.time)}`;
      item.append(verdict, who);
      if (i < reviews.length - 1) item.title = "superseded by a later review";
      if (review.note) {
        const note = document.createElement("p");
        note.className = "note";
        note.textContent = String(review.note);
        item.append(note);
      }
      el.decisionReviews.append(item);
    });
    el.decisionNoReviews.hidden = reviews.length > 0;
    el.reviewError.hidden = true;
    showReviewer();

    // the list's row shows the latest review too
    const latest = reviews.length ? reviews[reviews.length - 1] : null;
    const index = state.history.rows.findIndex((r) => r.id === row.id);
    if (index >= 0) {
      state.history.rows[index] = { ...state.history.rows[index], review: latest };
      const old = el.historyBody.querySelector(`tr[data-id="${CSS.escape(row.id)}"]`);
      if (old) old.replaceWith(historyRow(state.history.rows[index]));
    }
  }

  // ---- reviewing ----

  /** who signs a review: the API key's name (the server knows it), or a name asked once and kept */
  function showReviewer(editing = false) {
    const name = storedReviewer();
    el.reviewerKey.hidden = !state.keysRequired;
    el.reviewerKnown.hidden = state.keysRequired || !name || editing;
    el.reviewerAsk.hidden = state.keysRequired || (Boolean(name) && !editing);
    el.reviewerName.textContent = name;
    if (!el.reviewerAsk.hidden && !el.reviewerInput.value) el.reviewerInput.value = name;
  }

  async function review(verdict) {
    const id = state.openId;
    if (!id || state.reviewing) return;
    const body = { verdict, note: el.reviewNote.value.trim() };
    if (!state.keysRequired) {
      const name = el.reviewerAsk.hidden ? storedReviewer() : el.reviewerInput.value.trim();
      if (!name) {
        showReviewer(true);
        el.reviewError.hidden = false;
        el.reviewError.textContent = "Enter your name first: each review is signed.";
        el.reviewerInput.focus();
        return;
      }
      body.reviewer = name;
    }
    state.reviewing = true;
    for (const button of el.reviewButtons) button.disabled = true;
    try {
      const reply = await modelFetch(`/decisions/${encodeURIComponent(id)}/review`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (reply.status === 401) return; // the key form is up
      if (reply.status !== 201 && !reply.ok) {
        el.reviewError.hidden = false;
        el.reviewError.textContent = `The review was not stored: ${await errorOf(reply)}`;
        return;
      }
      if (body.reviewer) storeReviewer(body.reviewer);
      el.reviewNote.value = "";
      el.reviewerInput.value = "";
      if (state.openId === id) await openDecision(id, { scroll: false });
    } catch (error) {
      el.reviewError.hidden = false;
      el.reviewError.textContent = `The review was not stored: could not reach the server (${error.message})`;
    } finally {
      state.reviewing = false;
      for (const button of el.reviewButtons) button.disabled = false;
    }
  }

  // ---- drift ----

  /** asks the drift watch now (or right after the answer in flight), then again DRIFT_EVERY_S later */
  async function pollDrift() {
    if (!state.name || state.keyWanted || !state.record || state.drift.off) return;
    if (state.drift.asking) {
      state.drift.again = true; // decisions came meanwhile: ask once more when this answer is in
      return;
    }
    clearTimeout(state.drift.timer);
    state.drift.asking = true;
    let body = null;
    try {
      const reply = await modelFetch("/drift", { cache: "no-store" });
      if (reply.status === 404) state.drift.off = true; // this server has no drift watch
      else if (reply.ok) body = await reply.json().catch(() => null);
    } catch (error) {
      /* the status pill says when the server is away; the next poll tries again */
    } finally {
      state.drift.asking = false;
    }
    if (state.drift.off) el.driftBanner.hidden = true;
    if (body) showDrift(body);
    if (state.drift.off) return;
    if (state.drift.again) {
      state.drift.again = false;
      pollDrift();
    } else {
      state.drift.timer = setTimeout(pollDrift, DRIFT_EVERY_S * 1000);
    }
  }

  function showDrift(body) {
    if (body.record === false) {
      // started with --record off: no history to show, no drift to watch
      state.record = false;
      showRecordAvailability();
      return;
    }
    const stations = body.stations && typeof body.stations === "object" ? body.stations : {};
    const alarming = Object.entries(stations).filter(([, status]) => status && status.alarm);
    const lines = alarming.map(([station, status]) => [String(station), status.reason == null ? "the drift watch raised an alarm" : String(status.reason)]);
    // the banner is an alert: redrawn only when what it says changes, so that a screen reader
    // announces a new alarm once, not every poll
    const said = JSON.stringify(lines);
    if (said === state.drift.said) return;
    state.drift.said = said;
    el.driftBanner.hidden = lines.length === 0;
    el.driftList.replaceChildren();
    for (const [station, reason] of lines) {
      const item = document.createElement("li");
      item.dataset.station = station;
      const where = document.createElement("strong");
      where.textContent = `${station}: `;
      item.append(where, reason);
      el.driftList.append(item);
    }
    el.driftChecked.textContent = lines.length ? `since ${localTime(new Date())}` : "";
  }

  // ---- wiring ----

  window.addEventListener("hashchange", route);
  el.historyFilters.addEventListener("submit", (event) => {
    event.preventDefault();
    state.history.offset = 0;
    loadHistory();
  });
  el.historyFilters.addEventListener("reset", () => {
    setTimeout(() => {
      state.history.offset = 0;
      loadHistory();
    }); // after the form has cleared its fields
  });
  for (const input of [el.filterDecision, el.filterReviewed, el.filterStation, el.filterPart, el.filterSince, el.filterUntil]) {
    input.addEventListener("change", () => {
      state.history.offset = 0;
      loadHistory();
    });
  }
  el.historyRefresh.addEventListener("click", () => {
    loadHistory();
    if (state.openId) openDecision(state.openId, { scroll: false });
  });
  el.historyNewer.addEventListener("click", () => {
    state.history.offset = Math.max(0, state.history.offset - HISTORY_PAGE);
    loadHistory();
  });
  el.historyOlder.addEventListener("click", () => {
    state.history.offset += HISTORY_PAGE;
    loadHistory();
  });
  el.decisionClose.addEventListener("click", () => {
    location.hash = "#history";
  });
  for (const button of el.reviewButtons) button.addEventListener("click", () => review(button.dataset.verdict));
  el.reviewForm.addEventListener("submit", (event) => event.preventDefault());
  el.reviewerChange.addEventListener("click", () => {
    showReviewer(true);
    el.reviewerInput.focus();
    el.reviewerInput.select();
  });

  // ---------------------------------------------------------------------------------------------
  // Wiring

  function filesOf(dataTransfer) {
    return dataTransfer && dataTransfer.files ? Array.from(dataTransfer.files) : [];
  }

  el.fileInput.addEventListener("change", () => {
    enqueue(el.fileInput.files);
    el.fileInput.value = "";
  });
  el.dropZone.addEventListener("click", (event) => {
    if (event.target === el.dropZone || event.target.closest(".drop-text, .drop-icon, .drop-hint")) el.fileInput.click();
  });
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth += 1;
    el.dropZone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) el.dropZone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    el.dropZone.classList.remove("dragging");
    enqueue(filesOf(event.dataTransfer));
  });
  document.addEventListener("paste", (event) => {
    if (event.target.closest && event.target.closest("input[type=number]")) return;
    const files = filesOf(event.clipboardData);
    if (files.length) {
      event.preventDefault();
      enqueue(files);
    }
  });

  el.slider.addEventListener("input", () => setThreshold(parseFloat(el.slider.value), true));
  el.slider.addEventListener("change", () => setThreshold(parseFloat(el.slider.value), true));
  el.value.addEventListener("change", () => setThreshold(parseFloat(el.value.value)));
  el.reset.addEventListener("click", () => setThreshold(state.modelThreshold));
  el.failedOnly.addEventListener("change", applyFilter);

  for (const th of el.table.querySelectorAll("th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.sort;
      if (state.sortKey === key) state.sortDescending = !state.sortDescending;
      else {
        state.sortKey = key;
        // worst first for the measures, A to Z for names and upload order
        state.sortDescending = !["name", "order"].includes(key);
      }
      sortEntries();
    });
  }

  el.exportCsv.addEventListener("click", (event) => {
    if (!state.entries.length) {
      event.preventDefault();
      return;
    }
    if (state.csvUrl) URL.revokeObjectURL(state.csvUrl);
    state.csvUrl = URL.createObjectURL(new Blob([buildCsv()], { type: "text/csv" }));
    el.exportCsv.href = state.csvUrl;
  });

  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = el.keyInput.value.trim();
    if (!/^[\x21-\x7e]+$/.test(key)) {
      el.keyError.hidden = false;
      el.keyError.textContent = "An API key is printable ASCII without spaces.";
      return;
    }
    state.apiKey = key;
    storeKey(key);
    el.keyButton.disabled = true; // until the server has answered
    connect();
  });

  el.clear.addEventListener("click", () => {
    for (const entry of state.entries) {
      entry.row.remove();
      entry.card.remove();
      if (entry.originalUrl) URL.revokeObjectURL(entry.originalUrl);
    }
    state.entries = [];
    state.queued -= state.done;
    state.done = 0;
    refresh();
  });

  if (typeof ResizeObserver === "function") new ResizeObserver(() => drawStrip()).observe(el.strip);

  applyFilter();
  route();
  connect();
})();
