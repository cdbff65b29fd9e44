// The HTTP file API (docs/protocol.md §2) with the user's token: uploads with progress,
// thumbnails and downloads as blob URLs (an <img> cannot send a token).

export class FileError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function base(node) {
  return `${location.protocol}//${node}`;
}

// `X-File-Name` must be a header value: a name that is not plain ASCII is sent as the
// message's `name` instead (JSON carries UTF-8).
function headerName(name) {
  return /^[\x20-\x7e]+$/.test(name) && !/[\\/"]/.test(name) ? name : "file";
}

function errorOf(xhrOrStatus, text) {
  let code = "http_" + xhrOrStatus;
  let message = text || `HTTP ${xhrOrStatus}`;
  try {
    const v = JSON.parse(text);
    code = v.code || code;
    message = v.message || message;
  } catch {
    /* not JSON */
  }
  return new FileError(xhrOrStatus, code, message);
}

// Uploads `file` the resumable way (§2): a `POST` with `Upload-Length` creates it (size
// and quota are refused there, before any byte is sent), then one `PATCH` sends the bytes
// with progress. `onProgress(sentBytes, total)`. Resolves with the file as the server
// answers it: `{file_id, size, sha256, mime, name}`.
export async function upload(node, token, file, onProgress) {
  const r = await fetch(`${base(node)}/v1/files`, {
    method: "POST",
    headers: {
      Authorization: `Bearer ${token}`,
      "Content-Type": file.type || "application/octet-stream",
      "X-File-Name": headerName(file.name),
      "Upload-Length": String(file.size),
    },
    body: "",
  });
  const created = await r.text();
  if (r.status !== 201) throw errorOf(r.status, created);
  const { file_id: id } = JSON.parse(created);
  if (file.size === 0) return JSON.parse(created);
  return new Promise((resolve, reject) => {
    const x = new XMLHttpRequest();
    x.open("PATCH", `${base(node)}/v1/files/${encodeURIComponent(id)}`);
    x.setRequestHeader("Authorization", `Bearer ${token}`);
    x.setRequestHeader("Content-Type", "application/offset+octet-stream");
    x.setRequestHeader("Upload-Offset", "0");
    x.upload.onprogress = (e) => onProgress(e.loaded, e.total || file.size);
    x.onload = () => {
      if (x.status === 200) {
        try {
          resolve(JSON.parse(x.responseText));
        } catch (e) {
          reject(new FileError(x.status, "bad_answer", String(e)));
        }
      } else {
        reject(errorOf(x.status, x.responseText));
      }
    };
    x.onerror = () => reject(new FileError(0, "network", "the upload's connection failed"));
    x.send(file);
  });
}

async function fetchBlob(url, token) {
  const r = await fetch(url, { headers: { Authorization: `Bearer ${token}` } });
  if (!r.ok) throw errorOf(r.status, await r.text());
  return r.blob();
}

const thumbCache = new Map();

// A blob URL of the thumbnail of `fileId`, read through `chat`; cached per page.
export async function thumbnail(node, token, fileId, chat) {
  const key = fileId;
  if (!thumbCache.has(key)) {
    const url = `${base(node)}/v1/files/${encodeURIComponent(fileId)}/thumbnail?chat=${encodeURIComponent(chat)}`;
    thumbCache.set(
      key,
      fetchBlob(url, token).then((b) => URL.createObjectURL(b)).catch((e) => {
        thumbCache.delete(key);
        throw e;
      }),
    );
  }
  return thumbCache.get(key);
}

// Downloads `fileId` through `chat` and hands it to the browser under `name`.
export async function download(node, token, fileId, chat, name) {
  const url = `${base(node)}/v1/files/${encodeURIComponent(fileId)}?chat=${encodeURIComponent(chat)}`;
  const blob = await fetchBlob(url, token);
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

export async function quota(node, token) {
  const r = await fetch(`${base(node)}/v1/quota`, { headers: { Authorization: `Bearer ${token}` } });
  if (!r.ok) throw errorOf(r.status, await r.text());
  return r.json();
}

export function isImage(mime) {
  return ["image/png", "image/jpeg", "image/gif", "image/webp"].includes(mime);
}

export function humanBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(1)} ${units[u]}`;
}
