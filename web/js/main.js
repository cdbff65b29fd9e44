// chatd's web client: speaks only the documented WebSocket protocol and HTTP file API
// (docs/protocol.md), as any third-party client would. State lives in memory; the token
// in sessionStorage (or localStorage when "remember me" is ticked).
import { Conn } from "./conn.js";
import * as files from "./files.js";
import { $, el, time, lastSeen, toast, explain, ask, closeDialog } from "./view.js";

const PAGE = 100;
const TYPING_SHOWN_MS = 4000;
const TYPING_SENT_EVERY_MS = 1000;
const PRESENCE_WATCH_MAX = 1024;
const RETRYABLE = new Set(["disconnected", "timeout", "unavailable", "outcome_unknown", "rate_limited", "internal"]);

const S = {
  token: null,
  me: null,
  conn: null,
  node: location.host,
  chats: new Map(),
  open: null,
  pending: new Map(), // client_msg_id -> {chat, text, files, failed, ts}
  editing: null, // {chat, seq, draft}: the message being edited
  presence: new Map(),
  watched: new Set(),
  typedAt: new Map(),
  syncing: false,
  nodeList: [],
};

// ---------- chats and messages ----------

function chatOf(id) {
  let c = S.chats.get(id);
  if (!c) {
    c = {
      id, kind: id.startsWith("d:") ? "direct" : id.startsWith("e:") ? "e2e" : "group", name: "", members: [],
      last_seq: 0, delivered: 0, read: 0, unread: 0,
      msgs: new Map(), H: 0, lo: 0, moreBefore: false, loadingOlder: false,
      cursors: new Map(), joins: new Map(), lastTs: 0, lastText: "", typing: new Map(),
      catching: false, again: false, sentDelivered: 0, sentRead: 0, known: false,
    };
    // A direct chat's members are in its id (d:<a>:<b>); sync says the same.
    if (c.kind === "direct") c.members = id.slice(2).split(":");
    S.chats.set(id, c);
  }
  return c;
}

// End-to-end encrypted chats (MLS): this client holds no keys, so it marks them and shows
// what their entries are, never their ciphertext (docs/protocol.md section 20).
function isE2e(c) {
  return c.kind === "e2e" || c.kind === "e2e_direct";
}

const E2E_KINDS = {
  mls_application: "🔒 Encrypted message",
  mls_commit: "🔒 Group keys changed",
  mls_welcome: "🔒 Welcome for new devices",
  mls_proposal: "🔒 Proposal",
};

function title(c) {
  if (isE2e(c)) {
    const others = c.members.filter((u) => u !== S.me);
    return `🔒 ${c.name || (others.length ? others.join(", ") : "Encrypted chat")}`;
  }
  if (c.kind === "direct") {
    const other = c.id.slice(2).split(":").find((u) => u !== S.me);
    return other || c.id;
  }
  return c.name || "Group";
}

function otherOf(c) {
  return c.kind === "direct" ? c.id.slice(2).split(":").find((u) => u !== S.me) : null;
}

// Stores one entry of the log and applies what it means (§9.2).
function store(c, m) {
  // Membership entries change the member list only when newer than what sync reported.
  const fresh = m.seq > c.last_seq;
  c.msgs.set(m.seq, m);
  if (m.kind === "edit" || m.kind === "delete") {
    const t = c.msgs.get(m.reply_to);
    if (t && t.kind === "text") {
      if (m.kind === "edit") c.msgs.set(t.seq, { ...t, text: m.text, edited_ts: m.ts });
      else c.msgs.set(t.seq, { ...t, kind: "deleted", text: "", files: undefined, edited_ts: m.ts });
    }
  } else if (m.kind === "join") {
    c.joins.set(m.text, Math.max(c.joins.get(m.text) || 0, m.seq));
    if (fresh && !c.members.includes(m.text)) c.members = [...c.members, m.text].sort();
  } else if (fresh && m.kind === "leave") {
    c.members = c.members.filter((u) => u !== m.text);
  }
  if (m.kind === "mls_application" && m.ts >= c.lastTs) {
    c.lastTs = m.ts;
    c.lastText = `${m.sender === S.me ? "You" : m.sender}: ${E2E_KINDS[m.kind]}`;
  }
  if ((m.kind === "text" || m.kind === "join" || m.kind === "leave") && m.ts >= c.lastTs) {
    c.lastTs = m.ts;
    c.lastText = m.kind === "text" ? `${m.sender === S.me ? "You" : m.sender}: ${m.text || (m.files ? "File: " + m.files.map((f) => f.name).join(", ") : "")}` : `${m.text} ${m.kind === "join" ? "joined" : "left"}`;
  }
  c.last_seq = Math.max(c.last_seq, m.seq);
  if (c.lo === 0 || m.seq < c.lo) c.lo = m.seq;
}

