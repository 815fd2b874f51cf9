// The client's state machine against a scripted socket, with fake timers: backoff timing, terminal
// close codes, resume with since, duplicates, ack batching, refresh, pings, fromStart.

import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

import { backoffCeiling, backoffDelay } from '../src/backoff.js';
import { JobcastClient, SubscriptionError, type ConnectionState, type DisconnectInfo, type JobcastClientOptions } from '../src/client.js';
import { FakeSocket } from './fake-socket.js';

const EPOCH = 'c3a9e1f47b2d4e8a9f0b1c2d3e4f5a6b';
const ROOM = 'tenant:acme';
const tick = () => vi.advanceTimersByTimeAsync(0);

function make(opts: Partial<JobcastClientOptions> = {}) {
  let n = 0;
  const getToken = vi.fn(async (_reason: 'connect' | 'refresh') => `token-${++n}`);
  const client = new JobcastClient({
    url: 'ws://jobcast.test/ws',
    getToken,
    WebSocket: FakeSocket,
    random: () => 0.5,
    reconnect: { baseMs: 100, capMs: 1000 },
    pingIntervalMs: 0,
    ...opts,
  });
  const states: ConnectionState[] = [];
  const disconnects: DisconnectInfo[] = [];
  client.onState((s) => states.push(s));
  client.onDisconnect((d) => disconnects.push(d));
  return { client, getToken, states, disconnects };
}

beforeEach(() => {
  vi.useFakeTimers();
  FakeSocket.reset();
});
afterEach(() => {
  vi.useRealTimers();
});

describe('backoff', () => {
  it('is full jitter under an exponential ceiling with a cap', () => {
    expect([0, 1, 2, 3, 4, 5, 6].map((a) => backoffCeiling(a, { baseMs: 100, capMs: 1000 }))).toEqual([
      100, 200, 400, 800, 1000, 1000, 1000,
    ]);
    expect(backoffDelay(3, { baseMs: 100, capMs: 1000 }, () => 0)).toBe(0);
    expect(backoffDelay(3, { baseMs: 100, capMs: 1000 }, () => 0.999)).toBe(799);
    for (let i = 0; i < 500; i++) {
      const d = backoffDelay(i % 8, { baseMs: 100, capMs: 1000 });
      expect(d).toBeGreaterThanOrEqual(0);
      expect(d).toBeLessThan(backoffCeiling(i % 8, { baseMs: 100, capMs: 1000 }));
    }
  });

  it('waits random * min(cap, base * 2^n) before each retry, and starts over after a success', async () => {
    const { client, disconnects, states } = make();
    client.connect();
    await tick();
    expect(FakeSocket.all).toHaveLength(1);
    const start = Date.now();
    const expected = [50, 100, 200, 400, 500, 500];
    let at = start;
    for (const [i, delay] of expected.entries()) {
      FakeSocket.last.serverClose(1006);
      expect(disconnects[i]).toMatchObject({ code: 1006, willReconnect: true, delayMs: delay });
      await vi.advanceTimersByTimeAsync(delay - 1);
      expect(FakeSocket.all).toHaveLength(i + 1); // not yet
      await vi.advanceTimersByTimeAsync(1);
      expect(FakeSocket.all).toHaveLength(i + 2);
      at += delay;
      expect(FakeSocket.last.createdAt).toBe(at);
    }
    FakeSocket.last.accept();
    await tick();
    expect(client.state).toBe('open');
    FakeSocket.last.serverClose(1001, 'server shutting down');
    expect(disconnects.at(-1)).toMatchObject({ code: 1001, delayMs: 50 });
    expect(states.slice(0, 2)).toEqual(['connecting', 'reconnecting']);
    expect(states.slice(-2)).toEqual(['open', 'reconnecting']);
    client.close();
  });

  it('gives up after maxAttempts', async () => {
    const { client, states } = make({ reconnect: { baseMs: 10, capMs: 10, maxAttempts: 3 } });
    client.connect();
    await tick();
    for (let i = 0; i < 3; i++) {
      FakeSocket.last.serverClose(1006);
      await vi.advanceTimersByTimeAsync(10);
    }
    expect(FakeSocket.all).toHaveLength(4);
    FakeSocket.last.serverClose(1006);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeSocket.all).toHaveLength(4);
    expect(states.at(-1)).toBe('closed');
  });
});

