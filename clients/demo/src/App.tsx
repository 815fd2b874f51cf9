// The jobcast demo page: upload a CSV, watch its import live, cancel it.

import { memo, useCallback, useEffect, useMemo, useRef, useState, type DragEvent, type ReactNode } from 'react';

import {
  isCsvImportResults,
  STAGES,
  type ConnectionState,
  type CsvImportResults,
  type Envelope,
  type TokenReason,
  type ZoneState,
} from '@jobcast/client';
import { JobcastProvider, useConnectionState, useJobcast, useJobProgress, type JobProgress } from '@jobcast/client/react';

import {
  ApiError,
  cancelJob,
  formatBytes,
  formatSeconds,
  readToken,
  sampleFile,
  startSimulatedWorker,
  upload,
  uuid4,
  websocketToken,
  type Identity,
} from './api.js';
import { Log, useLog, type LogEntry } from './log.js';

const TOKEN_KEY = 'jobcast.demo.token';

/** The token from `?token=` (then removed from the address bar) or from localStorage. */
function initialToken(): string {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get('token');
  if (fromUrl) {
    try {
      localStorage.setItem(TOKEN_KEY, fromUrl);
    } catch {
      /* storage may be off */
    }
    url.searchParams.delete('token');
    history.replaceState(null, '', url.pathname + url.search + url.hash);
    return fromUrl;
  }
  try {
    return localStorage.getItem(TOKEN_KEY) ?? '';
  } catch {
    return '';
  }
}

export function App(): ReactNode {
  const [token, setToken] = useState(initialToken);
  const tokenRef = useRef(token);
  tokenRef.current = token.trim();
  const identity = useMemo(() => readToken(token.trim()), [token]);
  const log = useMemo(() => new Log(), []);
  const getToken = useCallback(async (reason: TokenReason) => {
    const access = tokenRef.current;
    if (!access) throw new Error('no access token');
    // 'connect': exchange it for a single-use WebSocket token; 'refresh': the access token itself.
    return reason === 'connect' ? websocketToken(access) : access;
  }, []);
  const onToken = (value: string) => {
    setToken(value);
    try {
      localStorage.setItem(TOKEN_KEY, value.trim());
    } catch {
      /* ignore */
    }
  };
  const hasToken = token.trim() !== '';
  return (
    <>
      {hasToken ? (
        <JobcastProvider url="/ws" getToken={getToken} ack>
          <Header>
            <ConnectionBadge />
          </Header>
          <main>
            <TokenPanel token={token} onToken={onToken} identity={identity} />
            <Reconnector token={token} />
            <Importer tokenRef={tokenRef} identity={identity} log={log} />
          </main>
        </JobcastProvider>
      ) : (
        <>
          <Header>
            <p className="conn" data-state="idle" role="status">
              <span className="dot" aria-hidden="true" />
              No token
            </p>
          </Header>
          <main>
            <TokenPanel token={token} onToken={onToken} identity={identity} />
          </main>
        </>
      )}
    </>
  );
}

function Header({ children }: { children: ReactNode }) {
  return (
    <header className="top">
      <h1>
        jobcast <span className="sub">live CSV import</span>
      </h1>
      {children}
    </header>
  );
}

const STATE_TEXT: Record<ConnectionState, string> = {
  idle: 'Not connected',
  connecting: 'Connecting…',
  open: 'Live',
  reconnecting: 'Reconnecting…',
  closed: 'Disconnected',
};

function ConnectionBadge() {
  const state = useConnectionState();
  return (
    <p className="conn" data-state={state} role="status" aria-label={`Connection: ${STATE_TEXT[state]}`}>
      <span className="dot" aria-hidden="true" />
      {STATE_TEXT[state]}
    </p>
  );
}

/** After a refused token the client stops; a new token starts it again. */
function Reconnector({ token }: { token: string }) {
  const client = useJobcast();
  const first = useRef(true);
  useEffect(() => {
    if (first.current) {
      first.current = false;
      return;
    }
    if (client.state === 'closed') client.connect();
  }, [client, token]);
  return null;
}

