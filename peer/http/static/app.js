// The swarm-peer page: a chat over POST /v1/chat/completions (server-sent events, read
// from fetch's body stream so a Stop button can abort it) and a live view of the swarm
// from GET /api/swarm. No framework, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { history: [], controller: null, model: null };

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

const short = (id) => id.slice(0, 12);
const fmtAgo = (s) => (s == null ? "?" : s < 120 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(0)} min`);

// -- tabs ---------------------------------------------------------------------------

function showPage() {
  const page = location.hash === "#swarm" ? "swarm" : "chat";
  for (const name of ["chat", "swarm"]) {
    $(`#page-${name}`).hidden = name !== page;
    $(`#tab-${name}`).classList.toggle("active", name === page);
  }
  if (page === "swarm") refreshSwarm();
}
window.addEventListener("hashchange", showPage);

// -- chat ---------------------------------------------------------------------------

function routeText(swarm) {
  if (!swarm || !swarm.route) return "";
  const hops = swarm.route.map((h) => `${short(h.peer_id)}@${h.address} [${h.blocks[0]}:${h.blocks[1]}]`);
  const t = swarm.timings || {};
  const speed = t.tokens_per_second ? `, ${t.tokens_per_second.toFixed(1)} tok/s` : "";
  const fo = swarm.failovers ? `, ${swarm.failovers} failover(s)` : "";
  return `route: ${hops.join(" → ")}${speed}${fo}`;
}

function sampling() {
  const body = {};
  const num = (id) => { const v = $(id).value; return v === "" ? null : Number(v); };
  for (const [key, id] of [["temperature", "#temperature"], ["top_p", "#top_p"], ["max_tokens", "#max_tokens"],
                           ["seed", "#seed"]]) {
    const v = num(id);
    if (v !== null && !Number.isNaN(v)) body[key] = v;
  }
  if ($("#stop_text").value) body.stop = [$("#stop_text").value];
  return body;
}

async function send(text) {
  const messages = $("#messages");
  messages.append(el("div", { class: "msg user" }, text));
  state.history.push({ role: "user", content: text });
  const bubble = el("div", { class: "msg assistant", "data-state": "streaming" });
  const body = el("span", { class: "text" });
  const meta = el("span", { class: "meta route" });
  bubble.append(body, meta);
  messages.append(bubble);
  const pieces = [];  // token texts, so a rewind can take the last ones back
  const controller = new AbortController();
  state.controller = controller;
  $("#send").disabled = true;
  $("#stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: controller.signal,
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true, ...sampling() }),
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.swarm && chunk.swarm.rewind) pieces.splice(pieces.length - chunk.swarm.rewind);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) pieces.push(choice.delta.content);
        body.textContent = pieces.join("");
        if (chunk.swarm && chunk.swarm.route) meta.textContent = routeText(chunk.swarm);
        bubble.scrollIntoView({ block: "end" });
      }
    }
    bubble.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      bubble.dataset.state = "stopped";
      meta.textContent = "stopped";
    } else {
      bubble.dataset.state = "error";
      bubble.classList.add("error");
      meta.textContent = String(err.message || err);
    }
  } finally {
    state.history.push({ role: "assistant", content: pieces.join("") });
    state.controller = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
  }
}

$("#chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text || state.controller) return;
  $("#chat-input").value = "";
  send(text);
});
$("#chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("#chat-form").requestSubmit();
  }
});
$("#stop").addEventListener("click", () => state.controller && state.controller.abort());
$("#clear").addEventListener("click", () => { state.history = []; $("#messages").replaceChildren(); });

// -- swarm view ---------------------------------------------------------------------

