// HTTP calls of the demo page, the access token, and small helpers.

import { JobWorker } from '@jobcast/client';

/** An error answer of the HTTP API, `{"error": {"code", "message"}}`, or a network failure. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

async function call<T>(method: string, path: string, token: string, body?: BodyInit): Promise<T> {
  let res: Response;
  try {
    res = await fetch(path, { method, body, headers: { Authorization: `Bearer ${token}` } });
  } catch (e) {
    throw new ApiError(0, 'network', `the server cannot be reached (${(e as Error).message})`);
  }
  const text = await res.text();
  let json: any = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    /* not JSON */
  }
  if (!res.ok) {
    const err = json?.error;
    throw new ApiError(res.status, err?.code ?? 'http', err?.message ?? `HTTP ${res.status}`);
  }
  return json as T;
}

/** A single-use WebSocket token for the access token (`POST /api/v1/auth/websocket-token`). */
export async function websocketToken(access: string): Promise<string> {
  const r = await call<{ token: string }>('POST', '/api/v1/auth/websocket-token', access);
  return r.token;
}

/** Uploads a CSV as job `batchId` (`POST /api/v1/uploads`, multipart fields batch_id and file). */
export function upload(access: string, batchId: string, file: File): Promise<{ job_id: string; room: string }> {
  const form = new FormData();
  form.append('batch_id', batchId);
  form.append('file', file, file.name);
  return call('POST', '/api/v1/uploads', access, form);
}

/** Asks the server to cancel a job (`POST /api/v1/jobs/{id}/cancel`). */
export function cancelJob(access: string, jobId: string): Promise<{ status: string }> {
  return call('POST', `/api/v1/jobs/${jobId}/cancel`, access);
}

/**
 * A simulated worker: creates a job that runs "elsewhere" (`POST /api/v1/jobs`, which an admin or
 * publisher token may do) and reports into it from the page with its job token, stage by stage,
 * as a Celery task or a Node worker would; it stops (and fails, which the server turns into
 * `cancelled`) when a report answers `cancel_requested`. Answers the job id at once; the work goes
 * on in the background.
 */
export async function startSimulatedWorker(access: string, onDone: (status: string) => void): Promise<string> {
  const job = await JobWorker.create(window.location.origin, access, {
    kind: 'simulated_worker',
    title: 'Simulated worker (this page)',
    stages: [
      ['fetch', 1],
      ['transform', 2],
      ['load', 1],
    ],
    metadata: { source: 'demo page' },
  });
  const pause = () => new Promise((r) => setTimeout(r, 120));
  void (async () => {
    try {
      let step = 0;
      for (const stage of ['fetch', 'transform', 'load']) {
        for (let i = 1; i <= 5; i++) {
          await pause();
          await job.step(`${stage}-${i}`, step, 'completed', 120);
          step++;
          if (await job.report({ stage, progress: i / 5, message: `${stage} ${i} of 5`, metadata: { step } })) {
            onDone(await job.fail('stopped on request'));
            return;
          }
        }
      }
      onDone(await job.complete({ items: step }));
    } catch (e) {
      onDone(`error: ${(e as Error).message}`);
    }
  })();
  return job.jobId;
}

/** The bundled sample (`/demo/sample.csv`) as a File. */
export async function sampleFile(): Promise<File> {
  let res: Response;
  try {
    res = await fetch('/demo/sample.csv');
  } catch (e) {
    throw new ApiError(0, 'network', `the sample cannot be fetched (${(e as Error).message})`);
  }
  if (!res.ok) throw new ApiError(res.status, 'http', `the sample cannot be fetched (HTTP ${res.status})`);
  return new File([await res.blob()], 'sample.csv', { type: 'text/csv' });
}

/** What the page can read from an access JWT (it cannot verify it; the server does). */
export interface Identity {
  user: string;
  tenant: string;
  roles: string[];
  expires: Date | null;
}

export function readToken(token: string): Identity | null {
  const part = token.split('.')[1];
  if (!part) return null;
  try {
    const json = atob(part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '='));
    const claims = JSON.parse(json);
    if (typeof claims.sub !== 'string') return null;
    return {
      user: claims.sub,
      tenant: String(claims.tenant ?? ''),
      roles: Array.isArray(claims.roles) ? claims.roles.map(String) : [],
      expires: typeof claims.exp === 'number' ? new Date(claims.exp * 1000) : null,
    };
  } catch {
    return null;
  }
}

/** A random UUID v4 (crypto.randomUUID needs a secure context; getRandomValues does not). */
export function uuid4(): string {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export function formatSeconds(s: number): string {
  if (s < 60) return `${Math.max(0, Math.round(s))} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - m * 60)} s`;
}
