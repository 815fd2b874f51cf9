// Decoding of server frames: JSON text frames, and binary frames holding gzip(msgpack(envelope)).
//
// In msgpack the server writes UUID fields (`id`, `connection_id`, `job_id`) as 16-byte `bin` values,
// not strings; `decodeBinaryFrame` turns every 16-byte binary back into the canonical UUID string, so a
// binary frame and a text frame of the same event give identical objects.

import { decode as msgpackDecode } from '@msgpack/msgpack';

/** A frame's payload as a WebSocket implementation hands it over. */
export type FramePayload = string | ArrayBuffer | ArrayBufferView | Blob;

/** Formats 16 bytes as a lower-case, hyphenated UUID. */
export function bytesToUuid(bytes: Uint8Array): string {
  if (bytes.length !== 16) throw new Error(`a UUID has 16 bytes, not ${bytes.length}`);
  let hex = '';
  for (const b of bytes) hex += b.toString(16).padStart(2, '0');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** Replaces every 16-byte binary value (msgpack `bin`) inside `value` by its UUID string. */
export function binaryUuidsToStrings(value: unknown): unknown {
  if (value instanceof Uint8Array) return value.length === 16 ? bytesToUuid(value) : value;
  if (Array.isArray(value)) return value.map(binaryUuidsToStrings);
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = binaryUuidsToStrings(v);
    return out;
  }
  return value;
}

async function toBytes(payload: Exclude<FramePayload, string>): Promise<Uint8Array> {
  if (payload instanceof Uint8Array) return payload;
  if (ArrayBuffer.isView(payload)) return new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  if (typeof (payload as Blob).arrayBuffer === 'function') return new Uint8Array(await (payload as Blob).arrayBuffer());
  throw new Error('unsupported binary frame payload');
}

/** gunzip with the platform's `DecompressionStream` (browsers, Node 18+). */
export async function gunzip(bytes: Uint8Array): Promise<Uint8Array> {
  const stream = new DecompressionStream('gzip');
  const writer = stream.writable.getWriter();
  // Not awaited before reading: the stream would wait for a reader (backpressure).
  const written = writer
    .write(bytes as Uint8Array<ArrayBuffer>)
    .then(() => writer.close())
    .catch(() => undefined);
  const reader = stream.readable.getReader();
  const chunks: Uint8Array[] = [];
  let length = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    length += value.length;
  }
  await written;
  const out = new Uint8Array(length);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** Decodes a binary frame: gunzip, msgpack, UUID bytes to strings. */
export async function decodeBinaryFrame(payload: Exclude<FramePayload, string>): Promise<unknown> {
  const bytes = await gunzip(await toBytes(payload));
  return binaryUuidsToStrings(msgpackDecode(bytes));
}

/** Decodes any frame into the server message it carries. */
export async function decodeFrame(payload: FramePayload): Promise<unknown> {
  return typeof payload === 'string' ? JSON.parse(payload) : decodeBinaryFrame(payload);
}
