// JobcastClient against a real jobcast server (the cargo-built binary, started per file on port 0).

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import WebSocket from 'ws';

import { JobcastClient, type JobcastClientOptions, type TokenReason } from '../src/client.js';
import { isCsvImportResults, validateEnvelope, type Envelope, type RoomEnvelope } from '../src/protocol.js';
import { generateCsv, REPO_ROOT, startServer, type JobcastServer } from '../../test-support/server.js';

let server: JobcastServer;
const clients: JobcastClient[] = [];

beforeAll(async () => {
  server = await startServer(['--zone-rows', '10', '--history-size', '100000']);
});
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});
afterAll(async () => {
  await server?.stop();
});

/** A client for a fresh user of `tenant` whose getToken mints WebSocket tokens (connect) and access JWTs (refresh). */
async function clientFor(tenant: string, opts: Partial<JobcastClientOptions> & { ttl?: number } = {}) {
  const user = `u-${randomUUID().slice(0, 8)}`;
  const access = await server.token(user, tenant, { ttl: opts.ttl });
  const getToken = vi.fn(async (reason: TokenReason) =>
    reason === 'connect' ? server.wsToken(access) : server.token(user, tenant, { ttl: 3600 }),
  );
  const client = new JobcastClient({
    url: server.wsUrl,
    getToken,
    WebSocket: WebSocket as unknown as JobcastClientOptions['WebSocket'],
    reconnect: { baseMs: 50, capMs: 500 },
    ...opts,
  });
  clients.push(client);
  const events: Envelope[] = [];
  client.on('*', (e) => events.push(e));
  return { client, user, access, getToken, events };
}

async function opened(client: JobcastClient): Promise<void> {
  client.connect();
  await vi.waitFor(() => expect(client.state).toBe('open'), { timeout: 10_000 });
}

/** A counter from the server's /metrics. */
async function metric(name: string): Promise<number> {
  const text = (await server.http('GET', '/metrics')).text;
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  if (!line) throw new Error(`no metric ${name}`);
  return Number(line.split(' ')[1]);
}

const roomEvents = (events: Envelope[], room: string) => events.filter((e): e is RoomEnvelope => e.room === room);
const zoneIndexes = (events: Envelope[]) =>
  events.flatMap((e) => (e.type === 'zone_completed' ? [e.data.zone_index] : []));

