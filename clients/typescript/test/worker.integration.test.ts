// JobWorker (a Node worker reporting into a job that runs elsewhere) against a real jobcast server,
// with a JobcastClient watching the job's room.

import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import WebSocket from 'ws';

import { JobcastClient, type JobcastClientOptions } from '../src/client.js';
import { JobTracker } from '../src/job.js';
import type { Envelope } from '../src/protocol.js';
import { JobcastHttpError, JobWorker } from '../src/worker.js';
import { startServer, type JobcastServer } from '../../test-support/server.js';

let server: JobcastServer;

beforeAll(async () => {
  server = await startServer(['--progress-max-rate-per-s', '0']);
});
afterAll(async () => {
  await server?.stop();
});

describe('JobWorker', () => {
  it('reports stage-weighted progress and metadata that a watcher sees in order, then completes', async () => {
    const publisher = await server.token('svc', 'acme', { roles: ['publisher'] });
    const job = await JobWorker.create(server.url, publisher, {
      kind: 'thumbnails',
      stages: [['download', 1], ['resize', 3]],
      metadata: { album: 'summer' },
    });
    const access = await server.token('alice', 'acme');
    const client = new JobcastClient({
      url: server.wsUrl,
      getToken: async () => server.wsToken(access),
      WebSocket: WebSocket as unknown as JobcastClientOptions['WebSocket'],
    });
    const events: Envelope[] = [];
    client.onRoom(job.room, (e) => events.push(e));
    client.connect();
    await client.subscribe(job.room);
    expect(await job.stage('download', 1)).toBe(false);
    await job.report({ stage: 'resize', done: 1, total: 3, metadata: { last: 'a.jpg' } });
    expect(await job.complete({ resized: 3 })).toBe('completed');
    await vi.waitFor(() => expect(events.some((e) => e.type === 'processing_completed')).toBe(true), { timeout: 10_000 });
    client.close();
    const tracker = new JobTracker(job.jobId);
    events.forEach((e) => tracker.apply(e));
    const state = tracker.state();
    expect(state.status).toBe('completed');
    expect(state.metadata).toEqual({ album: 'summer', last: 'a.jpg' });
    const progress = events.filter((e) => e.type === 'processing_progress').map((e) => (e.data as { progress: number }).progress);
    expect(progress).toEqual([25, 50]);
    const seqs = events.map((e) => (e as { seq: number }).seq);
    expect(seqs).toEqual(seqs.map((_, i) => seqs[0]! + i));
  });

  it('learns of a cancel at its next report and ends the job cancelled', async () => {
    const publisher = await server.token('svc', 'acme', { roles: ['publisher'] });
    const job = await JobWorker.create(server.url, publisher, { kind: 'etl' });
    expect(await job.report({ progress: 0.1 })).toBe(false);
    const alice = await server.token('alice', 'acme');
    expect((await server.http('POST', `/api/v1/jobs/${job.jobId}/cancel`, { token: alice })).status).toBe(202);
    expect(await job.report({ progress: 0.2 })).toBe(true);
    expect(job.cancelRequested).toBe(true);
    expect(await job.fail('stopped on request')).toBe('cancelled');
  });

  it('gets typed errors for refused calls', async () => {
    const publisher = await server.token('svc', 'acme', { roles: ['publisher'] });
    const job = await JobWorker.create(server.url, publisher, { kind: 'etl' });
    await expect(job.report({ progress: 2 })).rejects.toMatchObject({ status: 400, code: 'bad_request' });
    const intruder = new JobWorker(server.url, (await JobWorker.create(server.url, publisher, { kind: 'etl' })).jobId, job.token);
    const refused = await intruder.report({ progress: 0.5 }).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(JobcastHttpError);
    expect((refused as JobcastHttpError).status).toBe(403);
    const plain = await server.token('bob', 'acme');
    await expect(JobWorker.create(server.url, plain, { kind: 'etl' })).rejects.toMatchObject({ status: 403 });
  });
});