function TokenPanel(props: { token: string; onToken: (t: string) => void; identity: Identity | null }) {
  const [shown, setShown] = useState(false);
  const { identity, token } = props;
  return (
    <section className="card" aria-labelledby="token-h">
      <h2 id="token-h">Access token</h2>
      <label htmlFor="token">Access token (JWT)</label>
      <div className="row">
        <input
          id="token"
          type={shown ? 'text' : 'password'}
          autoComplete="off"
          spellCheck={false}
          value={token}
          onChange={(e) => props.onToken(e.target.value)}
          aria-describedby="token-hint"
        />
        <button type="button" className="secondary" aria-pressed={shown} onClick={() => setShown(!shown)}>
          {shown ? 'Hide' : 'Show'}
        </button>
      </div>
      <p id="token-hint" className="hint">
        {identity ? (
          <>
            Signed in as <strong>{identity.user}</strong> · tenant <strong>{identity.tenant}</strong>
            {identity.roles.length > 0 && <> · {identity.roles.join(', ')}</>}
            {identity.expires && <> · expires {identity.expires.toLocaleString()}</>}
          </>
        ) : token.trim() ? (
          'This does not look like a JWT.'
        ) : (
          <>
            Open the address <code>jobcast serve</code> printed with <code>?token=</code> and its development token, or
            paste a token from <code>jobcast token --user you --tenant default</code>.
          </>
        )}
      </p>
    </section>
  );
}

interface Job {
  id: string;
  file: File;
  /** Subscribe first and upload once joined (users); admins upload first and replay the room from its start. */
  mode: 'subscribe-first' | 'upload-first';
  upload: 'waiting' | 'sending' | 'accepted' | 'refused';
}