// Brings `c` up to its last seq: the newest page for a chat held from nothing, then every
// page after the contiguous high-water mark H (§13 step 5).
async function catchUp(c) {
  if (c.catching) {
    c.again = true;
    return;
  }
  c.catching = true;
  try {
    do {
      c.again = false;
      if (c.H === 0) {
        const p = await S.conn.request({ type: "history", chat: c.id, limit: PAGE });
        for (const m of p.messages) store(c, m);
        c.H = p.messages.length ? p.messages[p.messages.length - 1].seq : c.last_seq;
        c.lo = p.messages.length ? p.messages[0].seq : c.H;
        c.moreBefore = p.more;
      }
      for (;;) {
        const p = await S.conn.request({ type: "history", chat: c.id, after: c.H, limit: PAGE });
        for (const m of p.messages) store(c, m);
        if (p.messages.length) c.H = p.messages[p.messages.length - 1].seq;
        if (!p.more) break;
      }
    } while (c.again);
    c.known = true;
    await loadCursors(c);
  } catch (e) {
    if (e.code === "not_member") c.known = true;
    else if (!RETRYABLE.has(e.code)) toast(explain(e));
  } finally {
    c.catching = false;
  }
  sendReceipt(c);
  renderList();
  if (S.open === c.id) renderMessages();
}

function mergeCursor(c, user, delivered, read) {
  const old = c.cursors.get(user) || { delivered: 0, read: 0 };
  c.cursors.set(user, { delivered: Math.max(old.delivered, delivered), read: Math.max(old.read, read) });
}

// The other members' cursors as they stand (receipt pushes keep them from then on).
async function loadCursors(c) {
  if (!c.members.includes(S.me)) return;
  const r = await S.conn.request({ type: "cursors", chat: c.id });
  for (const x of r.cursors) mergeCursor(c, x.user, x.delivered, x.read);
}

async function loadOlder(c) {
  if (c.loadingOlder || !c.moreBefore || !c.lo) return;
  c.loadingOlder = true;
  renderMessages();
  const box = $("messages");
  const before = box.scrollHeight - box.scrollTop;
  try {
    const p = await S.conn.request({ type: "history", chat: c.id, before: c.lo, limit: PAGE });
    for (const m of p.messages) store(c, m);
    if (p.messages.length) c.lo = p.messages[0].seq;
    c.moreBefore = p.more;
  } catch (e) {
    toast(explain(e));
  } finally {
    c.loadingOlder = false;
  }
  if (S.open === c.id) {
    renderMessages({ keep: before });
  }
}

// Every page of `sync`, then each chat caught up (§13 steps 4-6).
async function syncAll() {
  if (S.syncing) return;
  S.syncing = true;
  try {
    let after;
    do {
      const page = await S.conn.request(after ? { type: "sync", after } : { type: "sync" });
      for (const s of page.chats) {
        const c = chatOf(s.chat);
        Object.assign(c, { kind: s.kind, name: s.name, members: s.members, unread: s.unread });
        c.delivered = Math.max(c.delivered, s.delivered);
        c.read = Math.max(c.read, s.read);
        c.last_seq = Math.max(c.last_seq, s.last_seq);
      }
      after = page.next;
    } while (after);
  } catch (e) {
    S.syncing = false;
    if (RETRYABLE.has(e.code)) setTimeout(() => S.conn && syncAll(), 1000);
    return;
  }
  S.syncing = false;
  if (S.resync) {
    S.resync = false;
    syncAll();
    return;
  }
  renderList();
  watchPresence();
  await Promise.all([...S.chats.values()].map((c) => (c.last_seq > c.H || !c.known ? catchUp(c) : null)));
  if (S.open) openChat(S.open, { keepFocus: true });
}

// ---------- sending ----------

// Unacknowledged sends survive a reload of the tab (sessionStorage): they are resent with
// their client_msg_id on the next `ready`, which the server deduplicates.
function savePending() {
  const rows = [...S.pending].map(([id, p]) => [id, { chat: p.chat, text: p.text, files: p.files, failed: p.failed || null, ts: p.ts }]);
  try {
    sessionStorage.setItem("chatd.pending", JSON.stringify(rows));
  } catch {
    /* storage full or off: kept in memory only */
  }
}

