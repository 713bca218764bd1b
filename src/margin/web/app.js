// margin web page: ask, stream the answer, show provenance; admins switch the active index.
// No framework, no CDN: the page works offline. All text goes in with textContent (no HTML).
"use strict";

const COLOURS = 8; // .c0 ... .c7 in app.css; passage i gets colour i % COLOURS
const $ = (id) => document.getElementById(id);

function show(id, visible) { $(id).hidden = !visible; }

function showError(message) {
  $("error").textContent = message;
  show("error", Boolean(message));
}

async function refreshIndexes() {
  const res = await fetch("/v1/indexes");
  const body = await res.json();
  $("index-id").textContent = body.active.id;
  $("index-version").textContent = body.active.version;
  const select = $("index-select");
  select.replaceChildren();
  for (const entry of body.indexes) {
    const option = document.createElement("option");
    option.value = entry.id;
    option.textContent = `${entry.id} (${entry.version})`;
    option.selected = entry.active;
    select.append(option);
  }
}

function bar(kind, label, value) {
  const row = document.createElement("div");
  row.className = `bar-row ${kind}`;
  const name = document.createElement("span");
  name.className = "label";
  name.textContent = `${label} ${value.toFixed(2)}`;
  const track = document.createElement("span");
  track.className = "bar";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.display = "block";
  fill.style.width = `${Math.round(100 * value)}%`;
  fill.dataset.value = String(value);
  track.append(fill);
  row.append(name, track);
  return row;
}

function renderAnswer(answer) {
  $("answer").textContent = answer.answer;
  $("logprob").textContent = answer.logprob.toFixed(3);
  $("answer-index").textContent = `${answer.index}@${answer.index_version}`;
  const list = $("passages");
  list.replaceChildren();
  answer.passages.forEach((p, i) => {
    const item = document.createElement("li");
    item.className = "passage";
    item.dataset.id = p.id;
    const head = document.createElement("div");
    const swatch = document.createElement("span");
    swatch.className = `swatch c${i % COLOURS}`;
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = p.title;
    head.append(swatch, title);
    const text = document.createElement("p");
    text.className = "text";
    text.textContent = p.text;
    item.append(head, text, bar("prior", "prior", p.prior), bar("posterior", "posterior", p.posterior));
    list.append(item);
  });
  const tokens = $("tokens");
  tokens.replaceChildren();
  const shown = (answer.token_docs || []).filter((t) => t.token.trim() !== "");
  for (const t of shown) {
    const span = document.createElement("span");
    span.className = `token c${t.passage % COLOURS}`;
    span.dataset.passage = String(t.passage);
    span.title = answer.passages[t.passage] ? answer.passages[t.passage].title : "";
    span.textContent = t.token;
    tokens.append(span);
  }
  show("tokens-box", shown.length > 0);
}

// Read server-sent events from a fetch response (EventSource cannot POST).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { name, data: JSON.parse(data) };
    }
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  showError("");
  show("result", true);
  show("tokens-box", false);
  $("answer").textContent = "";
  $("passages").replaceChildren();
  $("status").textContent = "Retrieving and decoding…";
  $("ask").disabled = true;
  const request = {
    question, mode: $("mode").value, k: Number($("k").value), decoding: "greedy", stream: true,
  };
  try {
    const res = await fetch("/v1/ask", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request),
    });
    if (!res.ok) {
      const body = await res.json();
      throw new Error(body.error || res.statusText);
    }
    for await (const ev of events(res)) {
      if (ev.name === "token") $("answer").textContent += ev.data.text;
      else if (ev.name === "answer") renderAnswer(ev.data.answers[0]);
      else if (ev.name === "error") throw new Error(ev.data.error);
    }
    $("status").textContent = "Done.";
  } catch (err) {
    $("status").textContent = "";
    showError(String(err.message || err));
  } finally {
    $("ask").disabled = false;
  }
}

async function switchIndex() {
  const res = await fetch("/v1/indexes/active", {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Authorization: `Bearer ${$("admin-token").value}`,
    },
    body: JSON.stringify({ index: $("index-select").value }),
  });
  const body = await res.json();
  // refresh first: it rebuilds the selector, so the status (what a user or a test waits for)
  // appears only once the page shows the server's state
  await refreshIndexes();
  $("admin-status").textContent = res.ok
    ? `active: ${body.active.id} (${body.active.version})`
    : `refused: ${body.error}`;
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("switch").addEventListener("click", switchIndex);
  refreshIndexes().catch((err) => showError(`cannot reach the server: ${err}`));
});