function Importer({ tokenRef, identity, log }: { tokenRef: { current: string }; identity: Identity | null; log: Log }) {
  const client = useJobcast();
  const [job, setJob] = useState<Job | null>(null);
  const [watch, setWatch] = useState<string | null>(null);
  const [errors, setErrors] = useState<string[]>([]);
  const [cancelling, setCancelling] = useState(false);
  const progress = useJobProgress(watch);
  const addError = useCallback(
    (message: string) => {
      setErrors((e) => [...e.slice(-3), message]);
      log.add('error', message);
    },
    [log],
  );

  // Connection-level happenings into the log and the error box.
  useEffect(() => {
    const offs = [
      client.onState((state, prev) => {
        if (state === 'open' && prev === 'reconnecting') log.add('connection', 'reconnected');
      }),
      client.onDisconnect((d) => {
        const why = `${d.code}${d.reason ? ` ${d.reason}` : ''}`;
        if (d.willReconnect) log.add('connection', `connection lost (${why}); reconnecting in ${d.delayMs} ms`);
        else addError(`The connection was closed (${why}). Check the access token.`);
      }),
      client.onClientError((e) => {
        const msg = e instanceof ApiError && e.status === 401 ? `The access token was refused: ${e.message}` : e.message;
        addError(msg);
      }),
      client.on('*', (e) => {
        const text = describe(e);
        if (text) log.add(e.room ? 'event' : e.type === 'error' || e.type === 'auth_failure' ? 'error' : 'connection', text, e.seq);
        if (e.type === 'auth_failure') setErrors((x) => [...x.slice(-3), `Authentication failed: ${e.data.reason}`]);
        if (e.type === 'error' && e.data.code !== 'unknown_room') setErrors((x) => [...x.slice(-3), `Server: ${e.data.message}`]);
      }),
    ];
    return () => offs.forEach((off) => off());
  }, [client, log, addError]);

  const sendUpload = useCallback(
    async (j: Job) => {
      setJob((cur) => (cur?.id === j.id ? { ...cur, upload: 'sending' } : cur));
      log.add('app', `uploading ${j.file.name} (${formatBytes(j.file.size)}) as job ${j.id}`);
      try {
        await upload(tokenRef.current, j.id, j.file);
        log.add('app', 'upload accepted (202)');
        setJob((cur) => (cur?.id === j.id ? { ...cur, upload: 'accepted' } : cur));
        return true;
      } catch (e) {
        addError(`Upload refused: ${(e as Error).message}`);
        setJob((cur) => (cur?.id === j.id ? { ...cur, upload: 'refused' } : cur));
        return false;
      }
    },
    [addError, log, tokenRef],
  );

  const start = useCallback(
    async (file: File) => {
      setErrors([]);
      setCancelling(false);
      log.clear();
      const admin = identity?.roles.includes('admin') ?? false;
      const j: Job = { id: uuid4(), file, mode: admin ? 'upload-first' : 'subscribe-first', upload: 'waiting' };
      setJob(j);
      if (j.mode === 'subscribe-first') {
        setWatch(j.id); // uploads once the room is joined (effect below)
      } else {
        setWatch(null);
        if (await sendUpload(j)) setWatch(j.id);
      }
    },
    [identity, log, sendUpload],
  );

  // Subscribe first, then upload: nothing of the job can be missed.
  useEffect(() => {
    if (!job || job.mode !== 'subscribe-first' || job.upload !== 'waiting' || watch !== job.id) return;
    if (progress.subscription === 'subscribed') void sendUpload(job);
    if (progress.subscription === 'error') {
      // An admin token (not reserving rooms): upload first, then replay the room from its start.
      const j: Job = { ...job, mode: 'upload-first' };
      setJob(j);
      setWatch(null);
      void sendUpload(j).then((ok) => ok && setWatch(j.id));
    }
  }, [job, watch, progress.subscription, sendUpload]);

  // A job that runs elsewhere, reported by a worker simulated in this page.
  const simulate = async () => {
    setErrors([]);
    setCancelling(false);
    log.clear();
    try {
      const id = await startSimulatedWorker(tokenRef.current, (status) => log.add('app', `the simulated worker ended: ${status}`));
      log.add('app', `simulated worker job ${id} created; its worker reports with the job token`);
      setJob({ id, file: new File([], 'simulated worker'), mode: 'upload-first', upload: 'accepted' });
      setWatch(id);
    } catch (e) {
      addError(`The simulated worker could not start: ${(e as Error).message}`);
    }
  };

  const useSample = async () => {
    try {
      await start(await sampleFile());
    } catch (e) {
      addError((e as Error).message);
    }
  };

  const cancel = async () => {
    if (!job) return;
    setCancelling(true);
    log.add('app', 'cancel requested');
    try {
      await cancelJob(tokenRef.current, job.id);
    } catch (e) {
      setCancelling(false);
      addError(`Cancel refused: ${(e as Error).message}`);
    }
  };

  const running =
    job !== null && job.upload === 'accepted' && !progress.finished && progress.status !== 'finalizing';
  const busy = job !== null && (job.upload === 'waiting' || job.upload === 'sending' || running);
  const failure = progress.error ? [`The import failed: ${progress.error}`] : [];
  const shownErrors = [...errors, ...failure];

  return (
    <>
      <FilePanel
        onFile={(f) => void start(f)}
        onSample={() => void useSample()}
        onSimulate={() => void simulate()}
        disabled={busy}
      />
      <section className="card" aria-labelledby="job-h">
        <h2 id="job-h">Import</h2>
        {shownErrors.length > 0 && (
          <div className="errors" role="alert">
            {shownErrors.map((e, i) => (
              <p key={i}>{e}</p>
            ))}
          </div>
        )}
        {job ? (
          <JobView job={job} progress={progress} onCancel={() => void cancel()} canCancel={running && !cancelling} />
        ) : (
          <p className="hint">Choose a CSV file or use the sample to start an import.</p>
        )}
      </section>
      {isCsvImportResults(progress.results) && <Results results={progress.results} />}
      <EventLog log={log} />
    </>
  );
}