function loadPending() {
  try {
    for (const [id, p] of JSON.parse(sessionStorage.getItem("chatd.pending") || "[]")) {
      S.pending.set(id, { ...p, failed: p.failed || undefined });
    }
  } catch {
    /* nothing usable */
  }
}

function newClientMsgId() {
  const r = crypto.getRandomValues(new Uint32Array(3));
  return `w-${Date.now().toString(36)}-${[...r].map((x) => x.toString(36)).join("")}`;
}

async function sendPending(id) {
  const p = S.pending.get(id);
  if (!p || p.inflight) return;
  p.inflight = true;
  const frame = { type: "send", chat: p.chat, client_msg_id: id, text: p.text };
  if (p.files.length) frame.files = p.files;
  try {
    const ack = await S.conn.request(frame);
    S.pending.delete(id);
    savePending();
    const c = chatOf(p.chat);
    if (!c.msgs.has(ack.seq)) {
      store(c, { chat: p.chat, seq: ack.seq, msg_id: ack.msg_id, sender: S.me, kind: "text", text: p.text, ts: ack.ts, files: p.files.length ? p.files : undefined });
    }
    if (ack.seq > c.H) catchUp(c);
  } catch (e) {
    p.inflight = false;
    if (RETRYABLE.has(e.code)) {
      if (e.code !== "disconnected") setTimeout(() => sendPending(id), 1500);
    } else {
      p.failed = explain(e);
      savePending();
      toast(p.failed);
    }
  }
  renderList();
  if (S.open === p.chat) renderMessages();
}

function resendAll() {
  for (const [id, p] of S.pending) if (!p.failed) sendPending(id);
}

async function submit() {
  const input = $("input");
  const text = input.value;
  const c = S.open && chatOf(S.open);
  if (!c || !text.trim()) return;
  const id = newClientMsgId();
  S.pending.set(id, { chat: c.id, text, files: [], ts: Date.now() });
  savePending();
  input.value = "";
  autosize();
  renderMessages({ bottom: true });
  sendPending(id);
}

async function attach(list) {
  const c = S.open && chatOf(S.open);
  if (!c) return;
  for (const file of list) {
    const row = el("div", { class: "upload" }, el("span", { text: `${file.name} (${files.humanBytes(file.size)})` }), el("progress", { max: 100, value: 0, "aria-label": `uploading ${file.name}` }));
    $("uploads").append(row);
    try {
      const up = await files.upload(S.conn.node, S.token, file, (sent, total) => {
        row.querySelector("progress").value = total ? Math.round((100 * sent) / total) : 0;
      });
      const id = newClientMsgId();
      S.pending.set(id, { chat: c.id, text: "", files: [{ file_id: up.file_id, name: file.name }], ts: Date.now() });
      savePending();
      renderMessages({ bottom: true });
      sendPending(id);
    } catch (e) {
      toast(`${file.name}: ${explain(e)}`);
    } finally {
      row.remove();
    }
  }
}

// ---------- receipts, typing, presence ----------

function visibleAndOpen(c) {
  return S.open === c.id && document.visibilityState === "visible";
}

function sendReceipt(c) {
  if (!c.H || !c.members.includes(S.me)) return;
  const f = { type: "receipt", chat: c.id };
  let any = false;
  if (c.H > c.sentDelivered && c.H > c.delivered) {
    f.delivered = c.H;
    any = true;
  }
  if (visibleAndOpen(c)) {
    const top = c.H;
    if (top > c.sentRead && top > c.read) {
      f.read = top;
      any = true;
    }
    c.unread = 0;
  }
  if (!any) return;
  c.sentDelivered = Math.max(c.sentDelivered, f.delivered || 0);
  c.sentRead = Math.max(c.sentRead, f.read || 0);
  S.conn.fire(f);
}

function typing() {
  const c = S.open && chatOf(S.open);
  if (!c) return;
  const now = Date.now();
  if (now - (S.typedAt.get(c.id) || 0) < TYPING_SENT_EVERY_MS) return;
  S.typedAt.set(c.id, now);
  S.conn.fire({ type: "typing", chat: c.id });
}

async function watchPresence() {
  const users = new Set();
  for (const c of S.chats.values()) {
    const o = otherOf(c);
    if (o) users.add(o);
  }
  for (const c of S.chats.values()) for (const u of c.members) if (u !== S.me) users.add(u);
  const add = [...users].filter((u) => !S.watched.has(u)).slice(0, PRESENCE_WATCH_MAX - S.watched.size);
  for (let i = 0; i < add.length; i += 256) {
    const part = add.slice(i, i + 256);
    try {
      const r = await S.conn.request({ type: "subscribe", users: part });
      for (const p of r.users) S.presence.set(p.user, p);
      for (const u of part) S.watched.add(u);
    } catch {
      return;
    }
  }
  renderList();
  renderHeader();
}

