// The server's own OpenAI endpoints: JSON requests with the API key as a Bearer token, and
// streamed replies read as server-sent events from fetch's ReadableStream.
"use strict";

const GemmarunAPI = (() => {
  class APIError extends Error {
    constructor(status, message, code, type) {
      super(message);
      this.status = status;  // HTTP status; 0 when the server could not be reached
      this.code = code || null;  // OpenAI's error code, e.g. context_length_exceeded
      this.type = type || null;
    }
  }

  function headers(key, json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // OpenAI's {"error": {message, code}} body, or the status line when the body is something else.
  async function errorFrom(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (e) { /* not JSON */ }
    const err = body && body.error;
    if (err && typeof err.message === "string") return new APIError(response.status, err.message, err.code, err.type);
    return new APIError(response.status, `${response.status} ${response.statusText || "error"}`);
  }

  async function send(path, init) {
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new APIError(0, "The server cannot be reached (" + e.message + ")");
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async function getJSON(path, key) {
    return (await send(path, { headers: headers(key, false) })).json();
  }

  // Each `data:` event of a text/event-stream body, parsed as JSON, until `data: [DONE]`.
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (!data) continue;
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
        if (done) return;
      }
    } finally {
      reader.releaseLock();
    }
  }

  // POST a streamed request; onChunk gets every chunk. Rejects with APIError, or AbortError on stop.
  async function stream(path, body, key, signal, onChunk) {
    const response = await send(path, {
      method: "POST", headers: headers(key, true), body: JSON.stringify({ ...body, stream: true }), signal,
    });
    for await (const chunk of events(response)) {
      if (chunk.error) throw new APIError(500, chunk.error.message, chunk.error.code, chunk.error.type);
      onChunk(chunk);
    }
  }

  return { APIError, getJSON, stream, events };
})();
window.GemmarunAPI = GemmarunAPI;