describe('terminal close codes', () => {
  it.each([4003, 4004])('%i stops reconnecting', async (code) => {
    const { client, disconnects } = make();
    client.connect();
    await tick();
    FakeSocket.last.accept();
    await tick();
    FakeSocket.last.serverClose(code);
    await vi.advanceTimersByTimeAsync(120_000);
    expect(FakeSocket.all).toHaveLength(1);
    expect(client.state).toBe('closed');
    expect(disconnects).toEqual([{ code, reason: '', willReconnect: false }]);
  });

  it('4001 with the same token again stops', async () => {
    const getToken = vi.fn(async () => 'the-same-token');
    const { client } = make({ getToken });
    client.connect();
    await tick();
    FakeSocket.last.serverClose(4001, 'invalid_signature');
    await vi.advanceTimersByTimeAsync(60_000);
    expect(getToken).toHaveBeenCalledTimes(2);
    expect(FakeSocket.all).toHaveLength(1);
    expect(client.state).toBe('closed');
  });

  it('4001 retries once with a fresh token, and stops when that is refused too', async () => {
    const { client, getToken } = make();
    client.connect();
    await tick();
    FakeSocket.last.serverClose(4001, 'expired');
    await vi.advanceTimersByTimeAsync(50);
    expect(FakeSocket.all).toHaveLength(2);
    expect(FakeSocket.last.token).toBe('token-2');
    FakeSocket.last.serverClose(4001, 'expired');
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeSocket.all).toHaveLength(2);
    expect(getToken).toHaveBeenCalledTimes(2);
    expect(client.state).toBe('closed');
  });

  it('a credential that expires on an open connection is renewed by reconnecting with a fresh token', async () => {
    const { client } = make();
    client.connect();
    await tick();
    FakeSocket.last.accept();
    await tick();
    FakeSocket.last.serverClose(4001, 'token expired');
    await vi.advanceTimersByTimeAsync(50);
    FakeSocket.last.accept();
    await tick();
    expect(client.state).toBe('open');
    expect(FakeSocket.all.map((s) => s.token)).toEqual(['token-1', 'token-2']);
  });

  it('a failing getToken is retried with backoff (it is not terminal)', async () => {
    let calls = 0;
    const getToken = vi.fn(async () => {
      if (++calls < 3) throw new Error('auth server down');
      return 'ok';
    });
    const { client } = make({ getToken });
    const errors: Error[] = [];
    client.onClientError((e) => errors.push(e));
    client.connect();
    await vi.advanceTimersByTimeAsync(50 + 100);
    expect(errors.map((e) => e.message)).toEqual(['auth server down', 'auth server down']);
    expect(FakeSocket.all).toHaveLength(1);
    expect(FakeSocket.last.token).toBe('ok');
  });
});

