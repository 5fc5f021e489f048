// The vpool console: a fleet page polling /ui/api/fleet and a chat playground streaming
// /v1/chat/completions. Vanilla JavaScript, no build step. Every text that comes from the
// gateway goes into the page through textContent, never innerHTML.
"use strict";

(() => {
  const KEY_ITEM = "vpool.apiKey";
  const POLL_MS = 2000;
  // Relative URLs, so the console works behind a proxy that serves the gateway under a prefix.
  const FLEET_URL = "api/fleet";
  const MODELS_URL = "../v1/models";
  const CHAT_URL = "../v1/chat/completions";

  const $ = (id) => document.getElementById(id);

  // --- the API key ------------------------------------------------------------------------

  const apiKey = () => sessionStorage.getItem(KEY_ITEM) || "";

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  function showKeyState() {
    $("key-state").textContent = apiKey() ? "key set" : "no key";
  }

  function refusedMessage(detail) {
    const why = detail ? ` (${detail})` : "";
    return apiKey()
      ? `The gateway refused this key${why}. Enter another one.`
      : `This gateway needs an API key${why}.`;
  }

  function askForKey(message) {
    $("key-panel").hidden = false;
    $("key-message").textContent = message || "";
    $("key-input").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
    $("key-input").value = "";
    $("key-panel").hidden = true;
    $("key-message").textContent = "";
    showKeyState();
    keyRefused = false;
    pollFleet();
    if (currentPage() === "playground") loadModels();
  });
  $("key-change").addEventListener("click", () => askForKey(""));
  $("key-cancel").addEventListener("click", () => {
    $("key-panel").hidden = true;
  });

  // The message of an OpenAI error body, {"error": {"message", "type", "param", "code"}}.
  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (_) {
      // not JSON: fall through
    }
    return `HTTP ${resp.status}`;
  }

  // --- pages ------------------------------------------------------------------------------

  const currentPage = () => (location.hash === "#playground" ? "playground" : "fleet");

  function route() {
    const page = currentPage();
    for (const name of ["fleet", "playground"]) {
      $("page-" + name).hidden = name !== page;
      $("tab-" + name).classList.toggle("active", name === page);
    }
    if (page === "fleet") pollFleet();
    else if (!modelsLoaded) loadModels();
  }

  // --- helpers ----------------------------------------------------------------------------

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  const DASH = "\u2014";
  const text = (value) => (value === null || value === undefined || value === "" ? DASH : String(value));

  // A table row; each cell a string or number (null: a dash), a Node, or {text|node, className}.
  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.append(cell);
      else if (cell && typeof cell === "object") {
        td.append(cell.node !== undefined ? cell.node : text(cell.text));
        if (cell.className) td.className = cell.className;
      } else td.textContent = text(cell);
      tr.append(td);
    }
    return tr;
  }

  const num = (value) => ({ text: value, className: "num" });
  const badge = (state) => el("span", state, "state state-" + state);

  function age(seconds) {
    if (seconds < 10) return `${seconds.toFixed(1)} s ago`;
    if (seconds < 120) return `${Math.round(seconds)} s ago`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min ago`;
    return `${Math.round(seconds / 3600)} h ago`;
  }

  function meter(fraction) {
    const wrap = el("span");
    const bar = el("span", null, "meter");
    const fill = el("span");
    const pct = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
    fill.style.width = pct + "%";
    bar.append(fill);
    wrap.append(bar, el("span", pct + "%", "meter-label"));
    return wrap;
  }

  // "62% (3,968 of 6,150 tokens)" since the worker's engine started; null (a dash) where it
  // reports no lookups: an external server, prefix caching off.
  function prefixHits(w) {
    if (w.prefix_cache_hit_rate === null || w.prefix_cache_hit_rate === undefined) return null;
    const pct = Math.round(w.prefix_cache_hit_rate * 100);
    const hits = w.prefix_cache_hits.toLocaleString();
    const queries = w.prefix_cache_queries.toLocaleString();
    return `${pct}% (${hits} of ${queries} tokens)`;
  }

  function fill(bodyId, emptyId, rows) {
    $(bodyId).replaceChildren(...rows);
    $(bodyId).closest("table").hidden = rows.length === 0;
    $(emptyId).hidden = rows.length !== 0;
  }

  // --- the fleet page ---------------------------------------------------------------------

  let pollTimer = null;
  let polling = false;
  let lastFleet = null;
  let keyRefused = false;

  function fleetStatus(text, level) {
    const line = $("fleet-status");
    line.textContent = text;
    line.className = "status-line" + (level ? " " + level : "");
  }

  async function pollFleet() {
    clearTimeout(pollTimer);
    if (polling || currentPage() !== "fleet" || document.hidden) return; // resumed when shown
    polling = true;
    try {
      let resp;
      try {
        resp = await fetch(FLEET_URL, { headers: authHeaders(), cache: "no-store" });
      } catch (err) {
        fleetStatus(`The gateway did not answer (${err.message}); retrying every 2 s.`, "bad");
        return;
      }
      if (resp.status === 401) {
        keyRefused = true;
        const message = refusedMessage(await errorMessage(resp));
        fleetStatus(message, "bad");
        askForKey(message);
        return;
      }
      if (!resp.ok) {
        fleetStatus(`The gateway answered ${resp.status}: ${await errorMessage(resp)}; retrying.`, "bad");
        return;
      }
      renderFleet(await resp.json());
    } finally {
      polling = false;
      // A refused key pauses polling until another key is given.
      if (!keyRefused) pollTimer = setTimeout(pollFleet, POLL_MS);
    }
  }

  function renderFleet(data) {
    lastFleet = data;
    const ready = data.workers.filter((w) => w.state === "READY").length;
    const updated = new Date(data.now * 1000).toLocaleTimeString();
    if (data.registry === "ok") {
      fleetStatus(`${data.workers.length} workers, ${ready} ready \u00b7 updated ${updated}`);
    } else {
      fleetStatus(
        `The registry is unavailable: this is the gateway's last view of the fleet, and jobs are ` +
          `not listed \u00b7 updated ${updated}`,
        "warn",
      );
    }

    fill(
      "models-body",
      "models-empty",
      data.models.map((m) => {
        const tr = row([
          m.name,
          num(`${m.ready_workers} of ${m.workers}`),
          num(m.max_model_len),
          m.runner === "pooling" ? "embeddings" : m.runner === "generate" ? "chat, completions" : null,
        ]);
        tr.dataset.model = m.name;
        return tr;
      }),
    );

    fill(
      "workers-body",
      "workers-empty",
      data.workers.map((w) => {
        const state = el("span");
        state.append(badge(w.state));
        if (w.retained) state.append(el("span", "kept after a registry outage", "tag"));
        if (w.ejected) state.append(el("span", "ejected here", "tag"));
        const tr = row([
          el("code", w.worker_id),
          w.models.join(", "),
          { node: state },
          num(w.running),
          num(w.waiting),
          { node: meter(w.kv_cache_usage) },
          num(prefixHits(w)),
          num(w.inflight),
          age(w.last_heartbeat_age_s),
          w.kind === "external" ? "external" : w.runner === "pooling" ? "vpool (embeddings)" : "vpool",
        ]);
        tr.dataset.workerId = w.worker_id;
        tr.dataset.state = w.state;
        if (w.state === "GONE" || w.state === "FAILED") tr.classList.add("gone");
        return tr;
      }),
    );

    fill(
      "jobs-body",
      "jobs-empty",
      data.jobs.map((j) => {
        const tr = row([
          el("code", j.job_id),
          j.model,
          j.launcher,
          { node: badge(j.state) },
          j.reason,
          age(Math.max(0, data.now - j.submitted_at)),
          age(Math.max(0, data.now - j.updated_at)),
        ]);
        tr.dataset.jobId = j.job_id;
        tr.dataset.state = j.state;
        return tr;
      }),
    );
    if (data.registry !== "ok" && data.jobs.length === 0) {
      $("jobs-empty").textContent = "Jobs are not listed while the registry is unavailable.";
    } else {
      $("jobs-empty").textContent = "No jobs launched.";
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) pollFleet();
  });

  // --- the playground ---------------------------------------------------------------------

  let modelsLoaded = false;
  let running = null; // the AbortController of the answer streaming now

  function chatError(message) {
    const box = $("pg-error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function chatState(state, text) {
    $("pg-output").dataset.state = state;
    $("pg-status").dataset.state = state;
    $("pg-status").textContent = text || "";
  }

  async function loadModels() {
    const select = $("pg-model");
    const previous = select.value;
    let resp;
    try {
      resp = await fetch(MODELS_URL, { headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      chatError(`The gateway did not answer (${err.message}).`);
      return;
    }
    if (resp.status === 401) {
      const message = refusedMessage(await errorMessage(resp));
      chatError(message);
      askForKey(message);
      return;
    }
    if (!resp.ok) {
      chatError(`Could not list the models: ${await errorMessage(resp)}`);
      return;
    }
    chatError("");
    const body = await resp.json();
    const pooling = new Set(
      (lastFleet ? lastFleet.models : []).filter((m) => m.runner === "pooling").map((m) => m.name),
    );
    // Chat models first; embedding models cannot chat, but are listed for what they answer.
    const ids = (body.data || [])
      .map((m) => m.id)
      .sort((a, b) => pooling.has(a) - pooling.has(b) || a.localeCompare(b));
    const options = ids.map((id) => {
      const option = el("option", pooling.has(id) ? `${id} (embeddings)` : id);
      option.value = id;
      return option;
    });
    if (!options.length) {
      const none = el("option", "no models ready yet");
      none.value = "";
      none.disabled = true;
      options.push(none);
    }
    select.replaceChildren(...options);
    select.value = ids.includes(previous) ? previous : ids[0] || "";
    modelsLoaded = ids.length > 0;
    $("pg-send").disabled = running !== null || ids.length === 0;
  }

  // Server-sent events: blocks separated by a blank line, payload in `data:` lines.
  function* sseEvents(buffer) {
    let match;
    let rest = buffer.text;
    while ((match = /\r?\n\r?\n/.exec(rest)) !== null) {
      const block = rest.slice(0, match.index);
      rest = rest.slice(match.index + match[0].length);
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      buffer.text = rest;
      if (data) yield data;
    }
  }

  async function send(event) {
    event.preventDefault();
    if (running) return;
    const model = $("pg-model").value;
    const user = $("pg-user").value;
    if (!model) return chatError("Pick a model first.");
    if (!user.trim()) return chatError("Write a message first.");
    const messages = [];
    const system = $("pg-system").value;
    if (system.trim()) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: user });
    const request = { model, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat($("pg-temperature").value);
    if (Number.isFinite(temperature)) request.temperature = temperature;
    const maxTokens = parseInt($("pg-max-tokens").value, 10);
    if (Number.isFinite(maxTokens) && maxTokens > 0) request.max_tokens = maxTokens;

    const output = $("pg-output");
    output.replaceChildren();
    chatError("");
    chatState("waiting", "waiting for the first token\u2026");
    running = new AbortController();
    $("pg-send").disabled = true;
    $("pg-stop").disabled = false;
    const started = performance.now();
    let usage = null;
    let finished = false;
    let worker = "";
    try {
      const resp = await fetch(CHAT_URL, {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(request),
        signal: running.signal,
      });
      if (!resp.ok) {
        const detail = await errorMessage(resp);
        if (resp.status === 401) {
          const message = refusedMessage(detail);
          chatError(message);
          askForKey(message);
        } else {
          chatError(`The gateway answered ${resp.status}: ${detail}`);
        }
        chatState("error", "failed");
        return;
      }
      worker = resp.headers.get("x-vpool-worker") || "";
      chatState("streaming", "streaming\u2026");
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      const buffer = { text: "" };
      while (!finished) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer.text += decoder.decode(value, { stream: true });
        for (const data of sseEvents(buffer)) {
          if (data === "[DONE]") {
            finished = true;
            break;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the stream ended with an error");
          for (const choice of chunk.choices || []) {
            const piece = choice.delta && choice.delta.content;
            if (piece) output.append(document.createTextNode(piece));
          }
          if (chunk.usage) usage = chunk.usage;
        }
      }
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const parts = [];
      if (worker) parts.push(`served by ${worker}`);
      if (usage) parts.push(`${usage.completion_tokens} tokens`);
      parts.push(`${seconds} s`);
      if (!finished) {
        chatError("The stream ended before the answer was complete.");
        chatState("error", parts.join(" \u00b7 "));
      } else {
        if (!output.textContent) parts.unshift("no text in the answer");
        chatState("done", parts.join(" \u00b7 "));
      }
    } catch (err) {
      if (err.name === "AbortError") {
        chatState("stopped", "stopped");
      } else {
        chatError(err.message);
        chatState("error", "failed");
      }
    } finally {
      running = null;
      $("pg-send").disabled = !$("pg-model").value;
      $("pg-stop").disabled = true;
    }
  }

  $("chat-form").addEventListener("submit", send);
  $("pg-stop").addEventListener("click", () => {
    if (running) running.abort();
  });
  $("pg-reload").addEventListener("click", loadModels);
  $("pg-user").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("chat-form").requestSubmit();
  });

  // --- start ------------------------------------------------------------------------------

  window.addEventListener("hashchange", route);
  showKeyState();
  route();
})();
