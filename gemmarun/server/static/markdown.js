// Markdown to DOM nodes, safely: every piece of model text goes in through createTextNode /
// textContent, never as HTML, so "<script>" or "<img onerror=...>" in a reply shows as text.
// Covers what chat models write: fenced code blocks, inline code, bold, italic, links (http,
// https and mailto only), headings, lists, quotes, rules and paragraphs (single newlines kept).
"use strict";

const GemmarunMarkdown = (() => {
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const SAFE_LINK = /^(https?:|mailto:)/i;
  // One inline construct per alternative; the groups are read in `inline` below.
  const INLINE = new RegExp([
    "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",  // 1, 2: code
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",  // 3: bold
    "(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])",  // 4: bold
    "\\*(?=[^\\s*])([^*]*?[^\\s*])\\*",  // 5: italic
    "(?<![\\w])_(?=[^\\s_])([^_]*?[^\\s_])_(?![\\w])",  // 6: italic
    "\\[([^\\]\\n]+)\\]\\(([^)\\s]+)\\)",  // 7, 8: link
  ].join("|"), "g");

  function el(tag, cls) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    return node;
  }

  // Inline markup of one line of text into `parent`.
  function inline(parent, text) {
    let last = 0;
    INLINE.lastIndex = 0;
    for (let m; (m = INLINE.exec(text)) !== null;) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      last = INLINE.lastIndex;
      let node;
      if (m[2] !== undefined) {
        node = el("code");
        node.textContent = m[2];
      } else if (m[3] !== undefined || m[4] !== undefined) {
        node = el("strong");
        inline(node, m[3] !== undefined ? m[3] : m[4]);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        node = el("em");
        inline(node, m[5] !== undefined ? m[5] : m[6]);
      } else if (SAFE_LINK.test(m[8])) {
        node = el("a");
        node.setAttribute("href", m[8]);
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
        inline(node, m[7]);
      } else {
        node = document.createTextNode(m[0]);  // javascript:, data: and other links stay text
      }
      parent.appendChild(node);
      INLINE.lastIndex = last;  // the recursive calls above reset the shared regex
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  // Lines joined with <br>, each with its inline markup.
  function lines(parent, list) {
    list.forEach((line, i) => {
      if (i) parent.appendChild(el("br"));
      inline(parent, line);
    });
  }

  function codeBlock(lang, body) {
    const pre = el("pre");
    const code = el("code");
    if (lang) pre.dataset.lang = lang;
    code.textContent = body.join("\n");
    pre.appendChild(code);
    return pre;
  }

  // Block structure of `text` into a DocumentFragment.
  function render(text) {
    const out = document.createDocumentFragment();
    blocks(out, String(text).replace(/\r\n?/g, "\n").split("\n"));
    return out;
  }

  function blocks(out, src) {
    let i = 0;
    let para = [];
    const flush = () => {
      if (para.length) {
        const p = el("p");
        lines(p, para);
        out.appendChild(p);
        para = [];
      }
    };
    while (i < src.length) {
      const line = src[i];
      let m;
      if ((m = FENCE.exec(line))) {
        flush();
        const close = m[1];
        const body = [];
        i++;
        // An unclosed fence (a reply still streaming) runs to the end.
        while (i < src.length && !(src[i].trim().startsWith(close[0].repeat(close.length)) && src[i].trim().replace(/[`~]/g, "") === "")) {
          body.push(src[i++]);
        }
        i++;
        out.appendChild(codeBlock(m[2], body));
      } else if (!line.trim()) {
        flush();
        i++;
      } else if ((m = HEADING.exec(line))) {
        flush();
        const h = el("h" + Math.min(m[1].length + 2, 6));
        inline(h, m[2]);
        out.appendChild(h);
        i++;
      } else if (RULE.test(line)) {
        flush();
        out.appendChild(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        flush();
        const inner = [];
        while (i < src.length && (m = QUOTE.exec(src[i]))) {
          inner.push(m[1]);
          i++;
        }
        const q = el("blockquote");
        blocks(q, inner);
        out.appendChild(q);
      } else if ((m = ITEM.exec(line))) {
        flush();
        const ordered = /\d/.test(m[2]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered && parseInt(m[2], 10) !== 1) list.setAttribute("start", String(parseInt(m[2], 10)));
        while (i < src.length && (m = ITEM.exec(src[i])) && /\d/.test(m[2]) === ordered) {
          const li = el("li");
          const body = [m[3]];
          i++;
          // Indented lines that are not items continue the item.
          while (i < src.length && /^\s{2,}\S/.test(src[i]) && !ITEM.test(src[i]) && !FENCE.test(src[i])) {
            body.push(src[i++].trim());
          }
          lines(li, body);
          list.appendChild(li);
        }
        out.appendChild(list);
      } else {
        para.push(line);
        i++;
      }
    }
    flush();
  }

  // Replace the children of `node` with the rendering of `text`.
  function renderInto(node, text) {
    node.replaceChildren(render(text));
  }

  return { render, renderInto };
})();
window.GemmarunMarkdown = GemmarunMarkdown;