describe('rooms', () => {
  async function openWithRoom(opts: Partial<JobcastClientOptions> = {}) {
    const made = make(opts);
    made.client.connect();
    await tick();
    FakeSocket.last.accept();
    await tick();
    const joined = made.client.subscribe(ROOM);
    expect(FakeSocket.last.sentOfType('subscribe')).toEqual([{ type: 'subscribe', room: ROOM }]);
    FakeSocket.last.receive('subscribed', { room: ROOM, seq: 0, epoch: EPOCH, recovered: false, replayed: 0, snapshot: null });
    await tick();
    await joined;
    return made;
  }
  const ev = (seq: number, extra: object = {}) => ({ room: ROOM, seq, epoch: EPOCH, ...extra });

  it('delivers each seq once and resumes with since after a reconnect', async () => {
    const { client } = await openWithRoom();
    const seen: number[] = [];
    client.on('info', (e) => seen.push(e.seq));
    for (const seq of [1, 2, 2, 3, 1]) FakeSocket.last.receive('info', { n: seq }, ev(seq));
    await tick();
    expect(seen).toEqual([1, 2, 3]);
    expect(client.stats.duplicates).toBe(2);
    FakeSocket.last.serverClose(4000, 'disconnected by an admin');
    await vi.advanceTimersByTimeAsync(50);
    FakeSocket.last.accept();
    await tick();
    expect(FakeSocket.last.sentOfType('subscribe')).toEqual([
      { type: 'subscribe', room: ROOM, since: { seq: 3, epoch: EPOCH } },
    ]);
    FakeSocket.last.receive('subscribed', { room: ROOM, seq: 5, epoch: EPOCH, recovered: true, replayed: 2, snapshot: null });
    for (const seq of [3, 4, 5, 6]) FakeSocket.last.receive('info', { n: seq }, ev(seq));
    await tick();
    expect(seen).toEqual([1, 2, 3, 4, 5, 6]);
    expect(client.position(ROOM)).toEqual({ seq: 6, epoch: EPOCH });
    expect(client.stats.reconnects).toBe(1);
  });

  it('starts over from the room position when the history is lost (recovered: false)', async () => {
    const { client } = await openWithRoom();
    FakeSocket.last.receive('info', {}, ev(1));
    FakeSocket.last.serverClose(1001);
    await vi.advanceTimersByTimeAsync(50);
    FakeSocket.last.accept();
    FakeSocket.last.receive('subscribed', { room: ROOM, seq: 0, epoch: 'new-epoch', recovered: false, replayed: 0, snapshot: null });
    const seen: number[] = [];
    client.on('info', (e) => seen.push(e.seq));
    FakeSocket.last.receive('info', {}, { room: ROOM, seq: 1, epoch: 'new-epoch' });
    await tick();
    expect(seen).toEqual([1]);
    expect(client.position(ROOM)).toEqual({ seq: 1, epoch: 'new-epoch' });
  });

  it('batches cumulative acks and acknowledges redeliveries again', async () => {
    const { client } = await openWithRoom({ ack: true, ackIntervalMs: 100 });
    for (const seq of [1, 2, 3, 4, 5]) FakeSocket.last.receive('info', {}, ev(seq));
    await vi.advanceTimersByTimeAsync(99);
    expect(FakeSocket.last.sentOfType('ack')).toEqual([]);
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeSocket.last.sentOfType('ack')).toEqual([{ type: 'ack', room: ROOM, seq: 5 }]);
    FakeSocket.last.receive('info', {}, ev(4, { redelivered: true }));
    await vi.advanceTimersByTimeAsync(100);
    expect(FakeSocket.last.sentOfType('ack')).toHaveLength(2);
    expect(client.stats.acksSent).toBe(2);
    expect(new URL(FakeSocket.last.url).searchParams.get('ack')).toBe('1');
  });

  it('fromStart asks for the whole history of a room that already has events', async () => {
    const { client } = make();
    client.connect();
    await tick();
    FakeSocket.last.accept();
    await tick();
    const subscribedEvents: number[] = [];
    client.on('subscribed', (e) => subscribedEvents.push(e.data.seq));
    const seen: number[] = [];
    client.on('status', (e) => seen.push(e.seq));
    const joined = client.subscribe('job:5f0c2a7e-8b3d-4c1e-9a6f-2d4b7e9c1a30', { fromStart: true });
    const room = 'job:5f0c2a7e-8b3d-4c1e-9a6f-2d4b7e9c1a30';
    const st = (seq: number) => ({ room, seq, epoch: EPOCH });
    FakeSocket.last.receive('subscribed', { room, seq: 3, epoch: EPOCH, recovered: false, replayed: 0, snapshot: null });
    FakeSocket.last.receive('status', { status: 'parsing', message: '' }, st(4)); // live, before the replay
    await tick();
    expect(FakeSocket.last.sentOfType('subscribe').at(-1)).toEqual({ type: 'subscribe', room, since: { seq: 0, epoch: EPOCH } });
    FakeSocket.last.receive('subscribed', { room, seq: 4, epoch: EPOCH, recovered: true, replayed: 4, snapshot: null });
    for (const seq of [1, 2, 3, 4, 5]) FakeSocket.last.receive('status', { status: 'queued', message: '' }, st(seq));
    await tick();
    expect((await joined).recovered).toBe(true);
    expect(subscribedEvents).toEqual([4]);
    expect(seen).toEqual([1, 2, 3, 4, 5]);
  });

  it('follows a room the server joined it to (/ws/jobs/{id}) and fills the gap after a reconnect', async () => {
    const room = 'job:5f0c2a7e-8b3d-4c1e-9a6f-2d4b7e9c1a30';
    const { client } = make({ url: 'ws://jobcast.test/ws/jobs/5f0c2a7e-8b3d-4c1e-9a6f-2d4b7e9c1a30' });
    const seen: number[] = [];
    const subscribed: boolean[] = [];
    client.on('status', (e) => seen.push(e.seq));
    client.on('subscribed', (e) => subscribed.push(e.data.recovered));
    client.connect();
    await tick();
    FakeSocket.last.accept();
    const st = (seq: number) => ({ room, seq, epoch: EPOCH });
    FakeSocket.last.receive('subscribed', { room, seq: 2, epoch: EPOCH, recovered: false, replayed: 0, snapshot: null });
    for (const seq of [3, 4]) FakeSocket.last.receive('status', { status: 'parsing', message: '' }, st(seq));
    await tick();
    expect(seen).toEqual([3, 4]);
    expect(FakeSocket.last.sentOfType('subscribe')).toEqual([]);
    FakeSocket.last.serverClose(1006);
    await vi.advanceTimersByTimeAsync(50);
    FakeSocket.last.accept();
    await tick();
    expect(FakeSocket.last.sentOfType('subscribe')).toEqual([]); // the server joins by itself
    FakeSocket.last.receive('subscribed', { room, seq: 7, epoch: EPOCH, recovered: false, replayed: 0, snapshot: null });
    FakeSocket.last.receive('status', { status: 'parsing', message: '' }, st(8)); // live, before the replay
    await tick();
    expect(FakeSocket.last.sentOfType('subscribe')).toEqual([{ type: 'subscribe', room, since: { seq: 4, epoch: EPOCH } }]);
    FakeSocket.last.receive('subscribed', { room, seq: 8, epoch: EPOCH, recovered: true, replayed: 4, snapshot: null });
    for (const seq of [5, 6, 7, 8, 9]) FakeSocket.last.receive('status', { status: 'parsing', message: '' }, st(seq));
    await tick();
    expect(seen).toEqual([3, 4, 5, 6, 7, 8, 9]);
    expect(subscribed).toEqual([false, true]);
  });

  it('subscribe, unsubscribe, subscribe in one tick sends one subscribe (StrictMode)', async () => {
    const { client } = await openWithRoom();
    const room = 'user:alice';
    void client.subscribe(room).catch(() => undefined);
    client.unsubscribe(room);
    void client.subscribe(room);
    await vi.advanceTimersByTimeAsync(10);
    expect(FakeSocket.last.sentOfType('subscribe').filter((m) => m.room === room)).toHaveLength(1);
    expect(FakeSocket.last.sentOfType('unsubscribe')).toEqual([]);
    client.unsubscribe(room);
    await vi.advanceTimersByTimeAsync(10);
    expect(FakeSocket.last.sentOfType('unsubscribe')).toEqual([{ type: 'unsubscribe', room }]);
    expect(client.subscriptions).toEqual([ROOM]);
  });

  it('rejects a refused subscribe with a SubscriptionError', async () => {
    const { client } = await openWithRoom();
    const room = 'tenant:globex';
    const p = client.subscribe(room);
    FakeSocket.last.receive('error', { code: 'forbidden', message: `not allowed to join ${room}` });
    await tick();
    await expect(p).rejects.toBeInstanceOf(SubscriptionError);
    await expect(p).rejects.toMatchObject({ code: 'forbidden', room });
    expect(client.subscriptions).toEqual([ROOM]);
  });
});