describe('following an import', () => {
  it('subscribes first, uploads the sample and sees every event in order to processing_completed', async () => {
    const tenant = `t-${randomUUID().slice(0, 8)}`;
    const { client, access, events, getToken } = await clientFor(tenant, { ack: true });
    await opened(client);
    const jobId = randomUUID();
    const room = `job:${jobId}`;
    const sub = await client.subscribe(room);
    expect(sub).toMatchObject({ room, seq: 0, recovered: false, snapshot: { job_id: jobId, status: 'pending' } });
    const sample = readFileSync(join(REPO_ROOT, 'src', 'sample.csv'));
    const up = await server.upload(access, sample, { batchId: jobId, filename: 'sample.csv' });
    expect(up.status).toBe(202);
    expect(up.json.job_id).toBe(jobId);
    await vi.waitFor(() => expect(events.at(-1)).toMatchObject({ type: 'status', data: { status: 'completed' } }), {
      timeout: 30_000,
    });
    const job = roomEvents(events, room);
    expect(job.map((e) => e.seq)).toEqual(job.map((_, i) => i + 1));
    for (const e of events) expect(validateEnvelope(e)).toEqual([]);
    expect(job.slice(-3).map((e) => e.type)).toEqual(['processing_progress', 'processing_completed', 'status']);
    expect(job.at(-3)!.data).toMatchObject({ progress: 100, stage: 'categorization' });
    const started = job.find((e) => e.type === 'processing_started')!;
    const zones = (started.data as { zones_total: number }).zones_total;
    expect(zones).toBe(240);
    expect(zoneIndexes(events).sort((a, b) => a - b)).toEqual([...Array(zones).keys()]);
    const done = job.at(-2) as RoomEnvelope<'processing_completed'>;
    expect(isCsvImportResults(done.data.results) && done.data.results.processed_rows).toBe(2400);
    // Acknowledged delivery: the server saw every event of the room acknowledged, nothing had to be
    // redelivered, and the connection never dropped.
    // (acks go out on the client's ack timer, which a fast job can finish before)
    await vi.waitFor(async () => expect(await metric('jobcast_acknowledged_total')).toBe(job.length), { timeout: 5000 });
    expect(client.stats.acksSent).toBeGreaterThan(0);
    expect(await metric('jobcast_redelivered_total')).toBe(0);
    expect(events.some((e) => e.redelivered)).toBe(false);
    expect(client.stats.reconnects).toBe(0);
    expect(getToken).toHaveBeenCalledTimes(1);
    const listed = (await server.connections()).find((c) => c.connection_id === client.connectionId);
    expect(listed).toMatchObject({ ack: true, format: 'auto', rooms: expect.arrayContaining([room]) });
  });

  it('reconnects after an admin disconnect mid-job and loses no zone', async () => {
    const tenant = `t-${randomUUID().slice(0, 8)}`;
    const { client, access, events } = await clientFor(tenant);
    const disconnects: number[] = [];
    client.onDisconnect((d) => disconnects.push(d.code));
    await opened(client);
    const jobId = randomUUID();
    const room = `job:${jobId}`;
    await client.subscribe(room);
    const up = await server.upload(access, generateCsv(20_000), { batchId: jobId });
    expect(up.status).toBe(202);
    await vi.waitFor(() => expect(zoneIndexes(events).length).toBeGreaterThanOrEqual(5), { timeout: 20_000 });
    const firstConnection = client.connectionId!;
    const closed = await server.disconnect(firstConnection);
    expect(closed.status).toBe(200);
    const seenAtDisconnect = zoneIndexes(events).length;
    const snapshot = await server.http('GET', `/api/v1/jobs/${jobId}`, { token: access });
    expect(snapshot.json.status).not.toBe('completed'); // the disconnect really was mid-job
    await vi.waitFor(() => expect(events.at(-1)).toMatchObject({ type: 'status', data: { status: 'completed' } }), {
      timeout: 60_000,
    });
    expect(disconnects).toEqual([4000]);
    expect(client.stats.reconnects).toBe(1);
    expect(client.connectionId).not.toBe(firstConnection);
    const resumed = events.filter((e) => e.type === 'subscribed' && e.data.room === room);
    expect(resumed).toHaveLength(2);
    expect(resumed[1]!.data).toMatchObject({ recovered: true });
    const job = roomEvents(events, room);
    expect(job.map((e) => e.seq)).toEqual(job.map((_, i) => i + 1)); // no gap, no duplicate
    const indexes = zoneIndexes(events);
    expect(indexes.length).toBe(2000);
    expect(new Set(indexes).size).toBe(2000);
    expect(seenAtDisconnect).toBeLessThan(2000);
  });

  it('follows /ws/jobs/{id} through an admin disconnect without subscribing itself', async () => {
    const tenant = `t-${randomUUID().slice(0, 8)}`;
    const user = `u-${randomUUID().slice(0, 8)}`;
    const access = await server.token(user, tenant);
    const up = await server.upload(access, generateCsv(20_000));
    expect(up.status).toBe(202);
    const jobId = up.json.job_id as string;
    const client = new JobcastClient({
      url: `${server.wsUrl}/jobs/${jobId}`,
      getToken: () => server.wsToken(access),
      WebSocket: WebSocket as unknown as JobcastClientOptions['WebSocket'],
      reconnect: { baseMs: 50, capMs: 500 },
    });
    clients.push(client);
    const events: Envelope[] = [];
    client.on('*', (e) => events.push(e));
    client.connect();
    await vi.waitFor(() => expect(zoneIndexes(events).length).toBeGreaterThanOrEqual(5), { timeout: 20_000 });
    expect((await server.disconnect(client.connectionId!)).status).toBe(200);
    await vi.waitFor(() => expect(events.at(-1)).toMatchObject({ type: 'status', data: { status: 'completed' } }), {
      timeout: 60_000,
    });
    expect(client.stats.reconnects).toBe(1);
    const job = roomEvents(events, `job:${jobId}`);
    const first = job[0]!.seq;
    expect(job.map((e) => e.seq)).toEqual(job.map((_, i) => first + i)); // no gap, no duplicate
    expect(events.filter((e) => e.type === 'subscribed').map((e) => (e.data as { recovered: boolean }).recovered)).toEqual([
      false,
      true,
    ]);
  });
});

