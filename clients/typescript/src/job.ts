// JobTracker: folds a job room's `subscribed` answers and events into the job's current state (what a
// progress UI shows). Framework-free; `useJobProgress` renders it, and tests feed it directly.

import type { Envelope, JobResults, JobSnapshot, JsonValue, SubscribedData } from './protocol.js';
import { FINAL_STATUSES } from './protocol.js';

/** One zone of a job. */
export interface ZoneState {
  index: number;
  state: 'pending' | 'processing' | 'completed';
  rows?: number;
  errors?: number;
  durationMs?: number;
}

/** A job as the events have told it so far. */
export interface JobState {
  jobId: string | null;
  /** `pending` (reserved, not uploaded), `queued` ... `completed`, `failed`, `cancelled`; null: unknown. */
  status: string | null;
  /** The stage progress is in: validation, scanning, parsing, database, categorization. */
  stage: string | null;
  /** 0–100. */
  progress: number;
  etaSeconds: number | null;
  /** One entry per zone once `zones_total` is known; filled by zone_processing / zone_completed. */
  zones: ZoneState[];
  zonesTotal: number;
  zonesCompleted: number;
  processed: number;
  total: number;
  /** Invalid rows so far. */
  errors: number;
  /** The last status message ("waiting for a slot", "2 zones of 3" ...). */
  message: string | null;
  /** The last `current_operation` of processing_progress. */
  operation: string | null;
  /** Why the job failed (processing_failed), or null. */
  error: string | null;
  recoverable: boolean | null;
  /** `CsvImportResults` for CSV imports (`isCsvImportResults`), the worker's own for other jobs. */
  results: JobResults | null;
  filename: string | null;
  cancelledBy: string | null;
  /** Jobs that run elsewhere: who asked to cancel it (the worker has not ended it yet), or null. */
  cancelRequestedBy: string | null;
  /** Jobs that run elsewhere: its worker has been silent for `job_stall_timeout_s`. */
  stalled: boolean;
  /** Jobs that run elsewhere: the job's merged metadata (null until there is some). */
  metadata: JsonValue | null;
  /** Whether the job has ended (completed, failed or cancelled). */
  finished: boolean;
  /** Seq of the last event applied. */
  lastSeq: number;
}

export function initialJobState(jobId: string | null = null): JobState {
  return {
    jobId,
    status: null,
    stage: null,
    progress: 0,
    etaSeconds: null,
    zones: [],
    zonesTotal: 0,
    zonesCompleted: 0,
    processed: 0,
    total: 0,
    errors: 0,
    message: null,
    operation: null,
    error: null,
    recoverable: null,
    results: null,
    filename: null,
    cancelledBy: null,
    cancelRequestedBy: null,
    stalled: false,
    metadata: null,
    finished: false,
    lastSeq: 0,
  };
}

/** Mutable accumulator of a job's state; `state()` returns an immutable copy. */
export class JobTracker {
  private s: JobState;
  /** Zones in state `completed` (kept as events come, not counted each time). */
  private completed = 0;

  constructor(jobId: string | null = null) {
    this.s = initialJobState(jobId);
  }

  /** A copy safe to hand to a renderer (zone entries are replaced, never mutated). */
  state(): JobState {
    return { ...this.s, zones: this.s.zones.slice() };
  }

  private sizeZones(total: number): void {
    if (total <= 0 || total === this.s.zones.length) return;
    const zones = this.s.zones.slice(0, total);
    for (let i = zones.length; i < total; i++) zones.push({ index: i, state: 'pending' });
    this.s.zones = zones;
    this.s.zonesTotal = total;
    this.completed = this.countCompleted();
  }

  private countCompleted(): number {
    let n = 0;
    for (const z of this.s.zones) if (z.state === 'completed') n++;
    return n;
  }

  private setStatus(status: string): void {
    this.s.status = status;
    this.s.finished = FINAL_STATUSES.includes(status);
    if (this.s.finished) this.s.etaSeconds = null;
  }

  /** Applies a `subscribed` answer: a snapshot resets the state unless the history is being replayed. */
  applySubscribed(data: SubscribedData): void {
    // A job's creation metadata is in its snapshot only (events carry it from the first report on).
    if (data.snapshot?.metadata !== undefined && this.s.metadata === null) this.s.metadata = data.snapshot.metadata;
    if (data.recovered || !data.snapshot) return;
    this.applySnapshot(data.snapshot);
  }

