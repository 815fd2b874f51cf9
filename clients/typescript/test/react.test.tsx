// The React hooks (happy-dom + Testing Library) against a real jobcast server.

import { act, cleanup, render, screen, waitFor } from '@testing-library/react';
import { randomUUID } from 'node:crypto';
import { StrictMode, useState } from 'react';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';

import type { JobcastClientOptions, TokenReason } from '../src/client.js';
import { JobcastProvider, useConnectionState, useJob, useJobcast, useJobProgress, useRoom } from '../src/react.js';
import { isCsvImportResults } from '../src/protocol.js';
import { generateCsv, startServer, type JobcastServer } from '../../test-support/server.js';

let server: JobcastServer;
beforeAll(async () => {
  server = await startServer(['--zone-rows', '10']);
});
afterEach(() => cleanup());
afterAll(async () => {
  await server?.stop();
});

const WS = WebSocket as unknown as JobcastClientOptions['WebSocket'];

function Progress({ jobId }: { jobId: string }) {
  const p = useJobProgress(jobId);
  const completed = p.zones.filter((z) => z.state === 'completed').length;
  return (
    <div>
      <span data-testid="connection">{p.connection}</span>
      <span data-testid="subscription">{p.subscription}</span>
      <span data-testid="status">{p.status ?? 'unknown'}</span>
      <span data-testid="stage">{p.stage ?? ''}</span>
      <span data-testid="progress">{p.progress}</span>
      <span data-testid="zones">
        {completed}/{p.zones.length}
      </span>
      <span data-testid="inserted">{isCsvImportResults(p.results) ? p.results.inserted : ''}</span>
      <span data-testid="message">{p.message ?? ''}</span>
      <span data-testid="error">{p.error ?? ''}</span>
    </div>
  );
}

function RoomLog({ room }: { room: string }) {
  const [seqs, setSeqs] = useState<number[]>([]);
  const sub = useRoom(room, (e) => setSeqs((s) => [...s, e.seq]));
  const state = useConnectionState();
  const client = useJobcast();
  return (
    <div>
      <span data-testid="room-state">{state}</span>
      <span data-testid="room-joined">{sub.subscribed ? 'joined' : sub.error ? `error:${sub.error.message}` : 'joining'}</span>
      <span data-testid="room-seqs">{seqs.join(',')}</span>
      <span data-testid="connection-id">{client.connectionId ?? ''}</span>
    </div>
  );
}

async function userOf(tenant: string) {
  const user = `u-${randomUUID().slice(0, 8)}`;
  const access = await server.token(user, tenant);
  const getToken = (reason: TokenReason) => (reason === 'connect' ? server.wsToken(access) : Promise.resolve(access));
  return { user, access, getToken };
}

const text = (id: string) => screen.getByTestId(id).textContent;
const connectionsOf = async (user: string) => (await server.connections()).filter((c) => c.user_id === user);

describe('useJobProgress', () => {
  it('follows a job from the reservation snapshot to its results, with one socket under StrictMode', async () => {
    const tenant = `t-${randomUUID().slice(0, 8)}`;
    const { user, access, getToken } = await userOf(tenant);
    const jobId = randomUUID();
    const view = render(
      <StrictMode>
        <JobcastProvider url={server.wsUrl} getToken={getToken} WebSocket={WS}>
          <Progress jobId={jobId} />
        </JobcastProvider>
      </StrictMode>,
    );
    await waitFor(() => expect(text('subscription')).toBe('subscribed'), { timeout: 10_000 });
    expect(text('connection')).toBe('open');
    expect(text('status')).toBe('pending'); // from subscribed.snapshot
    const up = await server.upload(access, generateCsv(600), { batchId: jobId });
    expect(up.status).toBe(202);
    await waitFor(() => expect(text('status')).toBe('completed'), { timeout: 30_000 });
    expect(text('progress')).toBe('100');
    expect(text('stage')).toBe('categorization');
    expect(text('zones')).toBe('60/60');
    expect(text('inserted')).toBe('600');
    expect(text('message')).toBe('600 rows imported');
    expect(text('error')).toBe('');
    // StrictMode mounted, unmounted and mounted again: still one connection, in the job's room once.
    const conns = await connectionsOf(user);
    expect(conns).toHaveLength(1);
    expect(conns[0]!.rooms).toEqual([`job:${jobId}`]);
    view.unmount();
    await waitFor(async () => expect(await connectionsOf(user)).toHaveLength(0), { timeout: 10_000 });
  });

  it('replays a job uploaded before the hook mounted (fromStart), zones included', async () => {
    const tenant = `t-${randomUUID().slice(0, 8)}`;
    const { access, getToken } = await userOf(tenant);
    const up = await server.upload(access, generateCsv(300));
    expect(up.status).toBe(202);
    const jobId = up.json.job_id as string;
    // Let the job finish first: everything then has to come from the replay.
    await waitFor(
      async () => expect((await server.http('GET', `/api/v1/jobs/${jobId}`, { token: access })).json.status).toBe('completed'),
      { timeout: 30_000 },
    );
    render(
      <JobcastProvider url={server.wsUrl} getToken={getToken} WebSocket={WS}>
        <Progress jobId={jobId} />
      </JobcastProvider>,
    );
    await waitFor(() => expect(text('zones')).toBe('30/30'), { timeout: 10_000 });
    expect(text('status')).toBe('completed');
    expect(text('inserted')).toBe('300');
  });
});

