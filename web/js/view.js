// Rendering: every text a user wrote goes through textContent, never HTML.

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

export function time(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  const now = new Date();
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return d.toDateString() === now.toDateString() ? hm : `${d.toLocaleDateString()} ${hm}`;
}

export function lastSeen(p) {
  if (!p) return "";
  if (p.online) return "online";
  return p.last_seen ? `last seen ${time(p.last_seen)}` : "offline";
}

let toastTimer = null;
export function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (t.hidden = true), 5000);
}

// Plain words for the protocol's error codes (docs/protocol.md §10).
export function explain(e) {
  const words = {
    not_member: "You are not a member of this chat.",
    unknown_chat: "This chat does not exist.",
    unknown_user: "No such user.",
    too_large: "That is too large.",
    quota_exceeded: "Your storage quota is full.",
    rate_limited: "Sending too fast; retrying.",
    unavailable: "The cluster is busy; retrying.",
    forbidden: "That is not allowed.",
    group_full: "The group is full.",
    unknown_file: "That file is not available.",
    unauthorized: "This token is unknown or disabled.",
    disconnected: "Not connected; it will be retried.",
  };
  const w = words[e.code];
  return w ? `${w} (${e.message})` : e.message || String(e);
}

// A modal form: `fields` [{id, label, value, placeholder}], `body` extra nodes. Resolves
// with the values, or null when cancelled (Esc, Cancel). `check(values)` may return an
// error text to keep it open.
export function ask({ title, fields = [], body = [], ok = "OK", check }) {
  const d = $("dialog");
  $("dialog-title").textContent = title;
  const b = $("dialog-body");
  b.replaceChildren();
  for (const f of fields) {
    b.append(
      el("label", { for: `f-${f.id}`, text: f.label }),
      el("input", { id: `f-${f.id}`, type: "text", value: f.value || "", placeholder: f.placeholder || "", autocomplete: "off" }),
    );
  }
  b.append(...body);
  $("dialog-ok").textContent = ok;
  $("dialog-ok").hidden = !ok;
  const err = $("dialog-error");
  err.hidden = true;
  return new Promise((resolve) => {
    const done = (v) => {
      $("dialog-form").onsubmit = null;
      $("dialog-cancel").onclick = null;
      d.onclose = null;
      if (d.open) d.close();
      resolve(v);
    };
    $("dialog-form").onsubmit = async (ev) => {
      ev.preventDefault();
      const values = Object.fromEntries(fields.map((f) => [f.id, $(`f-${f.id}`).value.trim()]));
      const problem = check ? await check(values) : null;
      if (problem) {
        err.textContent = problem;
        err.hidden = false;
        return;
      }
      done(values);
    };
    $("dialog-cancel").onclick = () => done(null);
    d.onclose = () => done(null);
    d.showModal();
    const first = b.querySelector("input");
    if (first) first.focus();
  });
}

export function closeDialog() {
  const d = $("dialog");
  if (d.open) d.close();
}
