// The TypeScript protocol types agree with the server's proto-docs: every `json server` block of
// proto-docs/protocol.md is an envelope that fits our schemas, every `json client` block a client
// message; every event and client message type has an example; and the checks do reject bad messages.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import {
  CLIENT_MESSAGE_TYPES,
  EVENT_TYPES,
  ROOM_EVENT_TYPES,
  isClientMessage,
  isEnvelope,
  validateClientMessage,
  validateEnvelope,
  type Envelope,
} from '../src/protocol.js';
import { REPO_ROOT } from '../../test-support/server.js';

const doc = readFileSync(join(REPO_ROOT, 'proto-docs', 'protocol.md'), 'utf8');

function blocks(kind: 'server' | 'client'): { line: number; value: any }[] {
  const out: { line: number; value: any }[] = [];
  const re = new RegExp('^```json ' + kind + '[ \\t]*\\n([\\s\\S]*?)^```', 'gm');
  for (let m = re.exec(doc); m; m = re.exec(doc)) {
    const line = doc.slice(0, m.index).split('\n').length;
    out.push({ line, value: JSON.parse(m[1]!) });
  }
  return out;
}

const server = blocks('server');
const client = blocks('client');
const clone = <T>(v: T): T => JSON.parse(JSON.stringify(v));

describe('proto-docs/protocol.md examples', () => {
  it('has examples of both kinds', () => {
    expect(server.length).toBeGreaterThan(30);
    expect(client.length).toBeGreaterThan(8);
  });

  it.each(server.map((b) => [b.line, b.value.type, b.value] as const))(
    'server example at line %i (%s) fits the envelope and its data type',
    (_line, _type, value) => {
      expect(validateEnvelope(value)).toEqual([]);
      expect(isEnvelope(value)).toBe(true);
    },
  );

  it.each(client.map((b) => [b.line, b.value.type, b.value] as const))(
    'client example at line %i (%s) fits the client message types',
    (_line, _type, value) => {
      expect(validateClientMessage(value)).toEqual([]);
      expect(isClientMessage(value)).toBe(true);
    },
  );

  it('shows every server event type and every client message type', () => {
    const seen = new Set(server.map((b) => b.value.type));
    expect(EVENT_TYPES.filter((t) => !seen.has(t))).toEqual([]);
    expect(EVENT_TYPES).toHaveLength(25);
    const seenClient = new Set(client.map((b) => b.value.type));
    expect(CLIENT_MESSAGE_TYPES.filter((t) => !seenClient.has(t))).toEqual([]);
  });

  it('names every room event type the docs use for room events', () => {
    for (const b of server) {
      expect('room' in b.value, `line ${b.line}`).toBe((ROOM_EVENT_TYPES as string[]).includes(b.value.type));
    }
  });
});

describe('the checks reject what does not fit', () => {
  const progress = server.find((b) => b.value.type === 'processing_progress')!.value as Envelope<'processing_progress'>;
  const subscribed = server.find((b) => b.value.type === 'subscribed')!.value as Envelope<'subscribed'>;

  it('a missing required data field', () => {
    const v = clone(progress) as any;
    delete v.data.zones_total;
    expect(validateEnvelope(v)).toEqual(['processing_progress.data.zones_total: missing']);
  });

  it('a field the type does not know', () => {
    const v = clone(progress) as any;
    v.data.speed = 3;
    expect(validateEnvelope(v)).toEqual(['processing_progress.data.speed: unknown field']);
  });

  it('a wrong type, a non-UUID id, a bad timestamp', () => {
    const v = clone(progress) as any;
    v.data.progress = '53.3';
    v.id = 'not-a-uuid';
    v.ts = 'yesterday';
    expect(validateEnvelope(v)).toHaveLength(3);
  });

  it('room fields on a connection-level message, and their absence on a room event', () => {
    const a = clone(subscribed) as any;
    a.seq = 3;
    expect(validateEnvelope(a)).toEqual(['envelope.seq: unknown field']);
    const b = clone(progress) as any;
    delete b.epoch;
    expect(validateEnvelope(b)).toEqual(['envelope.epoch: missing']);
  });

  it('an unknown type, and client messages with missing or extra fields', () => {
    expect(validateEnvelope({ ...clone(progress), type: 'dance' })).toHaveLength(1);
    expect(validateClientMessage({ type: 'subscribe' })).toEqual(['subscribe.room: missing']);
    expect(validateClientMessage({ type: 'ack', room: 'tenant:a', seq: 1, extra: 1 })).toEqual([
      'ack.extra: unknown field',
    ]);
    expect(validateClientMessage({ type: 'subscribe', room: 'x', since: { seq: -1, epoch: 'e' } })).toHaveLength(1);
  });
});
