// JobTracker folds the proto-docs' full worked import (subscribe first, then every event) into the
// state a progress UI shows.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

import { JobTracker } from '../src/job.js';
import { isCsvImportResults, type Envelope } from '../src/protocol.js';
import { REPO_ROOT } from '../../test-support/server.js';

const doc = readFileSync(join(REPO_ROOT, 'proto-docs', 'protocol.md'), 'utf8');
const from = doc.indexOf('### A full import, event by event');
const to = doc.indexOf('### The job snapshot');
const section = doc.slice(from, to);
const worked: Envelope[] = [...section.matchAll(/^```json server\n([\s\S]*?)^```/gm)].map((m) => JSON.parse(m[1]!));

describe('JobTracker on the worked import of proto-docs', () => {
  it('finds the example', () => {
    expect(from).toBeGreaterThan(0);
    expect(to).toBeGreaterThan(from);
    expect(worked[0]!.type).toBe('subscribed');
    expect(worked.length).toBe(20);
  });

  it('starts from the reservation snapshot and ends with the results', () => {
    const t = new JobTracker('5f0c2a7e-8b3d-4c1e-9a6f-2d4b7e9c1a30');
    t.apply(worked[0]!);
    expect(t.state()).toMatchObject({ status: 'pending', progress: 0, zones: [] });
    const progress: number[] = [];
    const statuses: string[] = [];
    for (const e of worked.slice(1)) {
      t.apply(e);
      progress.push(t.state().progress);
      statuses.push(t.state().status!);
    }
    // Progress never goes down; the statuses follow the bands.
    expect(progress).toEqual([...progress].sort((a, b) => a - b));
    expect([...new Set(statuses)]).toEqual(['queued', 'validating', 'scanning', 'parsing', 'processing', 'finalizing', 'completed']);
    const s = t.state();
    expect(s).toMatchObject({
      status: 'completed',
      stage: 'categorization',
      progress: 100,
      etaSeconds: null,
      zonesTotal: 3,
      zonesCompleted: 3,
      processed: 2480,
      total: 2480,
      errors: 2,
      filename: 'transactions-2026-10.csv',
      message: '2401 rows imported',
      operation: 'completed',
      error: null,
      finished: true,
      lastSeq: 19,
    });
    expect(s.zones).toEqual([
      { index: 0, state: 'completed', rows: 1000, errors: 1, durationMs: 578 },
      { index: 1, state: 'completed', rows: 1000, errors: 1, durationMs: 786 },
      { index: 2, state: 'completed', rows: 480, errors: 0, durationMs: 241 },
    ]);
    const results = s.results;
    if (!isCsvImportResults(results)) throw new Error(`not a CSV import's results: ${JSON.stringify(results)}`);
    expect(results.inserted).toBe(2401);
    expect(results.invalid_rows.map((r) => r.line)).toEqual([17, 1204]);
  });

  it('shows zones in flight, and a snapshot without history (recovered: false) mid-job', () => {
    const t = new JobTracker();
    for (const e of worked.slice(1, 9)) t.apply(e); // up to zone 0 completed, zone 1 processing
    expect(t.state().zones.map((z) => z.state)).toEqual(['completed', 'processing', 'pending']);
    const fresh = new JobTracker();
    fresh.applySubscribed({
      room: 'job:a41c6e0b-2f7d-4b58-9c13-6e8f0d2b7a94',
      seq: 31,
      epoch: '7b0e5d3c1a2f4e6d8c9b0a1f2e3d4c5b',
      recovered: false,
      replayed: 0,
      snapshot: {
        job_id: 'a41c6e0b-2f7d-4b58-9c13-6e8f0d2b7a94',
        room: 'job:a41c6e0b-2f7d-4b58-9c13-6e8f0d2b7a94',
        tenant: 'acme',
        status: 'parsing',
        stage: 'parsing',
        progress: 53.3,
        eta_seconds: 7.5,
        zones_total: 12,
        zones_completed: 5,
        processed: 5000,
        total: 11520,
        errors: 3,
      },
    });
    expect(fresh.state()).toMatchObject({ status: 'parsing', progress: 53.3, etaSeconds: 7.5, zonesTotal: 12, zonesCompleted: 5 });
    expect(fresh.state().zones).toHaveLength(12);
  });
});