// ---------- pushes ----------

function onPush(f) {
  switch (f.type) {
    case "message": {
      const m = f.message;
      const c = chatOf(m.chat);
      if (!c.known && !c.catching) {
        // A chat new to us: its name and members come with the next sync.
        if (S.syncing) S.resync = true;
        else syncAll();
      }
      if (m.seq <= c.H && c.msgs.has(m.seq)) return;
      store(c, m);
      if (m.seq === c.H + 1) c.H = m.seq;
      else if (m.seq > c.H + 1 && c.H > 0) catchUp(c);
      else if (c.H === 0) {
        // The first entry held of this chat: older ones come when scrolled to.
        c.H = m.seq;
        c.moreBefore = m.seq > 1;
      }
      if (m.kind === "text" && m.sender !== S.me) {
        if (!visibleAndOpen(c)) c.unread += 1;
        c.typing.delete(m.sender);
        notify(c, m);
      }
      if (m.kind === "join" || m.kind === "leave") watchPresence();
      sendReceipt(c);
      renderList();
      if (S.open === c.id) renderMessages();
      break;
    }
    case "updated": {
      const c = chatOf(f.message.chat);
      if (c.msgs.has(f.message.seq)) c.msgs.set(f.message.seq, f.message);
      if (S.open === c.id) renderMessages();
      break;
    }
    case "receipt": {
      const c = chatOf(f.chat);
      mergeCursor(c, f.user, f.delivered, f.read);
      if (f.user === S.me) {
        c.delivered = Math.max(c.delivered, f.delivered);
        c.read = Math.max(c.read, f.read);
        let n = 0;
        for (const m of c.msgs.values()) if (m.kind === "text" && m.sender !== S.me && m.seq > c.read) n += 1;
        c.unread = Math.min(c.unread, n);
        renderList();
      }
      if (S.open === c.id) renderMessages();
      break;
    }
    case "presence":
      S.presence.set(f.presence.user, f.presence);
      renderList();
      renderHeader();
      break;
    case "typing": {
      const c = chatOf(f.chat);
      c.typing.set(f.user, Date.now() + TYPING_SHOWN_MS);
      if (S.open === c.id) renderTyping();
      setTimeout(() => S.open === c.id && renderTyping(), TYPING_SHOWN_MS + 50);
      break;
    }
    default:
      break;
  }
}

function notify(c, m) {
  if (document.visibilityState === "visible" || !("Notification" in window) || Notification.permission !== "granted") return;
  try {
    const n = new Notification(`${m.sender} · ${title(c)}`, { body: m.text || "sent a file", tag: c.id });
    n.onclick = () => {
      window.focus();
      openChat(c.id);
    };
  } catch {
    /* notifications unavailable */
  }
}

// ---------- rendering ----------

function renderList() {
  const list = $("chat-list");
  const chats = [...S.chats.values()].filter((c) => c.msgs.size || c.members.length);
  chats.sort((a, b) => b.lastTs - a.lastTs || a.id.localeCompare(b.id));
  $("no-chats").hidden = chats.length > 0;
  list.replaceChildren(
    ...chats.map((c) => {
      const other = otherOf(c);
      const p = other ? S.presence.get(other) : null;
      const pend = [...S.pending.values()].some((x) => x.chat === c.id && !x.failed);
      return el(
        "li",
        {},
        el(
          "button",
          { type: "button", "data-chat": c.id, "aria-current": S.open === c.id ? "true" : "false", onclick: () => openChat(c.id), "aria-label": `${title(c)}${c.unread ? `, ${c.unread} unread` : ""}` },
          el("span", { class: "name" }, other ? el("span", { class: `dot${p && p.online ? " on" : ""}`, "aria-hidden": "true" }) : null, title(c)),
          el("span", { class: "time", text: time(c.lastTs) }),
          el("span", { class: "last", text: pend ? "sending…" : c.lastText }),
          c.unread ? el("span", { class: "unread", text: String(c.unread) }) : el("span"),
        ),
      );
    }),
  );
}

function renderHeader() {
  const c = S.open && S.chats.get(S.open);
  if (!c) return;
  $("chat-title").textContent = title(c);
  const other = otherOf(c);
  let sub;
  if (other) sub = lastSeen(S.presence.get(other)) || "";
  else {
    const online = c.members.filter((u) => u !== S.me && S.presence.get(u)?.online).length;
    sub = `${c.members.length} members${online ? `, ${online} online` : ""}`;
  }
  if (!c.members.includes(S.me) && c.known && c.members.length) sub = "you left this group";
  $("chat-sub").textContent = sub;
}

