// A conversation's messages as DOM elements: the user's text as typed, replies as safe markdown
// (markdown.js) with their stats, and the Regenerate / Edit actions on the last exchange.
"use strict";

const GemmarunMessages = (() => {
  // hooks: {container, scroller (the scrolling element), model() (the model card or null),
  //         busy() (a request in flight), onRegenerate(conv), onResend(conv, index, text)}
  function create(hooks) {
    function statsText(s) {
      if (!s) return "";
      const parts = [];
      if (s.tokens != null) parts.push(`${s.tokens} tokens`);
      else if (s.pieces != null) parts.push(`${s.pieces} pieces`);
      if (s.tps != null) parts.push(`${s.tps.toFixed(1)} tokens/s`);
      if (s.prompt != null) parts.push(`prompt ${s.prompt}${hooks.model() ? " / " + hooks.model().context_length : ""} tokens`);
      if (s.stopped) parts.push("stopped");
      else if (s.error) parts.push("failed");
      else if (s.finish) parts.push(s.finish === "length" ? "cut at max tokens" : "finished");
      return parts.join(" \u00B7 ");
    }

    function addCopyButtons(body) {
      for (const pre of body.querySelectorAll("pre")) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "copy";
        b.textContent = pre.dataset.lang ? pre.dataset.lang + " \u00B7 copy" : "copy";
        b.addEventListener("click", () => {
          const text = pre.querySelector("code").textContent;
          if (navigator.clipboard) navigator.clipboard.writeText(text).then(() => { b.textContent = "copied"; }, () => {});
        });
        pre.prepend(b);
      }
    }

    function fillBody(body, m) {
      if (m.role === "assistant") {
        GemmarunMarkdown.renderInto(body, m.content);
        addCopyButtons(body);
      } else {
        body.textContent = m.content;  // the user's text, as typed
      }
    }

    function messageElement(conv, m, index) {
      const div = document.createElement("div");
      div.className = "msg " + m.role;
      const who = document.createElement("div");
      who.className = "who";
      who.textContent = m.role === "user" ? "You" : hooks.model() ? hooks.model().id : "Model";
      const body = document.createElement("div");
      body.className = "body";
      fillBody(body, m);
      div.append(who, body);
      const last = index === conv.messages.length - 1;
      const lastUser = m.role === "user" && conv.messages.slice(index + 1).every((x) => x.role === "assistant");
      if (m.role === "assistant") {
        const stats = document.createElement("div");
        stats.className = "stats small";
        stats.textContent = statsText(m.stats);
        div.appendChild(stats);
      }
      const actions = document.createElement("div");
      actions.className = "actions";
      if (last && m.role === "assistant") actions.appendChild(actionButton("Regenerate", "regenerate", () => hooks.onRegenerate(conv)));
      if (lastUser) actions.appendChild(actionButton("Edit", "edit", () => startEdit(conv, index, div)));
      if (actions.childNodes.length) div.appendChild(actions);
      return div;
    }

    function actionButton(label, cls, onClick) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "small-button " + cls;
      b.textContent = label;
      b.addEventListener("click", () => {
        if (!hooks.busy()) onClick();
      });
      return b;
    }

    function render(conv) {
      const scroller = hooks.scroller;
      const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
      hooks.container.replaceChildren(...conv.messages.map((m, i) => messageElement(conv, m, i)));
      if (!conv.messages.length) {
        const p = document.createElement("p");
        p.className = "hint empty";
        p.textContent = "Say something. Enter sends, Shift+Enter starts a new line, Escape stops a reply.";
        hooks.container.appendChild(p);
      }
      if (nearBottom || hooks.busy()) scroller.scrollTop = scroller.scrollHeight;
    }

    function startEdit(conv, index, div) {
      const box = document.createElement("textarea");
      box.className = "edit-box";
      box.value = conv.messages[index].content;
      box.rows = Math.min(10, box.value.split("\n").length + 1);
      const resend = actionButton("Send", "edit-send", () => {
        if (!box.value.trim()) return;
        hooks.onResend(conv, index, box.value);
      });
      const cancel = actionButton("Cancel", "edit-cancel", () => render(conv));
      box.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
          e.preventDefault();
          resend.click();
        } else if (e.key === "Escape") cancel.click();
      });
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.append(resend, cancel);
      div.querySelector(".body").replaceChildren(box);
      const old = div.querySelector(".actions");
      if (old) old.remove();
      div.appendChild(actions);
      box.focus();
    }

    return { render, fillBody, statsText };
  }

  return { create };
})();
window.GemmarunMessages = GemmarunMessages;