function FilePanel(props: { onFile: (f: File) => void; onSample: () => void; onSimulate: () => void; disabled: boolean }) {
  const [over, setOver] = useState(false);
  const input = useRef<HTMLInputElement>(null);
  const drop = (e: DragEvent) => {
    e.preventDefault();
    setOver(false);
    const f = e.dataTransfer.files[0];
    if (f && !props.disabled) props.onFile(f);
  };
  return (
    <section className="card" aria-labelledby="file-h">
      <h2 id="file-h">CSV file</h2>
      <div
        className={`drop${over ? ' over' : ''}`}
        onDragOver={(e) => {
          e.preventDefault();
          setOver(true);
        }}
        onDragLeave={() => setOver(false)}
        onDrop={drop}
      >
        <input
          ref={input}
          id="file"
          className="visually-hidden"
          type="file"
          accept=".csv,.txt,text/csv"
          disabled={props.disabled}
          onChange={(e) => {
            const f = e.target.files?.[0];
            if (f) props.onFile(f);
            e.target.value = '';
          }}
        />
        <label htmlFor="file" className={`button${props.disabled ? ' disabled' : ''}`}>
          Choose a CSV file
        </label>
        <span className="or">or drop one here, or</span>
        <button type="button" className="secondary" onClick={props.onSample} disabled={props.disabled}>
          Use the sample
        </button>
        <span className="or">or</span>
        <button type="button" className="secondary" onClick={props.onSimulate} disabled={props.disabled}>
          Run a simulated worker
        </button>
      </div>
      <p className="hint">The file needs the columns date, amount and description. The import starts at once.</p>
    </section>
  );
}

const STATUS_TEXT: Record<string, string> = {
  pending: 'Waiting for the upload',
  uploading: 'Uploading',
  refused: 'Upload refused',
  queued: 'Queued',
  validating: 'Validating',
  scanning: 'Scanning',
  parsing: 'Parsing',
  processing: 'Storing rows',
  finalizing: 'Finalizing',
  completed: 'Completed',
  failed: 'Failed',
  cancelled: 'Cancelled',
};

function JobView({ job, progress, onCancel, canCancel }: { job: Job; progress: JobProgress; onCancel: () => void; canCancel: boolean }) {
  const pct = progress.progress;
  const stage = progress.stage ?? 'validation';
  const status =
    job.upload === 'refused' ? 'refused' : (progress.status ?? (job.upload === 'sending' ? 'uploading' : 'pending'));
  const running = job.upload === 'accepted' && !progress.finished && progress.status !== 'pending';
  const eta = !running
    ? null
    : progress.etaSeconds !== null
      ? `about ${formatSeconds(progress.etaSeconds)} left`
      : 'estimating…';
  return (
    <div className="job" data-status={status}>
      <dl className="facts">
        <div>
          <dt>File</dt>
          <dd>
            {job.file.name} ({formatBytes(job.file.size)})
          </dd>
        </div>
        <div>
          <dt>Job</dt>
          <dd>
            <code>{job.id}</code>
          </dd>
        </div>
        <div>
          <dt>Status</dt>
          <dd data-testid="status" className={`status status-${status}`}>
            {STATUS_TEXT[status] ?? status}
            {progress.cancelledBy && <> by {progress.cancelledBy}</>}
          </dd>
        </div>
        <div>
          <dt>ETA</dt>
          <dd data-testid="eta">{eta ?? '—'}</dd>
        </div>
      </dl>
      <div
        className="progress"
        role="progressbar"
        aria-label="Import progress"
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={pct}
        aria-valuetext={`${pct.toFixed(1)}%, ${stage}`}
      >
        {STAGES.map((s) => {
          const fill = Math.max(0, Math.min(1, (pct - s.from) / (s.to - s.from)));
          return (
            <div key={s.name} className={`band stage-${s.name}`}>
              <div className="fill" style={{ width: `${fill * 100}%` }} />
            </div>
          );
        })}
        <span className="pct" aria-hidden="true">
          {pct.toFixed(1)}%
        </span>
      </div>
      <ol className="stages" aria-label="Stages">
        {STAGES.map((s) => {
          const state = pct >= s.to ? 'done' : pct >= s.from && stage === s.name ? 'current' : 'upcoming';
          return (
            <li key={s.name} className={`stage-${s.name}`} data-state={state} aria-current={state === 'current' ? 'step' : undefined}>
              <span className="swatch" aria-hidden="true" />
              {s.name}
            </li>
          );
        })}
      </ol>
      <p className="operation" aria-live="polite">
        {progress.message ?? ''}
        {progress.total > 0 && (
          <>
            {' '}
            · {progress.processed.toLocaleString()} of {progress.total.toLocaleString()} rows · {progress.errors} invalid
          </>
        )}
      </p>
      <div className="actions">
        <button type="button" className="danger" onClick={onCancel} disabled={!canCancel}>
          Cancel import
        </button>
      </div>
      <ZoneGrid zones={progress.zones} completed={progress.zonesCompleted} />
    </div>
  );
}