function renderCoverage(view) {
  const table = $("#coverage");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", {}, "server"));
  for (let b = 0; b < view.num_blocks; b++) {
    head.append(el("th", { class: "block" + (view.coverage[b] ? "" : " gap"), title: `block ${b}` }, String(b)));
  }
  table.append(head);
  for (const s of view.servers) {
    const row = el("tr", { class: "server", "data-peer": s.peer_id });
    row.append(el("td", { class: "name" }, `${short(s.peer_id)} ${s.addrs[0] || ""}`));
    for (let b = 0; b < view.num_blocks; b++) {
      const on = s.blocks[0] <= b && b < s.blocks[1];
      const cls = on ? (s.banned ? "block banned" : "block served") : view.coverage[b] ? "block" : "block gap";
      row.append(el("td", { class: cls, title: on ? `${short(s.peer_id)} serves block ${b}` : `block ${b}` }));
    }
    table.append(row);
  }
  const counts = el("tr", { class: "count" });
  counts.append(el("td", {}, "servers"));
  for (let b = 0; b < view.num_blocks; b++) {
    counts.append(el("td", { class: view.coverage[b] ? "" : "gap" }, String(view.coverage[b])));
  }
  table.append(counts);
}

function renderServers(view) {
  const tbody = $("#servers tbody");
  tbody.replaceChildren();
  for (const s of view.servers) {
    const row = el("tr");
    const rep = s.reputation == null ? "?" : s.reputation.toFixed(2);
    const cells = [short(s.peer_id), s.addrs.join(", "), `${s.blocks[0]}:${s.blocks[1]}`,
      `${s.throughput.toFixed(1)} tok/s`, String(s.free_sessions),
      s.latency == null ? "—" : `${(s.latency * 1000).toFixed(1)} ms`, rep, s.banned ? "BANNED" : "no",
      `${fmtAgo(s.age)} ago`, fmtAgo(s.expires_in)];
    cells.forEach((text, i) => row.append(el("td", i === 7 && s.banned ? { class: "bad" } : {}, text)));
    tbody.append(row);
  }
}

function renderCredit(view) {
  const tbody = $("#credit tbody");
  tbody.replaceChildren();
  for (const c of view.credit) {
    const row = el("tr");
    for (const text of [short(c.peer_id), String(c.credit), String(c.work_for_us), String(c.work_for_them)]) {
      row.append(el("td", {}, text));
    }
    tbody.append(row);
  }
  if (!view.credit.length) {
    const row = el("tr");
    row.append(el("td", { colspan: "4" }, "no receipts yet: serve blocks to earn credit"));
    tbody.append(row);
  }
}

async function refreshSwarm() {
  if ($("#page-swarm").hidden) return;
  try {
    const response = await fetch(`/api/swarm?model=${encodeURIComponent(state.model || "")}`);
    const view = await response.json();
    if (!response.ok) throw new Error((view.error && view.error.message) || `HTTP ${response.status}`);
    const gaps = view.gaps.map(([s, e]) => `${s}..${e - 1}`);
    $("#swarm-summary").innerHTML = "";
    $("#swarm-summary").append(
      `${view.name || view.model}: ${view.num_blocks} blocks, ${view.servers.length} server(s); this peer `,
      el("code", {}, short(view.peer_id)), ". ",
      gaps.length ? el("span", { class: "bad", id: "gaps" }, `Gaps: blocks ${gaps.join(", ")} are not served.`)
                  : el("span", { class: "good", id: "gaps" }, "Every block is served."));
    renderCoverage(view);
    renderServers(view);
    $("#bans").textContent = view.banned && view.banned.length
      ? view.banned.map((b) => `${short(b.peer_id)}: ${b.reason}`).join("; ") : "none";
    renderCredit(view);
    $("#refreshed").textContent = `refreshed ${new Date().toLocaleTimeString()}`;
    $("#page-swarm").dataset.loaded = "true";
  } catch (err) {
    $("#swarm-summary").textContent = `cannot read the swarm: ${err.message || err}`;
  }
}

// -- start ----------------------------------------------------------------------------

async function start() {
  try {
    const models = await (await fetch("/v1/models")).json();
    for (const m of models.data) $("#model").append(el("option", { value: m.id }, m.id));
    state.model = models.data.length ? models.data[0].id : null;
  } catch (err) { /* the chat shows the error on first send */ }
  $("#model").addEventListener("change", () => { state.model = $("#model").value; refreshSwarm(); });
  showPage();
  setInterval(refreshSwarm, 2000);
}
start();
