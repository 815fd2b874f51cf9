// Decoding of server frames: JSON text frames, and binary frames holding gzip(msgpack(envelope)).
//
// The msgpack map carries exactly the JSON envelope's values (UUIDs are strings in both), so a binary
// frame and a text frame of the same event decode to identical objects with no guessing: a `bin` value
// only appears where a payload itself holds bytes, and it stays a `Uint8Array`.

import { decode as msgpackDecode } from '@msgpack/msgpack';

/** A frame's payload as a WebSocket implementation hands it over. */
export type FramePayload = string | ArrayBuffer | ArrayBufferView | Blob;

async function toBytes(payload: Exclude<FramePayload, string>): Promise<Uint8Array> {
  if (payload instanceof Uint8Array) return payload;
  if (ArrayBuffer.isView(payload)) return new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  if (typeof (payload as Blob).arrayBuffer === 'function') return new Uint8Array(await (payload as Blob).arrayBuffer());
  throw new Error('unsupported binary frame payload');
}

/**
 * The most a binary frame may inflate to (as the server's own decoder): a hostile peer's gzip bomb
 * is refused at this size instead of filling the tab's memory. No server message comes near it.
 */
export const MAX_DECODED_BYTES = 16 * 1024 * 1024;

/** gunzip with the platform's `DecompressionStream` (browsers, Node 18+), at most `max` bytes out. */
export async function gunzip(bytes: Uint8Array, max = MAX_DECODED_BYTES): Promise<Uint8Array> {
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
    length += value.length;
    if (length > max) {
      await reader.cancel().catch(() => undefined);
      throw new Error(`binary frame inflates past ${max} bytes`);
    }
    chunks.push(value);
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

/** Decodes a binary frame: gunzip, then msgpack. */
export async function decodeBinaryFrame(payload: Exclude<FramePayload, string>): Promise<unknown> {
  const bytes = await gunzip(await toBytes(payload));
  return msgpackDecode(bytes);
}

/** Decodes any frame into the server message it carries. */
export async function decodeFrame(payload: FramePayload): Promise<unknown> {
  return typeof payload === 'string' ? JSON.parse(payload) : decodeBinaryFrame(payload);
}
