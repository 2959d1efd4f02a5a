// scratchlm playground: sends the prompt to this server's OpenAI-compatible API with
// `stream: true` and appends each server-sent event's text as it arrives (fetch +
// ReadableStream; no libraries, no build step, no network access beyond this server).
"use strict";

const $ = (id) => document.getElementById(id);
let modelName = null;
let controller = null; // AbortController of the request in flight

function setStatus(text, state) {
  const s = $("status");
  s.textContent = text;
  s.dataset.state = state;
  s.classList.toggle("error", state === "error");
}

async function loadModel() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    modelName = h.model;
    $("model").textContent = `${h.model} · context ${h.context_length} tokens · ${h.max_batch} slots`;
    $("api-key-row").hidden = !h.auth;
    $("max_tokens").max = h.context_length - 1;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

function requestBody() {
  const mode = $("mode").value;
  const prompt = $("prompt").value;
  const body = {
    model: modelName,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  const topK = Number($("top_k").value);
  if (topK > 0) body.top_k = topK;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  // The stop box takes escapes such as \n so that a newline can be typed on one line.
  const stop = $("stop").value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  if (stop) body.stop = [stop];
  if (mode === "chat") {
    body.messages = [{ role: "user", content: prompt }];
    return ["/v1/chat/completions", body];
  }
  body.prompt = prompt;
  return ["/v1/completions", body];
}

// Yields the JSON payload of every `data:` event of an SSE response body.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function generate() {
  const [url, body] = requestBody();
  const out = $("output");
  out.textContent = "";
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  setStatus("generating…", "running");
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value;
  if (key) headers.Authorization = `Bearer ${key}`;
  const t0 = performance.now();
  let finish = null;
  let usage = null;
  try {
    const response = await fetch(url, {
      method: "POST", headers, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${response.status}`);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const text = choice.delta ? choice.delta.content : choice.text;
        if (text) out.textContent += text;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    const seconds = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : 0;
    setStatus(`done (${finish}) · ${n} tokens in ${seconds.toFixed(2)} s · ` +
              `${(n / seconds).toFixed(1)} tokens/s`, "done");
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped", "stopped");
    else setStatus(`error: ${e.message}`, "error");
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop-button").disabled = true;
  }
}

for (const id of ["temperature", "top_p"]) {
  $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
}
$("generate").addEventListener("click", generate);
$("stop-button").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
});
loadModel();
