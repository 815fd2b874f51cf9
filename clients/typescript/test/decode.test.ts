import { encode } from '@msgpack/msgpack';
import { describe, expect, it } from 'vitest';

import { decodeBinaryFrame, decodeFrame, gunzip } from '../src/decode.js';

async function gzip(bytes: Uint8Array): Promise<Uint8Array> {
  const cs = new CompressionStream('gzip');
  const w = cs.writable.getWriter();
  void w.write(bytes as Uint8Array<ArrayBuffer>).then(() => w.close());
  return new Uint8Array(await new Response(cs.readable).arrayBuffer());
}

const uuid = '5f0c2a7e-8b3d-4c1e-9a6f-2d4b7e9c1a30';
const uuidBytes = Uint8Array.from(uuid.replace(/-/g, '').match(/../g)!.map((h) => parseInt(h, 16)));

describe('binary frames', () => {
  it('gunzips what CompressionStream gzipped, also large payloads', async () => {
    const big = new TextEncoder().encode('x'.repeat(300_000) + 'end');
    const out = await gunzip(await gzip(big));
    expect(out.length).toBe(big.length);
    expect(Buffer.compare(Buffer.from(out), Buffer.from(big))).toBe(0);
  });

  it('refuses a frame that inflates past the bound (a gzip bomb)', async () => {
    const bomb = await gzip(new Uint8Array(20 * 1024 * 1024));
    expect(bomb.length).toBeLessThan(64 * 1024);
    await expect(decodeBinaryFrame(bomb)).rejects.toThrow(/inflates past 16777216 bytes/);
    await expect(gunzip(await gzip(new Uint8Array(2048)), 1024)).rejects.toThrow(/inflates past 1024/);
  });

  it('decodes gzip(msgpack(envelope)) to the same object as the JSON text', async () => {
    const json = {
      type: 'zone_completed',
      data: { job_id: uuid, zone_id: `${uuid}:0`, zone_index: 0, rows: 1000, errors: 1, duration_ms: 578 },
      id: 'a9b8c7d6-e5f4-4a3b-8c2d-1e0f9a8b7c6d',
      room: `job:${uuid}`,
      seq: 8,
      epoch: 'c3a9e1f47b2d4e8a9f0b1c2d3e4f5a6b',
      ts: '2026-11-22T08:10:00.811Z',
    };
    // The server's msgpack carries the JSON values, UUIDs as strings.
    const frame = await gzip(encode(json));
    expect(await decodeBinaryFrame(frame)).toEqual(json);
    expect(await decodeBinaryFrame(frame.buffer as ArrayBuffer)).toEqual(json);
    expect(await decodeFrame(JSON.stringify(json))).toEqual(json);
  });

  it('leaves a payload of 16 raw bytes as bytes: nothing is guessed to be a UUID', async () => {
    const env = { type: 'info', data: { digest: uuidBytes, note: 'x'.repeat(2000) }, id: uuid, ts: '2026-11-22T08:10:00.811Z' };
    const out = (await decodeBinaryFrame(await gzip(encode(env)))) as { data: { digest: unknown } };
    expect(out.data.digest).toBeInstanceOf(Uint8Array);
    expect(Array.from(out.data.digest as Uint8Array)).toEqual(Array.from(uuidBytes));
  });

  it('rejects a frame that is not gzip', async () => {
    await expect(decodeBinaryFrame(new Uint8Array([1, 2, 3, 4]))).rejects.toThrow();
  });
});