  /** Applies a job snapshot (`subscribed.snapshot` or `GET /api/v1/jobs/{id}`). */
  applySnapshot(snap: JobSnapshot): void {
    const s = this.s;
    s.jobId = snap.job_id ?? s.jobId;
    this.setStatus(snap.status);
    if (snap.stage) s.stage = snap.stage;
    if (typeof snap.progress === 'number') s.progress = Math.max(s.progress, snap.progress);
    s.etaSeconds = snap.eta_seconds ?? null;
    if (snap.filename) s.filename = snap.filename;
    if (snap.zones_total) this.sizeZones(snap.zones_total);
    if (snap.status === 'completed') {
      s.zones = s.zones.map((z) => (z.state === 'completed' ? z : { ...z, state: 'completed' }));
      this.completed = s.zones.length;
    }
    s.zonesCompleted = Math.max(this.completed, snap.zones_completed ?? 0);
    if (typeof snap.processed === 'number') s.processed = snap.processed;
    if (typeof snap.total === 'number') s.total = snap.total;
    if (typeof snap.errors === 'number') s.errors = snap.errors;
    if (snap.results) s.results = snap.results;
    if (snap.metadata !== undefined) s.metadata = snap.metadata;
    s.stalled = snap.stalled === true;
    if (snap.cancel_requested && s.cancelRequestedBy === null) s.cancelRequestedBy = '';
    if (snap.error) {
      s.error = snap.error.message;
      s.recoverable = snap.error.recoverable;
    }
  }

  /** Applies one event of the job's room (other types are ignored). */
  apply(env: Envelope): void {
    const s = this.s;
    if (env.type === 'subscribed') return this.applySubscribed(env.data);
    if (typeof env.seq === 'number') s.lastSeq = env.seq;
    switch (env.type) {
      case 'status':
        if (env.data.job_id && s.jobId && env.data.job_id !== s.jobId) return;
        this.setStatus(env.data.status);
        s.message = env.data.message;
        break;
      case 'processing_started':
        s.filename = env.data.filename;
        this.sizeZones(env.data.zones_total);
        break;
      case 'processing_progress': {
        const d = env.data;
        s.progress = Math.max(s.progress, d.progress);
        s.stage = d.stage;
        s.etaSeconds = d.eta_seconds ?? null;
        this.sizeZones(d.zones_total);
        s.zonesCompleted = Math.max(s.zonesCompleted, d.zones_completed);
        s.processed = d.processed;
        s.total = d.total;
        s.errors = d.errors;
        s.operation = d.current_operation;
        if (d.metadata !== undefined) s.metadata = d.metadata;
        s.stalled = false;
        break;
      }
      case 'zone_processing': {
        const i = env.data.zone_index;
        if (i >= s.zones.length) this.sizeZones(i + 1);
        if (s.zones[i]!.state !== 'completed') s.zones[i] = { index: i, state: 'processing' };
        break;
      }
      case 'zone_completed': {
        const d = env.data;
        if (d.zone_index >= s.zones.length) this.sizeZones(d.zone_index + 1);
        if (s.zones[d.zone_index]!.state !== 'completed') this.completed++;
        s.zones[d.zone_index] = {
          index: d.zone_index,
          state: 'completed',
          rows: d.rows,
          errors: d.errors,
          durationMs: d.duration_ms,
        };
        s.zonesCompleted = Math.max(s.zonesCompleted, this.completed);
        break;
      }
      case 'processing_completed':
        s.results = env.data.results;
        s.progress = 100;
        this.setStatus('completed');
        break;
      case 'processing_failed':
        s.error = env.data.error;
        s.recoverable = env.data.recoverable;
        this.setStatus('failed');
        break;
      case 'job_cancelled':
        s.cancelledBy = env.data.by;
        this.setStatus('cancelled');
        break;
      case 'cancel_requested':
        s.cancelRequestedBy = env.data.by;
        break;
      case 'job_stalled':
        s.stalled = true;
        break;
    }
  }
}