const ZoneCell = memo(function ZoneCell({ zone }: { zone: ZoneState }) {
  const state = zone.state === 'completed' && (zone.errors ?? 0) > 0 ? 'errors' : zone.state;
  const title =
    zone.state === 'completed'
      ? `Zone ${zone.index}: ${zone.rows} rows, ${zone.errors} invalid, ${zone.durationMs} ms`
      : `Zone ${zone.index}: ${zone.state}`;
  return <li data-state={state} title={title} />;
});

const CHUNK = 100;

function chunks(zones: ZoneState[]): ZoneState[][] {
  const out: ZoneState[][] = [];
  for (let i = 0; i < zones.length; i += CHUNK) out.push(zones.slice(i, i + CHUNK));
  return out;
}

/** A run of cells that re-renders only when one of its zones changed (thousands of zones stay fast). */
const ZoneChunk = memo(
  function ZoneChunk({ zones }: { zones: ZoneState[] }) {
    return (
      <>
        {zones.map((z) => (
          <ZoneCell key={z.index} zone={z} />
        ))}
      </>
    );
  },
  (a, b) => a.zones.length === b.zones.length && a.zones.every((z, i) => z === b.zones[i]),
);

function ZoneGrid({ zones, completed }: { zones: ZoneState[]; completed: number }) {
  if (zones.length === 0) return null;
  return (
    <div className="zones-wrap">
      <h3 id="zones-h">
        Zones <span className="count">{`${completed} of ${zones.length} completed`}</span>
      </h3>
      <ul className="zones" role="img" aria-label={`Zones: ${completed} of ${zones.length} completed`} data-total={zones.length}>
        {chunks(zones).map((c) => (
          <ZoneChunk key={c[0]!.index} zones={c} />
        ))}
      </ul>
      <p className="legend" aria-hidden="true">
        <span data-state="pending" /> waiting <span data-state="processing" /> processing <span data-state="completed" /> done{' '}
        <span data-state="errors" /> done, with invalid rows
      </p>
    </div>
  );
}