function renderTyping() {
  const c = S.open && S.chats.get(S.open);
  const now = Date.now();
  const who = c ? [...c.typing].filter(([, until]) => until > now).map(([u]) => u) : [];
  $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}

// The seq from which `user` sees `c` as far as this client knows (their join entry; 0
// when it joined before what this client holds).
function joinedAt(c, user) {
  return c.joins.get(user) || 0;
}

function statusOf(c, m) {
  // Who could see this message: the other members who had joined by then (§9.3).
  const others = c.members.filter((u) => u !== S.me && (c.kind === "direct" || joinedAt(c, u) <= m.seq));
  if (c.kind === "direct") {
    const cur = c.cursors.get(others[0]) || { delivered: 0, read: 0 };
    if (cur.read >= m.seq) return { key: "read", text: "✓✓ read", cls: "read" };
    if (cur.delivered >= m.seq) return { key: "delivered", text: "✓✓", cls: "" };
    return { key: "sent", text: "✓", cls: "" };
  }
  let read = 0;
  let delivered = 0;
  for (const u of others) {
    const cur = c.cursors.get(u);
    if (cur && cur.read >= m.seq) read += 1;
    if (cur && cur.delivered >= m.seq) delivered += 1;
  }
  const n = others.length;
  if (n && read === n) return { key: "read", text: `✓✓ read by all ${n}`, cls: "read" };
  if (read) return { key: "read-some", text: `✓✓ read by ${read} of ${n}`, cls: "read" };
  if (delivered) return { key: "delivered", text: `✓✓ delivered to ${delivered} of ${n}`, cls: "" };
  return { key: "sent", text: "✓", cls: "" };
}

function fileView(c, f) {
  const box = el("div", { class: "file" });
  if (files.isImage(f.mime)) {
    const img = el("img", { alt: f.name, loading: "lazy" });
    box.append(img);
    files.thumbnail(S.conn.node, S.token, f.file_id, c.id).then((u) => (img.src = u)).catch(() => img.remove());
  }
  box.append(
    el("button", {
      type: "button",
      text: `Download ${f.name} (${files.humanBytes(f.size || 0)})`,
      onclick: () => files.download(S.conn.node, S.token, f.file_id, c.id, f.name).catch((e) => toast(explain(e))),
    }),
  );
  return box;
}

function messageView(c, m) {
  if (E2E_KINDS[m.kind]) {
    return el("li", { class: "system e2e", "data-seq": m.seq, text: `${m.sender}: ${E2E_KINDS[m.kind]}` });
  }
  if (m.kind === "join" || m.kind === "leave") {
    return el("li", { class: "system", "data-seq": m.seq, text: `${m.text} ${m.kind === "join" ? "joined" : "left"}` });
  }
  const mine = m.sender === S.me;
  const li = el("li", { class: `msg${mine ? " mine" : ""}${m.kind === "deleted" ? " deleted" : ""}`, "data-seq": m.seq, tabindex: "-1" });
  if (!mine && c.kind === "group") li.append(el("div", { class: "from", text: m.sender }));
  const editing = S.editing && S.editing.chat === c.id && S.editing.seq === m.seq && m.kind === "text";
  li.append(editing ? editorView(c, m) : el("div", { class: "text", text: m.kind === "deleted" ? "message deleted" : m.text }));
  if (m.kind === "text" && m.files) for (const f of m.files) li.append(fileView(c, f));
  const meta = el("div", { class: "meta" }, el("span", { text: time(m.ts) }));
  if (m.edited_ts && m.kind === "text") meta.append(el("span", { text: "edited" }));
  if (mine && m.kind === "text") {
    const s = statusOf(c, m);
    meta.append(el("span", { class: `status ${s.cls}`, "data-status": s.key, text: s.text }));
    if (c.members.includes(S.me)) {
      li.append(
        el(
          "div",
          { class: "tools" },
          el("button", { type: "button", text: "Edit", "aria-label": "Edit message", onclick: () => editMessage(c, m) }),
          el("button", { type: "button", text: "Delete", "aria-label": "Delete message", onclick: () => deleteMessage(c, m) }),
        ),
      );
    }
  }
  li.append(meta);
  return li;
}