describe('credential refresh and pings', () => {
  it('answers token_expiring with refresh and a token from getToken("refresh")', async () => {
    const { client, getToken } = make();
    client.connect();
    await tick();
    FakeSocket.last.accept();
    await tick();
    FakeSocket.last.receive('token_expiring', { expires_in_s: 60 });
    await tick();
    expect(getToken.mock.calls.map((c) => c[0])).toEqual(['connect', 'refresh']);
    expect(FakeSocket.last.sentOfType('refresh')).toEqual([{ type: 'refresh', token: 'token-2' }]);
    client.close();
  });

  it('pings, and drops a connection whose pong does not come', async () => {
    const { client, disconnects } = make({ pingIntervalMs: 1000, pongTimeoutMs: 500 });
    client.connect();
    await tick();
    FakeSocket.last.accept();
    await vi.advanceTimersByTimeAsync(1000);
    const [ping] = FakeSocket.last.sentOfType('ping');
    expect(ping).toMatchObject({ type: 'ping' });
    FakeSocket.last.receive('pong', { ts: '2026-11-22T08:00:00.000Z', client_ts: ping.ts });
    await vi.advanceTimersByTimeAsync(1000);
    expect(FakeSocket.last.sentOfType('ping')).toHaveLength(2);
    expect(client.state).toBe('open');
    await vi.advanceTimersByTimeAsync(500);
    expect(client.state).toBe('reconnecting');
    expect(disconnects.at(-1)).toMatchObject({ code: 4008, reason: 'pong timeout', willReconnect: true });
    expect(FakeSocket.all[0]!.closedByClient).not.toBeNull();
    client.close();
  });
});
