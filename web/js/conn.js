// The WebSocket connection to a chatd node (docs/protocol.md §3, §13, §14): authenticates
// with an `auth` frame, matches answers to requests by id, sends a `ping` every 25 s, and
// reconnects with exponential backoff and full jitter, rotating through the cluster's
// nodes (at once to another node after a drain, 1001).

const BACKOFF_START_MS = 500;
const BACKOFF_MAX_MS = 30000;
const STABLE_AFTER_MS = 60000;
const PING_EVERY_MS = 25000;
const REQUEST_TIMEOUT_MS = 20000;
// Close codes after which reconnecting cannot help (§11).
const FINAL_CODES = new Set([4001, 4004]);

export class ProtocolError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export class Conn {
  // `nodes`: host:port of every node, the page's own first. `handlers`: onReady(ready,
  // node), onPush(frame), onState(state, detail), onFinal(code, reason).
  constructor(nodes, token, handlers) {
    this.nodes = nodes;
    this.token = token;
    this.h = handlers;
    this.index = 0;
    this.ws = null;
    this.nextId = 1;
    this.waiting = new Map();
    this.attempt = 0;
    this.stopped = false;
    this.timer = null;
    this.pinger = null;
    this.upSince = 0;
    this.forced = null;
  }

  get node() {
    return this.nodes[this.index % this.nodes.length];
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pinger);
    if (this.ws) this.ws.close(1000, "bye");
  }

  // Moves to `node` (one of `nodes`) now.
  switchTo(node) {
    if (node === this.node && this.ws) return;
    this.forced = node;
    if (this.ws) this.ws.close(1000, "switching node");
    else {
      clearTimeout(this.timer);
      this.index = Math.max(0, this.nodes.indexOf(node));
      this.forced = null;
      this.open();
    }
  }

  setNodes(nodes) {
    const current = this.node;
    this.nodes = nodes.length ? nodes : this.nodes;
    const i = this.nodes.indexOf(current);
    this.index = i >= 0 ? i : 0;
  }

  open() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const node = this.node;
    this.h.onState("connecting", node);
    let ws;
    try {
      ws = new WebSocket(`${scheme}://${node}/v1/ws`);
    } catch (e) {
      this.retry(false);
      return;
    }
    this.ws = ws;
    let ready = false;
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: this.token }));
    ws.onmessage = (ev) => {
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!ready) {
        if (f.type === "ready") {
          ready = true;
          this.upSince = Date.now();
          this.pinger = setInterval(() => this.fire({ type: "ping" }), PING_EVERY_MS);
          this.h.onState("up", node);
          this.h.onReady(f, node);
        }
        return; // an error before ready is followed by the close
      }
      if (f.id !== undefined && this.waiting.has(f.id) && f.type !== "message") {
        const w = this.waiting.get(f.id);
        this.waiting.delete(f.id);
        clearTimeout(w.timer);
        if (f.type === "error") w.reject(new ProtocolError(f.code, f.message));
        else w.resolve(f);
        return;
      }
      this.h.onPush(f);
    };
    ws.onclose = (ev) => {
      clearInterval(this.pinger);
      if (this.ws === ws) this.ws = null;
      for (const [, w] of this.waiting) {
        clearTimeout(w.timer);
        w.reject(new ProtocolError("disconnected", "the connection was lost"));
      }
      this.waiting.clear();
      if (this.stopped) return;
      if (FINAL_CODES.has(ev.code)) {
        this.stopped = true;
        this.h.onFinal(ev.code, ev.reason);
        return;
      }
      if (Date.now() - this.upSince > STABLE_AFTER_MS && ready) this.attempt = 0;
      if (this.forced) {
        // The person chose a node.
        this.index = Math.max(0, this.nodes.indexOf(this.forced));
        this.forced = null;
        this.attempt = 0;
        this.retry(true);
        return;
      }
      // A drain (1001) or a node that never answered: another node first, at once.
      this.index += 1;
      this.retry(ev.code === 1001);
    };
  }

  retry(now) {
    clearTimeout(this.timer);
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** this.attempt);
    this.attempt += 1;
    const wait = now ? 0 : Math.random() * cap;
    this.h.onState("down", `retrying in ${(wait / 1000).toFixed(1)} s`);
    this.timer = setTimeout(() => this.open(), wait);
  }

  // A frame without an answer (receipt, typing, ping).
  fire(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  // A request: resolves with its answer frame, rejects with a ProtocolError.
  request(frame) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new ProtocolError("disconnected", "not connected"));
        return;
      }
      const id = String(this.nextId++);
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new ProtocolError("timeout", "no answer"));
      }, REQUEST_TIMEOUT_MS);
      this.waiting.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ ...frame, id }));
    });
  }
}
