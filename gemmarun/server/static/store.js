// Conversations, settings and the API key, kept in this browser's localStorage.
"use strict";

const GemmarunStore = (() => {
  const KEY = "gemmarun.chat.v1";
  const KEY_API = "gemmarun.apiKey";
  const DEFAULTS = { temperature: 0.8, top_p: 0.95, max_tokens: 512, seed: null };

  function uid() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  // A conversation: chat messages [{role, content, stats}] and, for completion mode, a document.
  function blank(mode) {
    return { id: uid(), title: "New conversation", system: "", mode, messages: [], document: "", updated: Date.now() };
  }

  function read() {
    try {
      const data = JSON.parse(localStorage.getItem(KEY) || "null");
      if (data && Array.isArray(data.conversations)) {
        data.settings = { ...DEFAULTS, ...(data.settings || {}) };
        return data;
      }
    } catch (e) { /* a broken entry: start afresh rather than fail to load */ }
    return { conversations: [], current: null, settings: { ...DEFAULTS } };
  }

  const state = read();

  function save() {
    try {
      localStorage.setItem(KEY, JSON.stringify(state));
      return null;
    } catch (e) {
      return "Could not save the conversations in this browser: " + e.message;  // quota full
    }
  }

  function current() {
    return state.conversations.find((c) => c.id === state.current) || null;
  }

  function create(mode) {
    const c = blank(mode);
    state.conversations.unshift(c);
    state.current = c.id;
    return c;
  }

  function select(id) {
    if (state.conversations.some((c) => c.id === id)) state.current = id;
  }

  function rename(id, title) {
    const c = state.conversations.find((x) => x.id === id);
    if (c && title.trim()) c.title = title.trim().slice(0, 200);
  }

  function remove(id) {
    state.conversations = state.conversations.filter((c) => c.id !== id);
    if (state.current === id) state.current = state.conversations.length ? state.conversations[0].id : null;
  }

  function apiKey() {
    return localStorage.getItem(KEY_API) || "";
  }

  function setApiKey(key) {
    if (key) localStorage.setItem(KEY_API, key);
    else localStorage.removeItem(KEY_API);
  }

  return { state, save, current, create, select, rename, remove, apiKey, setApiKey, DEFAULTS };
})();
window.GemmarunStore = GemmarunStore;
