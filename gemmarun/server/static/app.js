// The chat page: conversations (store.js), streamed replies (api.js), safe markdown (markdown.js).
"use strict";

(() => {
  const store = GemmarunStore;
  const api = GemmarunAPI;
  const $ = (id) => document.getElementById(id);
  const ui = {
    sidebar: $("sidebar"), list: $("conversations"), newChat: $("new-chat"), modelName: $("model-name"),
    modelContext: $("model-context"), modeHint: $("mode-hint"), settings: $("settings"), toggleSettings: $("toggle-settings"),
    system: $("system-prompt"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"), seed: $("seed"),
    keyBanner: $("key-banner"), keyInput: $("api-key"), settingsKey: $("settings-api-key"), chatView: $("chat-view"),
    messages: $("messages"), completionView: $("completion-view"), doc: $("document"), error: $("error"),
    stats: $("stats"), input: $("input"), send: $("send"), stop: $("stop"), redo: $("regenerate-doc"),
  };

  let model = null;  // the server's model card: {id, context_length, chat_template}
  let busy = null;  // the request in flight: {conv, controller}

  // -- the model and the mode that suits it ------------------------------------------------

  // Chat suits a checkpoint that ships a chat template or is named as instruction-tuned (-it).
  function suggestMode(card) {
    if (!card) return "chat";
    return card.chat_template || /(^|[-_.])(it|instruct|chat)([-_.]|$)/i.test(card.id) ? "chat" : "completion";
  }

  function modeHint(card) {
    if (!card) return "";
    if (suggestMode(card) === "chat") {
      return card.chat_template ? `${card.id} ships a chat template: chat mode suits it.`
        : `${card.id} is named as instruction-tuned: chat mode suits it.`;
    }
    return `${card.id} looks pretrained (no chat template, no -it in its name): completion mode suits it; ` +
      "it does not follow chat turns.";
  }

  async function loadModel() {
    try {
      const list = await api.getJSON("/v1/models", store.apiKey());
      model = list.data[0];
      ui.modelName.textContent = model.id;
      ui.modelContext.textContent = model.context_length ? `context ${model.context_length} tokens` : "";
      ui.keyBanner.hidden = true;
      hideError();
    } catch (e) {
      model = null;
      ui.modelName.textContent = "no model";
      showError(e);
    }
    renderHint();
  }

  function renderHint() {
    const conv = store.current();
    ui.modeHint.textContent = modeHint(model);
    ui.modeHint.classList.toggle("mismatch", !!(model && conv && conv.mode !== suggestMode(model)));
  }

  // -- errors --------------------------------------------------------------------------------

  function describe(e) {
    const where = e.status ? `Error ${e.status}` : "Error";
    let text = `${where}${e.code ? " (" + e.code + ")" : ""}: ${e.message}`;
    if (e.status === 503) text += " Try again in a moment.";
    return text;
  }

  function showError(e) {
    ui.error.textContent = describe(e);
    ui.error.hidden = false;
    if (e.status === 401) {
      ui.keyBanner.hidden = false;
      ui.keyInput.focus();
    }
  }

  function hideError() {
    ui.error.hidden = true;
    ui.error.textContent = "";
  }

  function save() {
    const problem = store.save();
    if (problem) showError(new Error(problem));
  }

  // -- the conversation list ---------------------------------------------------------------

  function renderList() {
    ui.list.replaceChildren();
    for (const c of store.state.conversations) {
      const li = document.createElement("li");
      li.className = "conv" + (c.id === store.state.current ? " active" : "");
      li.dataset.id = c.id;
      const open = document.createElement("button");
      open.type = "button";
      open.className = "conv-title";
      open.textContent = c.title;
      open.title = c.title;
      open.addEventListener("click", () => {
        store.select(c.id);
        save();
        ui.sidebar.classList.remove("open");
        render();
      });
      const rename = document.createElement("button");
      rename.type = "button";
      rename.className = "icon conv-rename";
      rename.setAttribute("aria-label", "Rename");
      rename.textContent = "\u270E";
      rename.addEventListener("click", () => startRename(li, c));
      const del = document.createElement("button");
      del.type = "button";
      del.className = "icon conv-delete";
      del.setAttribute("aria-label", "Delete");
      del.textContent = "\u2715";
      del.addEventListener("click", () => {
        if (!del.classList.contains("confirm")) {  // a second click deletes
          del.classList.add("confirm");
          del.textContent = "Delete?";
          return;
        }
        if (busy && busy.conv === c) busy.controller.abort();
        store.remove(c.id);
        if (!store.current()) store.create(suggestMode(model));
        save();
        render();
      });
      del.addEventListener("blur", () => {  // asking again after looking away
        del.classList.remove("confirm");
        del.textContent = "\u2715";
      });
      li.append(open, rename, del);
      ui.list.appendChild(li);
    }
  }

  function startRename(li, c) {
    const input = document.createElement("input");
    input.className = "conv-rename-input";
    input.value = c.title;
    let done = false;
    const finish = (keep) => {
      if (done) return;
      done = true;
      if (keep) store.rename(c.id, input.value);
      save();
      renderList();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") finish(true);
      else if (e.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  // -- messages (messages.js) ---------------------------------------------------------------

  const messageView = GemmarunMessages.create({
    container: ui.messages, scroller: ui.chatView, model: () => model, busy: () => !!busy,
    onRegenerate: (conv) => regenerate(conv),
    onResend: (conv, index, text) => {
      conv.messages = conv.messages.slice(0, index);
      conv.messages.push({ role: "user", content: text });
      runChat(conv);
    },
  });
  const statsText = messageView.statsText;

  function regenerate(conv) {
    while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
    if (conv.messages.length) runChat(conv);
  }

  // -- requests ----------------------------------------------------------------------------

  function samplingBody() {
    const s = store.state.settings;
    const body = { temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens, stream_options: { include_usage: true } };
    if (s.seed != null) body.seed = s.seed;
    if (model) body.model = model.id;
    return body;
  }

  // Streams one request; `onText` gets each piece. Returns the reply's stats.
  async function streamInto(conv, path, body, onText) {
    const controller = new AbortController();
    busy = { conv, controller };
    setBusy(true);
    hideError();
    const t0 = performance.now();
    let tFirst = null;
    let pieces = 0;
    const stats = {};
    try {
      await api.stream(path, body, store.apiKey(), controller.signal, (chunk) => {
        if (chunk.usage) {
          stats.tokens = chunk.usage.completion_tokens;
          stats.prompt = chunk.usage.prompt_tokens;
        }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        const text = choice.delta ? choice.delta.content : choice.text;
        if (text) {
          if (tFirst === null) tFirst = performance.now();
          pieces++;
          onText(text);
        }
        if (choice.finish_reason) stats.finish = choice.finish_reason;
      });
    } catch (e) {
      if (e.name === "AbortError") stats.stopped = true;
      else {
        stats.error = true;
        showError(e);
      }
    } finally {
      busy = null;
      setBusy(false);
    }
    const t1 = performance.now();
    if (stats.tokens == null) stats.pieces = pieces;
    // Decoding speed: tokens after the first over the time since the first (the prompt's reading
    // excluded); over the whole request when the text came in one burst (held back until the end, as
    // bytes that do not form UTF-8 yet are), where that span says nothing.
    const n = stats.tokens != null ? stats.tokens : pieces;
    if (tFirst !== null && n > 1 && t1 - tFirst > 100) stats.tps = (n - 1) / ((t1 - tFirst) / 1000);
    else if (n > 0 && t1 > t0) stats.tps = n / ((t1 - t0) / 1000);
    stats.seconds = (t1 - t0) / 1000;
    return stats;
  }

  async function runChat(conv) {
    const messages = conv.messages.map((m) => ({ role: m.role, content: m.content }));
    if (conv.system.trim()) messages.unshift({ role: "system", content: conv.system });
    const reply = { role: "assistant", content: "", stats: null };
    conv.messages.push(reply);
    conv.updated = Date.now();
    save();
    render();
    let scheduled = false;
    const stats = await streamInto(conv, "/v1/chat/completions", { ...samplingBody(), messages }, (text) => {
      reply.content += text;
      if (!scheduled) {  // one re-render a frame, however many pieces arrive in it
        scheduled = true;
        requestAnimationFrame(() => {
          scheduled = false;
          const el = store.current() === conv && conv.mode === "chat" ? ui.messages.lastElementChild : null;
          if (el && el.classList.contains("assistant")) {
            messageView.fillBody(el.querySelector(".body"), reply);
            ui.chatView.scrollTop = ui.chatView.scrollHeight;
          }
        });
      }
    });
    if (stats.error && !reply.content) conv.messages.pop();  // nothing came: the error box says why
    else reply.stats = stats;
    conv.lastStats = stats.error ? conv.lastStats : stats;
    save();
    if (store.current() === conv) render();
  }

  async function runCompletion(conv, prompt) {
    if (!prompt) return;
    conv.lastPrompt = prompt;
    conv.document = prompt;
    save();
    render();
    const stats = await streamInto(conv, "/v1/completions", { ...samplingBody(), prompt }, (text) => {
      conv.document += text;
      if (store.current() === conv) {
        ui.doc.value = conv.document;
        ui.doc.scrollTop = ui.doc.scrollHeight;
      }
    });
    conv.lastStats = stats.error ? conv.lastStats : stats;
    conv.updated = Date.now();
    save();
    if (store.current() === conv) render();
  }

  function titleOf(text) {
    return text.trim().replace(/\s+/g, " ").slice(0, 48);
  }

  function send() {
    if (busy) return;
    const conv = store.current();
    if (conv.mode === "completion") {
      conv.document = ui.doc.value;
      if (conv.title === "New conversation" && conv.document.trim()) conv.title = titleOf(conv.document);
      runCompletion(conv, conv.document);
      return;
    }
    const text = ui.input.value;
    if (!text.trim()) return;
    ui.input.value = "";
    if (!conv.messages.length && conv.title === "New conversation") conv.title = titleOf(text);
    conv.messages.push({ role: "user", content: text });
    runChat(conv);
  }

  function setBusy(on) {
    ui.send.hidden = on;
    ui.stop.hidden = !on;
    ui.redo.disabled = on;
    ui.doc.readOnly = !!(busy && busy.conv === store.current() && busy.conv.mode === "completion");
    document.body.classList.toggle("busy", on);
  }

  // -- the whole view ----------------------------------------------------------------------

  function renderSettings(conv) {
    const s = store.state.settings;
    ui.system.value = conv.system;
    ui.temperature.value = s.temperature;
    ui.topP.value = s.top_p;
    ui.maxTokens.value = s.max_tokens;
    ui.seed.value = s.seed == null ? "" : s.seed;
    ui.settingsKey.value = store.apiKey();
  }

  function render() {
    let conv = store.current();
    if (!conv) conv = store.create(suggestMode(model));
    renderList();
    renderSettings(conv);
    renderHint();
    const completion = conv.mode === "completion";
    for (const b of document.querySelectorAll("#mode-switch button")) b.classList.toggle("active", b.dataset.mode === conv.mode);
    ui.chatView.hidden = completion;
    ui.completionView.hidden = !completion;
    ui.input.hidden = completion;
    ui.send.textContent = completion ? "Generate" : "Send";
    ui.redo.hidden = !completion || !conv.lastPrompt;
    if (completion) {
      const streaming = !!(busy && busy.conv === conv);
      ui.doc.readOnly = streaming;  // the continuation is being written into it
      if (!streaming) ui.doc.value = conv.document;
    } else {
      messageView.render(conv);
    }
    document.body.classList.toggle("completion", completion);
    const s = conv.lastStats;
    if (completion) ui.stats.textContent = s ? "Last continuation: " + statsText(s) : "";
    else {
      ui.stats.textContent = s && s.prompt != null && model
        ? `Context: the last prompt took ${s.prompt} of ${model.context_length} tokens` +
          (s.tokens != null ? `, its reply ${s.tokens} more.` : ".")
        : "";
    }
  }

  function numberSetting(input, name, parse) {
    input.addEventListener("change", () => {
      const v = input.value.trim() === "" ? null : parse(input.value);
      store.state.settings[name] = v == null || Number.isNaN(v) ? (name === "seed" ? null : store.DEFAULTS[name]) : v;
      save();
      renderSettings(store.current());
    });
  }

  function saveKey(value) {
    store.setApiKey(value.trim());
    ui.keyInput.value = "";
    loadModel().then(render);
  }

  function wire() {
    ui.newChat.addEventListener("click", () => {
      store.create(suggestMode(model));
      save();
      ui.sidebar.classList.remove("open");
      render();
      ui.input.focus();
    });
    $("open-sidebar").addEventListener("click", () => ui.sidebar.classList.add("open"));
    $("close-sidebar").addEventListener("click", () => ui.sidebar.classList.remove("open"));
    ui.toggleSettings.addEventListener("click", () => {
      ui.settings.hidden = !ui.settings.hidden;
      ui.toggleSettings.setAttribute("aria-expanded", String(!ui.settings.hidden));
    });
    for (const b of document.querySelectorAll("#mode-switch button")) {
      b.addEventListener("click", () => {
        store.current().mode = b.dataset.mode;
        save();
        render();
      });
    }
    ui.system.addEventListener("input", () => {
      store.current().system = ui.system.value;
      save();
    });
    numberSetting(ui.temperature, "temperature", parseFloat);
    numberSetting(ui.topP, "top_p", parseFloat);
    numberSetting(ui.maxTokens, "max_tokens", (v) => parseInt(v, 10));
    numberSetting(ui.seed, "seed", (v) => parseInt(v, 10));
    // Forms (so browsers treat the key as a password field); submitting never leaves the page.
    ui.keyBanner.addEventListener("submit", (e) => {
      e.preventDefault();
      saveKey(ui.keyInput.value);
    });
    $("settings-key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      saveKey(ui.settingsKey.value);
    });
    ui.send.addEventListener("click", send);
    ui.stop.addEventListener("click", () => busy && busy.controller.abort());
    ui.redo.addEventListener("click", () => {
      const conv = store.current();
      if (!busy && conv.lastPrompt) runCompletion(conv, conv.lastPrompt);
    });
    ui.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send();
      }
    });
    ui.doc.addEventListener("input", () => {
      store.current().document = ui.doc.value;
      save();
    });
    ui.doc.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        send();
      }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && busy) busy.controller.abort();
    });
  }

  wire();
  render();
  loadModel().then(() => {
    const conv = store.current();
    // A conversation not begun yet takes the mode that suits the model.
    if (conv && !conv.messages.length && !conv.document && model) conv.mode = suggestMode(model);
    render();
    (conv && conv.mode === "completion" ? ui.doc : ui.input).focus();
  });
  window.GemmarunPage = { suggestMode, render: (text) => GemmarunMarkdown.render(text) };
})();
