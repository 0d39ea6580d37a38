// The chat page: streams answers from /v1/chat/completions and keeps the conversation in memory.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere, so it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // the conversation sent with every question: {role, content}
let modelId = null;
let controller = null;  // aborts the answer being streamed (Stop, New chat)
let conversation = 0;  // bumped by New chat, so an answer still arriving is not added to the next one

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const node = document.createElement("div");
  node.className = "message " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;  // text only: a model's answer is never parsed as HTML
  node.appendChild(body);
  $("log").appendChild(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function setMeta(node, text) {
  let meta = node.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta muted";
    node.appendChild(meta);
  }
  meta.textContent = text;
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    const model = body.data[0];
    modelId = model.id;
    $("model").textContent = `${model.id} · ${model.variant} on ${model.provider}`;
  } catch (error) {
    $("model").textContent = "not connected: " + error.message + " (API key in Settings?)";
  }
}

// Reads server-sent events from a fetch response; calls onEvent with each parsed data object.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : [...history];
  return {
    model: modelId,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
}

async function ask(question) {
  if (!modelId) await loadModel();
  const mine = conversation;
  history.push({ role: "user", content: question });
  addMessage("user", question);
  const node = addMessage("assistant", "");
  node.dataset.state = "streaming";
  const text = node.querySelector(".text");
  const started = performance.now();
  let firstAt = null;
  let usage = null;
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (firstAt === null) firstAt = performance.now();
        text.textContent += delta.content;
        node.scrollIntoView({ block: "end" });
      }
    });
    node.dataset.state = "done";
  } catch (error) {
    node.dataset.state = error.name === "AbortError" ? "stopped" : "error";
    if (node.dataset.state === "error") node.classList.add("error");
    setMeta(node, node.dataset.state === "error" ? "error: " + error.message : "stopped");
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  if (mine !== conversation) return;
  history.push({ role: "assistant", content: text.textContent });
  if (node.dataset.state === "done") setMeta(node, speed(usage, started, firstAt, performance.now()));
}

// "42 tokens · 25.3 tokens/s · first token after 0.31 s": the decode speed counts the tokens after the first.
function speed(usage, started, firstAt, ended) {
  if (!usage || firstAt === null) return "";
  const tokens = usage.completion_tokens;
  const seconds = (ended - firstAt) / 1000;
  const rate = tokens > 1 && seconds > 0 ? ((tokens - 1) / seconds).toFixed(1) : "–";
  return `${tokens} tokens · ${rate} tokens/s · first token after ${((firstAt - started) / 1000).toFixed(2)} s`;
}

function newChat() {
  if (controller) controller.abort();
  conversation += 1;
  history.length = 0;
  $("log").replaceChildren();
  $("status").textContent = "";
}

document.addEventListener("DOMContentLoaded", () => {
  loadModel();
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question || controller) return;
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("api-key").addEventListener("change", loadModel);
});