describe('connection features', () => {
  it('refreshes a credential that is about to expire', async () => {
    const tenant = `t-${randomUUID().slice(0, 8)}`;
    const { client, getToken, events } = await clientFor(tenant, { ttl: 62 });
    await opened(client);
    const firstExpiry = Date.parse(client.identity!.expires_at);
    expect(firstExpiry - Date.now()).toBeLessThan(63_000);
    await vi.waitFor(() => expect(events.some((e) => e.type === 'token_refreshed')).toBe(true), { timeout: 10_000 });
    const expiring = events.find((e) => e.type === 'token_expiring') as Envelope<'token_expiring'>;
    expect(expiring.data.expires_in_s).toBeLessThanOrEqual(60);
    expect(getToken.mock.calls.map((c) => c[0])).toEqual(['connect', 'refresh']);
    const refreshed = events.find((e) => e.type === 'token_refreshed') as Envelope<'token_refreshed'>;
    expect(Date.parse(refreshed.data.expires_at) - firstExpiry).toBeGreaterThan(3000_000);
    expect(client.state).toBe('open');
    expect(events.some((e) => e.type === 'error')).toBe(false);
  });

  it('decodes binary frames to the same objects as text frames', async () => {
    const tenant = `t-${randomUUID().slice(0, 8)}`;
    const auto = await clientFor(tenant, { format: 'auto' });
    const json = await clientFor(tenant, { format: 'json' });
    await Promise.all([opened(auto.client), opened(json.client)]);
    const room = `tenant:${tenant}`;
    await Promise.all([auto.client.subscribe(room), json.client.subscribe(room)]);
    const jobId = randomUUID();
    const bodies = [
      {
        type: 'processing_started',
        data: { job_id: jobId, kind: 'csv_import', filename: `${'long-name-'.repeat(150)}.csv`, size_bytes: 1, zones_total: 3 },
      },
      { type: 'info', data: { message: 'x'.repeat(2000), nested: { list: [1, 2.5, true, null, 'é'] } } },
      { type: 'status', data: { status: 'maintenance', message: 'short' } },
    ];
    for (const body of bodies) {
      const r = await server.http('POST', `/api/v1/admin/broadcast/${room}`, { token: server.adminToken, json: body });
      expect(r.status).toBe(200);
    }
    const got = (events: Envelope[]) => roomEvents(events, room);
    await vi.waitFor(() => {
      expect(got(auto.events)).toHaveLength(3);
      expect(got(json.events)).toHaveLength(3);
    });
    expect(got(auto.events)).toEqual(got(json.events));
    expect((got(auto.events)[0]!.data as { job_id: string }).job_id).toBe(jobId);
    for (const e of got(auto.events)) expect(validateEnvelope(e)).toEqual([]);
    expect(auto.client.stats.binaryFrames).toBe(2);
    expect(json.client.stats.binaryFrames).toBe(0);
  });

  it('stops for good on 4004 (unknown job on /ws/jobs/{id})', async () => {
    const { getToken } = await clientFor('default');
    const disconnects: number[] = [];
    const client = new JobcastClient({
      url: `${server.wsUrl}/jobs/${randomUUID()}`,
      getToken,
      WebSocket: WebSocket as unknown as JobcastClientOptions['WebSocket'],
      reconnect: { baseMs: 10, capMs: 20 },
    });
    clients.push(client);
    client.onDisconnect((d) => disconnects.push(d.code));
    client.connect();
    await vi.waitFor(() => expect(client.state).toBe('closed'), { timeout: 10_000 });
    expect(disconnects).toEqual([4004]);
    expect(getToken).toHaveBeenCalledTimes(1);
  });

  it('stops after a refused token when getToken has no other', async () => {
    const getToken = vi.fn(async () => 'not-a-jwt');
    const client = new JobcastClient({
      url: server.wsUrl,
      getToken,
      WebSocket: WebSocket as unknown as JobcastClientOptions['WebSocket'],
      reconnect: { baseMs: 10, capMs: 20 },
    });
    clients.push(client);
    const failures: string[] = [];
    client.on('auth_failure', (e) => failures.push(e.data.reason));
    client.connect();
    await vi.waitFor(() => expect(client.state).toBe('closed'), { timeout: 10_000 });
    expect(failures).toEqual(['malformed_token']);
    expect(getToken).toHaveBeenCalledTimes(2);
  });

  it('measures a round trip with an application ping', async () => {
    const { client } = await clientFor('default');
    await opened(client);
    const rtt = await client.ping();
    expect(rtt).toBeGreaterThanOrEqual(0);
    expect(rtt).toBeLessThan(5000);
  });
});
