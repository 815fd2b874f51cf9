// JobWorker: reports a job's progress into jobcast from a Node worker (BullMQ, a script, a queue
// consumer). A backend holding a `publisher` token creates the job; the worker needs only the job
// token the creation answers (it authorizes this one job's reports, nothing else). Uses the global
// `fetch` (Node 18+, browsers) unless one is given.

import type { JsonValue, StageSpec } from './protocol.js';

/** A refused call: the HTTP status and the server's `{"error": {"code", "message"}}`. */
export class JobcastHttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(`${status} ${code}: ${message}`);
    this.name = 'JobcastHttpError';
  }

  /** 429 or 503 (the server's engines away): try again later. */
  get retryable(): boolean {
    return this.status === 429 || this.status === 503;
  }
}

/** What a new job is created with (`POST /api/v1/jobs`). */
export interface CreateJob {
  kind: string;
  title?: string;
  /** Stages with relative weights (`[["download", 1], ["resize", 3]]` or `{name, weight}`). */
  stages?: Array<StageSpec | [string, number] | string>;
  total?: number;
  metadata?: { [key: string]: JsonValue };
}

/** One report (`POST /api/v1/jobs/{id}/report`): the current stage's own fraction, or done/total. */
export interface Report {
  progress?: number;
  done?: number;
  total?: number;
  stage?: string;
  message?: string;
  metadata?: { [key: string]: JsonValue };
  step?: { id: string; index: number; status: 'processing' | 'completed' | 'failed'; duration_ms?: number };
}

type Fetch = typeof fetch;

async function call(fetchImpl: Fetch, url: string, token: string, body: unknown): Promise<Record<string, JsonValue>> {
  const res = await fetchImpl(url, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  let parsed: unknown = {};
  try {
    parsed = text ? JSON.parse(text) : {};
  } catch {
    parsed = {};
  }
  const answer = (typeof parsed === 'object' && parsed !== null ? parsed : {}) as Record<string, JsonValue>;
  if (!res.ok) {
    const err = (answer.error ?? {}) as { code?: string; message?: string };
    throw new JobcastHttpError(res.status, err.code ?? 'error', err.message ?? text);
  }
  return answer;
}

function stageSpecs(stages: CreateJob['stages']): StageSpec[] | undefined {
  return stages?.map((s) =>
    typeof s === 'string' ? { name: s, weight: 1 } : Array.isArray(s) ? { name: s[0], weight: s[1] } : s,
  );
}

/** A job reported from a worker. */
export class JobWorker {
  /** True once any answer said someone asked to cancel the job: stop, then `fail` or `complete`. */
  cancelRequested = false;
  /** The `seq` of the last event a call produced. */
  lastSeq: number | null = null;
  readonly room: string;
  private readonly base: string;

  constructor(
    server: string,
    readonly jobId: string,
    readonly token: string,
    private readonly fetchImpl: Fetch = globalThis.fetch.bind(globalThis),
  ) {
    this.base = server.replace(/\/+$/, '');
    this.room = `job:${jobId}`;
  }

  /** Creates a job (role `publisher`) and answers its worker handle. */
  static async create(server: string, publisherToken: string, job: CreateJob, fetchImpl?: Fetch): Promise<JobWorker> {
    const f = fetchImpl ?? globalThis.fetch.bind(globalThis);
    const body = { ...job, stages: stageSpecs(job.stages) };
    const answer = await call(f, `${server.replace(/\/+$/, '')}/api/v1/jobs`, publisherToken, body);
    return new JobWorker(server, String(answer.job_id), String(answer.token), f);
  }

  private async post(action: string, body: unknown): Promise<Record<string, JsonValue>> {
    const answer = await call(this.fetchImpl, `${this.base}/api/v1/jobs/${this.jobId}/${action}`, this.token, body);
    if (answer.cancel_requested === true) this.cancelRequested = true;
    if (typeof answer.seq === 'number') this.lastSeq = answer.seq;
    return answer;
  }

  /** Reports progress; answers whether a cancel was requested. */
  async report(report: Report): Promise<boolean> {
    await this.post('report', report);
    return this.cancelRequested;
  }

  /** Moves to stage `name` with its own fraction done. */
  stage(name: string, progress = 0, message?: string): Promise<boolean> {
    return this.report({ stage: name, progress, ...(message === undefined ? {} : { message }) });
  }

  /** A step: `zone_processing` / `zone_completed` in the room. */
  step(id: string, index: number, status: 'processing' | 'completed' | 'failed' = 'completed', durationMs?: number) {
    return this.report({ step: { id, index, status, ...(durationMs === undefined ? {} : { duration_ms: durationMs }) } });
  }

  /** Ends the job; answers its final status (`cancelled` when a cancel had been requested). */
  async complete(results?: JsonValue): Promise<string> {
    return String((await this.post('complete', { results: results ?? null })).status);
  }

  /** Ends the job failed; answers its final status (`cancelled` when a cancel had been requested). */
  async fail(error: string, recoverable = false): Promise<string> {
    return String((await this.post('fail', { error, recoverable })).status);
  }
}
