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
    modelRule: $("#model-rule"),
    modelRuleText: $("#model-rule-text"),
    keyPanel: $("#key-panel"),
    keyForm: $("#key-form"),
    keyInput: $("#key-input"),
    keyButton: $("#key-button"),
    keyError: $("#key-error"),
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
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
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

  async function connect() {
    for (;;) {
      try {
        const server = await (await fetch("/v2", { cache: "no-store" })).json();
        state.name = server.models[0];
        if (server.api_key_required && !state.apiKey) return askForKey("");
        const reply = await modelFetch("", { cache: "no-store" });
        if (reply.status === 401) return; // the key form is up; "Use key" connects again
        const body = await reply.json();
        if (reply.ok) {
          keyAccepted();
          showModel(body);
          pump();
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
    el.modelFacts.replaceChildren();
    for (const [term, value, title] of facts) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.fact = term.toLowerCase().replace(/[^a-z]+/g, "-");
      if (title) dd.title = title;
      el.modelFacts.append(dt, dd);
    }
    el.modelLoading.hidden = true;
    el.modelRule.hidden = false;
    el.modelRuleText.textContent = pc.decision_rule;
    el.modelWarning.hidden = !pc.calibration_warning;
    el.modelWarning.textContent = pc.calibration_warning ? `Calibration warning: ${pc.calibration_warning}` : "";
    el.modelThresholdNote.textContent = `model: ${f3(pc.image_threshold)}`;

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
    const lines = [["order", "file", "score", "normalized_score", "threshold", "decision", "regions", "model_version", "error"].join(",")];
    const number = (x) => csvField(x);
    const text = (x) => csvField(x, true);
    for (const entry of state.entries) {
      const r = entry.record;
      lines.push([
        number(entry.order), text(entry.name), number(r ? r.score : ""), number(r ? r.normalized_score : ""), number(state.threshold),
        text(DECISION_TEXT[decisionOf(entry)]), number(r ? r.regions.length : ""), text(entry.modelVersion), text(entry.error),
      ].join(","));
    }
    return lines.join("\r\n") + "\r\n";
  }

  function updateCsvState() {
    el.exportCsv.setAttribute("aria-disabled", state.entries.length ? "false" : "true");
  }

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
  connect();
})();