type Photos = { album: string; last?: string };

function Worker({ jobId }: { jobId: string }) {
  const job = useJob<Photos>(jobId);
  return (
    <div>
      <span data-testid="w-status">{job.status ?? 'unknown'}</span>
      <span data-testid="w-progress">{job.progress}</span>
      <span data-testid="w-album">{job.metadata?.album ?? ''}</span>
      <span data-testid="w-last">{job.metadata?.last ?? ''}</span>
    </div>
  );
}

describe('useJob', () => {
  it('follows a job that runs elsewhere, its metadata typed', { timeout: 30_000 }, async () => {
    // The worker's side over Node's HTTP (happy-dom's fetch applies the browser's CORS rules).
    const publisher = await server.token('svc', 'acme', { roles: ['publisher'] });
    const created = await server.http('POST', '/api/v1/jobs', { token: publisher, json: { kind: 'photos', metadata: { album: 'summer' } } });
    const job = { jobId: created.json.job_id as string, token: created.json.token as string };
    const report = (action: string, json: unknown) => server.http('POST', `/api/v1/jobs/${job.jobId}/${action}`, { token: job.token, json });
    const { getToken } = await userOf('acme');
    render(
      <JobcastProvider url={server.wsUrl} getToken={getToken} WebSocket={WS}>
        <Worker jobId={job.jobId} />
      </JobcastProvider>,
    );
    await waitFor(() => expect(text('w-album')).toBe('summer'), { timeout: 10_000 });
    await report('report', { progress: 0.5, metadata: { last: 'b.jpg' } });
    await waitFor(() => expect(text('w-last')).toBe('b.jpg'), { timeout: 10_000 });
    await report('complete', { results: { resized: 2 } });
    await waitFor(() => expect(text('w-status')).toBe('completed'), { timeout: 10_000 });
    expect(text('w-progress')).toBe('100');
  });
});

describe('useRoom', () => {
  it('delivers a room’s events in order, and leaves the room on unmount', async () => {
    const tenant = `t-${randomUUID().slice(0, 8)}`;
    const { user, getToken } = await userOf(tenant);
    const room = `tenant:${tenant}`;
    function App() {
      const [shown, setShown] = useState(true);
      return (
        <JobcastProvider url={server.wsUrl} getToken={getToken} WebSocket={WS}>
          <button onClick={() => setShown(false)}>hide</button>
          {shown && <RoomLog room={room} />}
        </JobcastProvider>
      );
    }
    render(
      <StrictMode>
        <App />
      </StrictMode>,
    );
    await waitFor(() => expect(text('room-joined')).toBe('joined'), { timeout: 10_000 });
    expect(text('room-state')).toBe('open');
    for (const n of [1, 2, 3]) {
      const r = await server.http('POST', `/api/v1/admin/broadcast/${room}`, {
        token: server.adminToken,
        json: { type: 'info', data: { n } },
      });
      expect(r.status).toBe(200);
    }
    await waitFor(() => expect(text('room-seqs')).toBe('1,2,3'));
    act(() => screen.getByText('hide').click());
    await waitFor(async () => expect((await connectionsOf(user))[0]?.rooms).toEqual([]), { timeout: 10_000 });
    // The provider is still mounted: the connection stays.
    expect(await connectionsOf(user)).toHaveLength(1);
  });

  it('reports a refused room', async () => {
    const { getToken } = await userOf('default');
    render(
      <JobcastProvider url={server.wsUrl} getToken={getToken} WebSocket={WS}>
        <RoomLog room="tenant:someone-else" />
      </JobcastProvider>,
    );
    await waitFor(() => expect(text('room-joined')).toBe('error:not allowed to join tenant:someone-else'), {
      timeout: 10_000,
    });
  });
});