function pendingView(id, p) {
  const li = el("li", { class: "msg mine pending", "data-pending": id });
  li.append(el("div", { class: "text", text: p.text || p.files.map((f) => `File: ${f.name}`).join(", ") }));
  const meta = el("div", { class: "meta" });
  if (p.failed) {
    meta.append(
      el("span", { class: "error", text: `not sent: ${p.failed}` }),
      el("button", { type: "button", text: "Dismiss", onclick: () => { S.pending.delete(id); savePending(); renderMessages(); renderList(); } }),
    );
  } else {
    meta.append(el("span", { class: "status", "data-status": "sending", text: "sending…" }));
  }
  li.append(meta);
  return li;
}

function renderMessages(opts = {}) {
  const c = S.open && S.chats.get(S.open);
  if (!c) return;
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
  const items = [];
  if (c.loadingOlder) items.push(el("li", { class: "loading-older", text: "loading older messages…" }));
  else if (!c.moreBefore && c.known) items.push(el("li", { class: "day", text: "start of your history" }));
  const seqs = [...c.msgs.keys()].sort((a, b) => a - b);
  for (const s of seqs) {
    const m = c.msgs.get(s);
    if (m.kind === "edit" || m.kind === "delete") continue;
    items.push(messageView(c, m));
  }
  for (const [id, p] of S.pending) if (p.chat === c.id) items.push(pendingView(id, p));
  const editor = box.querySelector("textarea.editor");
  const hadFocus = editor && document.activeElement === editor;
  box.replaceChildren(...items);
  const again = box.querySelector("textarea.editor");
  if (again && (hadFocus || !editor)) {
    again.focus();
    again.setSelectionRange(again.value.length, again.value.length);
  }
  if (opts.keep !== undefined) box.scrollTop = box.scrollHeight - opts.keep;
  else if (opts.bottom || atBottom) box.scrollTop = box.scrollHeight;
  renderTyping();
  // A first page too short to scroll: the older ones now (scrolling cannot ask).
  if (box.scrollHeight <= box.clientHeight && c.moreBefore && !c.loadingOlder) {
    setTimeout(() => S.open === c.id && loadOlder(c), 0);
  }
}

// Inline editing survives re-renders: the draft lives in S.editing.
function editMessage(c, m) {
  S.editing = { chat: c.id, seq: m.seq, draft: m.text };
  renderMessages();
}

function editorView(c, m) {
  const ta = el("textarea", { "aria-label": "Edit message", class: "editor" });
  ta.value = S.editing.draft;
  ta.addEventListener("input", () => (S.editing.draft = ta.value));
  ta.addEventListener("keydown", async (e) => {
    if (e.key === "Escape") {
      e.stopPropagation();
      S.editing = null;
      renderMessages();
      $("input").focus();
    } else if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      const text = ta.value;
      S.editing = null;
      renderMessages();
      try {
        await S.conn.request({ type: "edit", chat: c.id, seq: m.seq, text });
      } catch (err) {
        toast(explain(err));
      }
    }
  });
  return ta;
}

async function deleteMessage(c, m) {
  const ok = await ask({ title: "Delete this message?", body: [el("p", { class: "muted", text: m.text.slice(0, 200) })], ok: "Delete" });
  if (!ok) return;
  try {
    await S.conn.request({ type: "delete", chat: c.id, seq: m.seq });
  } catch (e) {
    toast(explain(e));
  }
}

function openChat(id, { keepFocus = false } = {}) {
  const c = chatOf(id);
  S.open = id;
  history.replaceState(null, "", `#chat=${encodeURIComponent(id)}`);
  $("pane-empty").hidden = true;
  $("chat").hidden = false;
  $("app").classList.add("in-chat");
  const member = c.members.includes(S.me);
  $("notice").hidden = member || !c.known;
  if (c.known && !member) {
    $("notice").textContent = c.members.length || c.msgs.size ? "You are no longer a member of this chat: you can read what you saw." : `You are not a member of ${id}.`;
  }
  $("composer").hidden = c.known && !member;
  if (isE2e(c)) {
    $("notice").textContent = "End-to-end encrypted: its messages are read and sent with a device that holds the chat's keys (chat-cli e2e). This browser holds none.";
    $("notice").hidden = false;
    $("composer").hidden = true;
  }
  if (!c.known && !c.catching) catchUp(c).then(() => {
    if (S.open === id && !c.msgs.size && !c.members.includes(S.me)) {
      $("notice").textContent = `You are not a member of ${id}.`;
      $("notice").hidden = false;
      $("composer").hidden = true;
    }
  });
  renderHeader();
  renderMessages({ bottom: true });
  renderList();
  sendReceipt(c);
  renderList();
  if (!keepFocus) $("input").focus();
}