function Results({ results }: { results: CsvImportResults }) {
  const categories = Object.entries(results.categories).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  const max = Math.max(1, ...categories.map(([, n]) => n));
  return (
    <section className="card" aria-labelledby="results-h">
      <h2 id="results-h">Results</h2>
      <div className="tables">
        <table aria-label="Summary">
          <tbody>
            <tr>
              <th scope="row">Rows processed</th>
              <td>{results.processed_rows.toLocaleString()}</td>
            </tr>
            <tr>
              <th scope="row">Inserted</th>
              <td data-testid="inserted">{results.inserted.toLocaleString()}</td>
            </tr>
            <tr>
              <th scope="row">Duplicates</th>
              <td>{results.duplicates.toLocaleString()}</td>
            </tr>
            <tr>
              <th scope="row">Invalid rows</th>
              <td>{results.invalid_count.toLocaleString()}</td>
            </tr>
            <tr>
              <th scope="row">Flagged cells</th>
              <td>{results.flagged_count.toLocaleString()}</td>
            </tr>
          </tbody>
        </table>
        <table aria-label="Categories">
          <thead>
            <tr>
              <th scope="col">Category</th>
              <th scope="col">Rows</th>
            </tr>
          </thead>
          <tbody>
            {categories.map(([name, n]) => (
              <tr key={name}>
                <th scope="row">{name}</th>
                <td>
                  <span className="bar" style={{ width: `${(n / max) * 5}rem` }} aria-hidden="true" />
                  {n.toLocaleString()}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <h3>Invalid rows</h3>
      {results.invalid_rows.length === 0 ? (
        <p className="hint">None.</p>
      ) : (
        <table aria-label="Invalid rows">
          <thead>
            <tr>
              <th scope="col">Line</th>
              <th scope="col">Reason</th>
            </tr>
          </thead>
          <tbody>
            {results.invalid_rows.map((r) => (
              <tr key={r.line}>
                <td>{r.line}</td>
                <td>{r.reason}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {results.invalid_count > results.invalid_rows.length && (
        <p className="hint">The first {results.invalid_rows.length} of {results.invalid_count} are shown.</p>
      )}
      <h3>Flagged cells</h3>
      {results.flagged_cells.length === 0 ? (
        <p className="hint">None.</p>
      ) : (
        <table aria-label="Flagged cells">
          <thead>
            <tr>
              <th scope="col">Line</th>
              <th scope="col">Column</th>
              <th scope="col">Reason</th>
            </tr>
          </thead>
          <tbody>
            {results.flagged_cells.map((c, i) => (
              <tr key={`${c.line}-${c.column}-${i}`}>
                <td>{c.line}</td>
                <td>{c.column}</td>
                <td>{c.reason.replace(/_/g, ' ')}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}

function EventLog({ log }: { log: Log }) {
  const entries = useLog(log);
  const newestFirst = useMemo(() => entries.slice().reverse(), [entries]);
  return (
    <section className="card" aria-labelledby="log-h">
      <h2 id="log-h">Event log</h2>
      <ol className="log" role="log" aria-label="Event log, newest first" tabIndex={0}>
        {newestFirst.map((e) => (
          <LogLine key={e.id} entry={e} />
        ))}
      </ol>
    </section>
  );
}

const LogLine = memo(function LogLine({ entry }: { entry: LogEntry }) {
  return (
    <li data-kind={entry.kind}>
      <time>{entry.time}</time>
      {entry.seq !== undefined && <span className="seq">#{entry.seq}</span>}
      <span className="text">{entry.text}</span>
    </li>
  );
});

/** One line for the log; null for messages not worth a line. */
function describe(e: Envelope): string | null {
  switch (e.type) {
    case 'connection_established':
      return null;
    case 'authenticated':
      return `connected as ${e.data.user_id} (tenant ${e.data.tenant})`;
    case 'auth_failure':
      return `authentication failed: ${e.data.reason}`;
    case 'token_expiring':
      return `the token expires in ${e.data.expires_in_s} s; refreshing`;
    case 'token_refreshed':
      return `token refreshed, valid until ${new Date(e.data.expires_at).toLocaleTimeString()}`;
    case 'subscribed':
      return e.data.recovered
        ? `resumed ${e.data.room} after seq ${e.data.seq - e.data.replayed}: ${e.data.replayed} missed events replayed`
        : `joined ${e.data.room} at seq ${e.data.seq}`;
    case 'unsubscribed':
      return `left ${e.data.room}`;
    case 'pong':
      return null;
    case 'error':
      return `error ${e.data.code}: ${e.data.message}`;
    case 'status':
      return `status ${e.data.status}${e.data.message ? `: ${e.data.message}` : ''}`;
    case 'processing_started':
      return `started ${e.data.filename} (${formatBytes(e.data.size_bytes)}), ${e.data.zones_total} zones`;
    case 'processing_progress':
      return `progress ${e.data.progress.toFixed(1)}% (${e.data.stage}), ${e.data.current_operation}${
        e.data.eta_seconds != null ? `, ETA ${formatSeconds(e.data.eta_seconds)}` : ''
      }`;
    case 'zone_processing':
      return `zone ${e.data.zone_index} processing`;
    case 'zone_completed':
      return `zone ${e.data.zone_index} done: ${e.data.rows} rows, ${e.data.errors} invalid, ${e.data.duration_ms} ms`;
    case 'processing_completed':
      // A CSV import's counters; a worker's results are its own.
      return isCsvImportResults(e.data.results)
        ? `completed: ${e.data.results.inserted} inserted, ${e.data.results.duplicates} duplicates, ${e.data.results.invalid_count} invalid`
        : `completed: ${JSON.stringify(e.data.results)}`;
    case 'processing_failed':
      return `failed: ${e.data.error}`;
    case 'job_cancelled':
      return `cancelled by ${e.data.by}`;
    case 'info':
    case 'warning':
      return `${e.type}: ${typeof e.data === 'object' && e.data && 'message' in e.data ? String(e.data.message) : JSON.stringify(e.data)}`;
  }
  return null;
}