function closeChat() {
  S.open = null;
  history.replaceState(null, "", location.pathname);
  $("app").classList.remove("in-chat");
  $("chat").hidden = true;
  $("pane-empty").hidden = false;
  renderList();
  const first = $("chat-list").querySelector("button");
  if (first) first.focus();
}

// ---------- groups and direct chats ----------

async function newDirect() {
  const v = await ask({
    title: "New direct chat",
    fields: [{ id: "user", label: "User id" }],
    ok: "Open",
    check: (v) => (v.user ? requestCheck(v, { type: "open_direct", user: v.user }) : "Enter a user id."),
  });
  if (!v) return;
  const c = chatOf(v.chat);
  c.kind = "direct";
  c.members = v.chat.slice(2).split(":");
  c.known = true;
  watchPresence();
  openChat(v.chat);
}

// A dialog's check that sends `frame`: null (the dialog closes) once it is done, with
// the answer's chat in `v.chat`; else the refusal, said in the dialog.
async function requestCheck(v, frame) {
  try {
    const d = await S.conn.request(frame);
    v.chat = d.chat;
    return null;
  } catch (e) {
    return explain(e);
  }
}

function userList(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

async function newGroup() {
  const v = await ask({
    title: "New group",
    fields: [{ id: "name", label: "Name" }, { id: "members", label: "Members (user ids, comma-separated)" }],
    ok: "Create",
    check: (v) => requestCheck(v, { type: "create_group", name: v.name, members: userList(v.members) }),
  });
  if (!v) return;
  const c = chatOf(v.chat);
  c.kind = "group";
  c.name = v.name;
  c.members = [S.me, ...userList(v.members)].sort();
  catchUp(c);
  watchPresence();
  openChat(v.chat);
}

async function members() {
  const c = S.open && chatOf(S.open);
  if (!c) return;
  const list = el("ul", { "aria-label": "Members" });
  for (const u of c.members) {
    const p = S.presence.get(u);
    const li = el("li", {}, el("span", { class: `dot${p && p.online ? " on" : ""}`, "aria-hidden": "true" }), el("span", { text: u === S.me ? `${u} (you)` : u }), el("span", { class: "muted", text: u === S.me ? "" : lastSeen(p) }));
    if (c.kind === "group" && u !== S.me && c.members.includes(S.me)) {
      li.append(el("button", { type: "button", text: "Remove", "aria-label": `Remove ${u}`, onclick: async () => {
        try {
          await S.conn.request({ type: "remove_member", chat: c.id, user: u });
          closeDialog();
        } catch (e) {
          toast(explain(e));
        }
      } }));
    }
    list.append(li);
  }
  const body = [list];
  const canChange = c.kind === "group" && c.members.includes(S.me);
  if (canChange) {
    body.push(el("button", { type: "button", text: "Leave group", onclick: async () => {
      try {
        await S.conn.request({ type: "leave", chat: c.id });
        closeDialog();
        openChat(c.id);
      } catch (e) {
        toast(explain(e));
      }
    } }));
  }
  const v = await ask({
    title: `${title(c)}: members`,
    fields: canChange ? [{ id: "add", label: "Add people (user ids)" }] : [],
    body,
    ok: canChange ? "Add" : "",
    check: (v) => (v.add ? requestCheck(v, { type: "add_members", chat: c.id, users: userList(v.add) }) : "Enter user ids to add."),
  });
  if (v) watchPresence();
}

// ---------- sign-in and connection ----------

function savedToken() {
  return sessionStorage.getItem("chatd.token") || localStorage.getItem("chatd.token");
}

function showSignin(error) {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").hidden = !error;
  $("signin-error").textContent = error || "";
  $("token").focus();
}

async function knownNodes(node) {
  try {
    const r = await fetch(`${location.protocol}//${node}/v1/nodes`);
    if (!r.ok) return;
    S.nodeList = await r.json();
    const nodes = S.nodeList.filter((n) => n.state === "active").map((n) => n.api_addr);
    const own = location.host;
    const list = [own, ...nodes.filter((a) => a !== own)];
    S.conn.setNodes(list);
  } catch {
    /* keep what we know */
  }
}

function start(token) {
  S.token = token;
  $("signin").hidden = true;
  $("app").hidden = false;
  S.conn = new Conn([location.host], token, {
    onReady: (ready, node) => {
      S.me = ready.user;
      S.node = node;
      S.watched.clear();
      $("me-name").textContent = ready.user;
      knownNodes(node);
      resendAll();
      syncAll();
    },
    onPush,
    onState: (state, detail) => {
      const c = $("conn-state");
      c.classList.toggle("down", state !== "up");
      c.textContent = state === "up" ? `connected to ${detail}` : state === "connecting" ? `connecting to ${detail}…` : `offline, ${detail}`;
      c.dataset.state = state;
      c.dataset.node = S.conn ? S.conn.node : "";
    },
    onFinal: (code) => {
      sessionStorage.removeItem("chatd.token");
      localStorage.removeItem("chatd.token");
      S.conn = null;
      showSignin(code === 4004 ? "Your token was revoked or rotated: sign in with the new one." : "This token is unknown or disabled.");
    },
  });
  S.conn.start();
}

function autosize() {
  const t = $("input");
  t.style.height = "auto";
  t.style.height = `${Math.min(t.scrollHeight + 2, 160)}px`;
  t.style.overflowY = t.scrollHeight > 160 ? "auto" : "hidden";
}

function boot() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const linked = hash.get("token");
  if (linked) {
    sessionStorage.setItem("chatd.token", linked);
    history.replaceState(null, "", location.pathname);
  } else if (hash.get("chat")) {
    S.open = hash.get("chat");
  }
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    ($("remember").checked ? localStorage : sessionStorage).setItem("chatd.token", t);
    $("token").value = "";
    start(t);
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  $("input").addEventListener("input", () => {
    autosize();
    typing();
  });
  $("attach").addEventListener("change", (e) => {
    attach([...e.target.files]);
    e.target.value = "";
  });
  $("messages").addEventListener("scroll", () => {
    const c = S.open && S.chats.get(S.open);
    if (c && $("messages").scrollTop < 80) loadOlder(c);
  });
  $("back").addEventListener("click", closeChat);
  $("new-direct").addEventListener("click", newDirect);
  $("new-group").addEventListener("click", newGroup);
  $("members-button").addEventListener("click", members);
  const menu = $("menu");
  $("menu-button").addEventListener("click", () => {
    menu.hidden = !menu.hidden;
    $("menu-button").setAttribute("aria-expanded", String(!menu.hidden));
    if (!menu.hidden) menu.querySelector("button").focus();
  });
  $("notify-button").addEventListener("click", async () => {
    menu.hidden = true;
    if (!("Notification" in window)) return toast("This browser has no notifications.");
    const p = await Notification.requestPermission();
    toast(p === "granted" ? "Notifications on while this tab is hidden." : "Notifications are off.");
  });
  $("quota-button").addEventListener("click", async () => {
    menu.hidden = true;
    try {
      const q = await files.quota(S.conn.node, S.token);
      toast(`${files.humanBytes(q.used_bytes)} of ${files.humanBytes(q.quota_bytes)} used in ${q.files} file(s)`);
    } catch (e) {
      toast(explain(e));
    }
  });
  $("nodes-button").addEventListener("click", async () => {
    menu.hidden = true;
    if (!S.conn) return;
    const list = el("ul", { "aria-label": "Nodes" });
    for (const n of S.nodeList || []) {
      const here = n.api_addr === S.conn.node;
      list.append(
        el(
          "li",
          {},
          el("span", { text: `node ${n.id} · ${n.api_addr}` }),
          el("span", { class: "muted", text: here ? "connected" : n.state }),
          here || n.state !== "active"
            ? null
            : el("button", { type: "button", text: "Use", "data-node": n.api_addr, onclick: () => {
                S.conn.switchTo(n.api_addr);
                closeDialog();
              } }),
        ),
      );
    }
    await ask({ title: "Nodes of this cluster", body: [list], ok: "" });
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem("chatd.pending");
    sessionStorage.removeItem("chatd.token");
    localStorage.removeItem("chatd.token");
    location.hash = "";
    location.reload();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (!menu.hidden) {
      menu.hidden = true;
      $("menu-button").focus();
    } else if (!$("dialog").open && S.open && window.matchMedia("(max-width: 720px)").matches) {
      closeChat();
    }
  });
  window.addEventListener("hashchange", () => {
    const chat = new URLSearchParams(location.hash.slice(1)).get("chat");
    if (chat && S.conn && chat !== S.open) openChat(chat);
  });
  document.addEventListener("visibilitychange", () => {
    const c = S.open && S.chats.get(S.open);
    if (c) sendReceipt(c);
    if (document.visibilityState === "visible" && S.conn) syncAll();
  });
  loadPending();
  const t = savedToken();
  if (t) start(t);
  else showSignin();
}

boot();
