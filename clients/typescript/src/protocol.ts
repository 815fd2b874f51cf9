// The jobcast WebSocket protocol v1, on the TypeScript side: the ONE place that defines it.
//
// Every server message is an `Envelope` (`type`, `data`, `id`, `ts`, and for room events `room`, `seq`,
// `epoch`); client messages are flat objects tagged by `type`. Each type below has a runtime schema
// next to it (`EVENT_SCHEMAS`, `CLIENT_MESSAGE_SCHEMAS`), and a compile-time assertion proves that the
// interface and its schema describe the same shape. `validateEnvelope` / `validateClientMessage` check a
// decoded message against the schemas; the test suite runs them over every example of the server's
// `proto-docs/protocol.md`. Mirrors `src/protocol.rs` of the server.

// ---------------------------------------------------------------------------------------------------
// A tiny schema language (runtime checks + static types).

/** A runtime check of a value of type `T`. */
export interface Schema<T> {
  /** Pushes a message to `errors` for every way `value` does not fit. */
  check(value: unknown, path: string, errors: string[]): void;
  /** Marks an optional object field (absent, never `null`, unless also `nullable`). */
  readonly optional?: boolean;
  /** Phantom field carrying the static type. */
  readonly __type?: T;
}
type OptionalSchema<T> = Schema<T> & { readonly optional: true };
/** The static type a schema checks. */
export type Infer<S> = S extends Schema<infer T> ? T : never;

const describe = (v: unknown): string =>
  v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v === 'object' ? 'object' : JSON.stringify(v);

function prim<T>(name: string, ok: (v: unknown) => boolean): Schema<T> {
  return {
    check(v, path, errors) {
      if (!ok(v)) errors.push(`${path}: expected ${name}, found ${describe(v)}`);
    },
  };
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const TS_RE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;

/** Schema constructors. */
export const s = {
  string: prim<string>('a string', (v) => typeof v === 'string'),
  number: prim<number>('a number', (v) => typeof v === 'number' && Number.isFinite(v)),
  /** A non-negative integer (Rust `u64`). */
  uint: prim<number>('a non-negative integer', (v) => typeof v === 'number' && Number.isInteger(v) && v >= 0),
  boolean: prim<boolean>('a boolean', (v) => typeof v === 'boolean'),
  /** A canonical lower-case UUID string. */
  uuid: prim<string>('a UUID string', (v) => typeof v === 'string' && UUID_RE.test(v)),
  /** An RFC 3339 UTC timestamp. */
  timestamp: prim<string>('an RFC 3339 UTC timestamp', (v) => typeof v === 'string' && TS_RE.test(v)),
  /** Any JSON value. */
  json: prim<JsonValue>('a JSON value', (v) => v !== undefined),
  literal<L extends string | boolean>(lit: L): Schema<L> {
    return prim<L>(JSON.stringify(lit), (v) => v === lit);
  },
  nullable<T>(inner: Schema<T>): Schema<T | null> {
    return {
      check(v, path, errors) {
        if (v !== null) inner.check(v, path, errors);
      },
    };
  },
  optional<T>(inner: Schema<T>): OptionalSchema<T> {
    return { optional: true, check: (v, path, errors) => inner.check(v, path, errors) };
  },
  array<T>(item: Schema<T>): Schema<T[]> {
    return {
      check(v, path, errors) {
        if (!Array.isArray(v)) return void errors.push(`${path}: expected an array, found ${describe(v)}`);
        v.forEach((x, i) => item.check(x, `${path}[${i}]`, errors));
      },
    };
  },
  record<T>(value: Schema<T>): Schema<Record<string, T>> {
    return {
      check(v, path, errors) {
        if (!isPlainObject(v)) return void errors.push(`${path}: expected an object, found ${describe(v)}`);
        for (const [k, x] of Object.entries(v)) value.check(x, `${path}.${k}`, errors);
      },
    };
  },
  /**
   * An object with these fields. `strict` (the default) refuses fields the schema does not name, so
   * a field the server adds shows up as a disagreement in the proto-docs test.
   */
  object<P extends Record<string, Schema<unknown>>>(props: P, strict = true): Schema<ObjectOf<P>> {
    return {
      check(v, path, errors) {
        if (!isPlainObject(v)) return void errors.push(`${path}: expected an object, found ${describe(v)}`);
        for (const [k, schema] of Object.entries(props)) {
          if (!(k in v)) {
            if (!schema.optional) errors.push(`${path}.${k}: missing`);
          } else {
            schema.check(v[k], `${path}.${k}`, errors);
          }
        }
        if (strict) {
          for (const k of Object.keys(v)) if (!(k in props)) errors.push(`${path}.${k}: unknown field`);
        }
      },
    };
  },
};

type Simplify<T> = { [K in keyof T]: T[K] } & {};
type ObjectOf<P> = Simplify<
  { [K in keyof P as P[K] extends OptionalSchema<unknown> ? never : K]: Infer<P[K]> } & {
    [K in keyof P as P[K] extends OptionalSchema<unknown> ? K : never]?: Infer<P[K]>;
  }
>;

/** Compile-time proof that two types are the same (fails to compile otherwise). */
type Equals<A, B> = (<X>() => X extends A ? 1 : 2) extends <X>() => X extends B ? 1 : 2 ? true : false;
function assertSame<A, B>(_proof: Equals<A, B>): void {}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array);
}

/** Any JSON value. */
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

// ---------------------------------------------------------------------------------------------------
// Close codes, error codes, statuses and stages.

/** WebSocket close codes jobcast uses. */
export const CloseCode = {
  /** Normal closure (the server echoes the client's own code when the client closes). */
  NORMAL: 1000,
  /** Server going away (shutdown); reconnect. */
  GOING_AWAY: 1001,
  /** WebSocket protocol error. */
  PROTOCOL_ERROR: 1002,
  /** A client message was larger than `max_inbound_message_bytes`. */
  TOO_BIG: 1009,
  /** Disconnected by an admin. */
  ADMIN: 4000,
  /** Missing, bad, expired or reused token; authentication timeout; credential expired. */
  UNAUTHORIZED: 4001,
  /** Forbidden (`/ws/jobs/{id}` of another tenant's job). */
  FORBIDDEN: 4003,
  /** Unknown job (`/ws/jobs/{id}`). */
  UNKNOWN_JOB: 4004,
  /** Heartbeat, acknowledgement or slow-consumer timeout. */
  TIMEOUT: 4008,
  /** Too many connections or messages. */
  TOO_MANY: 4029,
} as const;
export type CloseCode = (typeof CloseCode)[keyof typeof CloseCode];

/** `error.code` values. */
export const ERROR_CODES = [
  'bad_request',
  'unknown_room',
  'forbidden',
  'too_many_subscriptions',
  'rate_limited',
  'not_authenticated',
  'already_authenticated',
  'not_subscribed',
  'invalid_token',
  'unknown_job',
  'job_finished',
  'invalid_ack',
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

/** `auth_failure.reason` values. */
export const AUTH_FAILURE_REASONS = [
  'missing_token',
  'expired',
  'not_yet_valid',
  'invalid_signature',
  'unsupported_algorithm',
  'invalid_audience',
  'invalid_issuer',
  'missing_tenant',
  'token_reused',
  'malformed_token',
  'websocket_token_not_accepted',
  'timeout',
] as const;
export type AuthFailureReason = (typeof AUTH_FAILURE_REASONS)[number];

/** Statuses of a job (`status.status` for job rooms; the snapshot adds `pending` for reservations). */
export const JOB_STATUSES = [
  'pending',
  'queued',
  'validating',
  'scanning',
  'parsing',
  'processing',
  'finalizing',
  'completed',
  'failed',
  'cancelled',
] as const;
export type JobStatus = (typeof JOB_STATUSES)[number];
/** Statuses after which nothing more happens to a job. */
export const FINAL_STATUSES: readonly string[] = ['completed', 'failed', 'cancelled'];

/** The five stages of a CSV import and the band of progress each covers. */
export const STAGES = [
  { name: 'validation', from: 0, to: 20 },
  { name: 'scanning', from: 20, to: 40 },
  { name: 'parsing', from: 40, to: 60 },
  { name: 'database', from: 60, to: 80 },
  { name: 'categorization', from: 80, to: 100 },
] as const;
export type Stage = (typeof STAGES)[number]['name'];

// ---------------------------------------------------------------------------------------------------
// Event data, one interface and one schema per event type.

/** `connection_established`: the first message of every connection. */
export interface ConnectionEstablishedData {
  connection_id: string;
  heartbeat_interval_s: number;
  server_version: string;
  features: string[];
}
const connectionEstablished = s.object({
  connection_id: s.uuid,
  heartbeat_interval_s: s.uint,
  server_version: s.string,
  features: s.array(s.string),
});
assertSame<Infer<typeof connectionEstablished>, ConnectionEstablishedData>(true);

/** `authenticated`: `expires_at` is when the connection's credential ends. */
export interface AuthenticatedData {
  user_id: string;
  tenant: string;
  expires_at: string;
}
const authenticated = s.object({ user_id: s.string, tenant: s.string, expires_at: s.timestamp });
assertSame<Infer<typeof authenticated>, AuthenticatedData>(true);

/** `auth_failure`: a 4001 close follows. */
export interface AuthFailureData {
  reason: string;
}
const authFailure = s.object({ reason: s.string });
assertSame<Infer<typeof authFailure>, AuthFailureData>(true);

/** `token_expiring`: answer with `refresh`. */
export interface TokenExpiringData {
  expires_in_s: number;
}
const tokenExpiring = s.object({ expires_in_s: s.uint });
assertSame<Infer<typeof tokenExpiring>, TokenExpiringData>(true);

/** `token_refreshed`. */
export interface TokenRefreshedData {
  expires_at: string;
}
const tokenRefreshed = s.object({ expires_at: s.timestamp });
assertSame<Infer<typeof tokenRefreshed>, TokenRefreshedData>(true);

/** Counters and results of a CSV import (`processing_completed.results`). */
export interface CsvImportResults {
  processed_rows: number;
  inserted: number;
  duplicates: number;
  invalid_count: number;
  invalid_rows: { line: number; reason: string }[];
  flagged_count: number;
  flagged_cells: { line: number; column: string; reason: string }[];
  categories: Record<string, number>;
}
const csvImportResults = s.object({
  processed_rows: s.uint,
  inserted: s.uint,
  duplicates: s.uint,
  invalid_count: s.uint,
  invalid_rows: s.array(s.object({ line: s.uint, reason: s.string })),
  flagged_count: s.uint,
  flagged_cells: s.array(s.object({ line: s.uint, column: s.string, reason: s.string })),
  categories: s.record(s.uint),
});
assertSame<Infer<typeof csvImportResults>, CsvImportResults>(true);

/**
 * A job's state (`subscribed.snapshot` for job rooms, `GET /api/v1/jobs/{id}`). A reservation has only
 * `job_id`, `room`, `tenant` and `status: "pending"`; the other fields appear as the job runs.
 */
export interface JobSnapshot {
  job_id: string;
  room: string;
  tenant: string;
  status: string;
  user_id?: string;
  kind?: string;
  filename?: string;
  size_bytes?: number;
  stage?: string | null;
  progress?: number;
  eta_seconds?: number | null;
  zones_total?: number;
  zones_completed?: number;
  processed?: number;
  total?: number;
  errors?: number;
  created_at?: string | null;
  started_at?: string | null;
  updated_at?: string | null;
  finished_at?: string | null;
  results?: JobResults | null;
  error?: { message: string; recoverable: boolean } | null;
  /** Jobs that run elsewhere (`POST /api/v1/jobs`): their title. */
  title?: string;
  /** Jobs that run elsewhere: their stages with relative weights (maybe none). */
  stages?: StageSpec[];
  /** Jobs that run elsewhere: the metadata of their creation and reports, merged. */
  metadata?: JsonValue;
  /** Someone asked to cancel it; its worker has not ended it yet. */
  cancel_requested?: boolean;
  /** Its worker has been silent for `job_stall_timeout_s`. */
  stalled?: boolean;
}

/** One stage of a job that runs elsewhere. */
export interface StageSpec {
  name: string;
  weight: number;
}
const stageSpec = s.object({ name: s.string, weight: s.number });
assertSame<Infer<typeof stageSpec>, StageSpec>(true);

const jobSnapshot = s.object(
  {
    job_id: s.uuid,
    room: s.string,
    tenant: s.string,
    status: s.string,
    user_id: s.optional(s.string),
    kind: s.optional(s.string),
    filename: s.optional(s.string),
    size_bytes: s.optional(s.uint),
    stage: s.optional(s.nullable(s.string)),
    progress: s.optional(s.number),
    eta_seconds: s.optional(s.nullable(s.number)),
    zones_total: s.optional(s.uint),
    zones_completed: s.optional(s.uint),
    processed: s.optional(s.uint),
    total: s.optional(s.uint),
    errors: s.optional(s.uint),
    created_at: s.optional(s.nullable(s.timestamp)),
    started_at: s.optional(s.nullable(s.timestamp)),
    updated_at: s.optional(s.nullable(s.timestamp)),
    finished_at: s.optional(s.nullable(s.timestamp)),
    results: s.optional(s.nullable(s.json as Schema<JobResults>)),
    error: s.optional(s.nullable(s.object({ message: s.string, recoverable: s.boolean }))),
    title: s.optional(s.string),
    stages: s.optional(s.array(stageSpec)),
    metadata: s.optional(s.json),
    cancel_requested: s.optional(s.boolean),
    stalled: s.optional(s.boolean),
  },
  false, // the server may add fields to snapshots
);
assertSame<Infer<typeof jobSnapshot>, JobSnapshot>(true);

/**
 * `subscribed`: `seq` is the room's newest seq when joining, `recovered` whether every event after
 * `since` follows as replay (`replayed` of them); `snapshot` is the job's state for job rooms, else null.
 */
export interface SubscribedData {
  room: string;
  seq: number;
  epoch: string;
  recovered: boolean;
  replayed: number;
  snapshot: JobSnapshot | null;
}
const subscribed = s.object({
  room: s.string,
  seq: s.uint,
  epoch: s.string,
  recovered: s.boolean,
  replayed: s.uint,
  snapshot: s.nullable(jobSnapshot),
});
assertSame<Infer<typeof subscribed>, SubscribedData>(true);

/** `unsubscribed`. */
export interface UnsubscribedData {
  room: string;
}
const unsubscribed = s.object({ room: s.string });
assertSame<Infer<typeof unsubscribed>, UnsubscribedData>(true);

/** `pong`: `client_ts` echoes the ping's `ts` (`null` when it had none). */
export interface PongData {
  ts: string;
  client_ts: number | null;
}
const pong = s.object({ ts: s.timestamp, client_ts: s.nullable(s.number) });
assertSame<Infer<typeof pong>, PongData>(true);

/** `error`: a client message was refused; the connection stays open. */
export interface ErrorData {
  code: string;
  message: string;
}
const error = s.object({ code: s.string, message: s.string });
assertSame<Infer<typeof error>, ErrorData>(true);

/** `info` and `warning`: free-form (admins and publishers choose). */
export type FreeFormData = JsonValue;

/** `processing_started`. */
export interface ProcessingStartedData {
  job_id: string;
  kind: string;
  filename: string;
  size_bytes: number;
  zones_total: number;
}
const processingStarted = s.object({
  job_id: s.uuid,
  kind: s.string,
  filename: s.string,
  size_bytes: s.uint,
  zones_total: s.uint,
});
assertSame<Infer<typeof processingStarted>, ProcessingStartedData>(true);

/** `status`: a job's status (with `job_id`), or a room-wide notice (without). */
export interface StatusData {
  job_id?: string;
  status: string;
  message: string;
}
const status = s.object({ job_id: s.optional(s.uuid), status: s.string, message: s.string });
assertSame<Infer<typeof status>, StatusData>(true);

/** `processing_progress`: `progress` 0–100; `eta_seconds` `null` while unknown, 0 at completion (absent from older servers). */
export interface ProcessingProgressData {
  job_id: string;
  stage: string;
  progress: number;
  zones_completed: number;
  zones_total: number;
  processed: number;
  total: number;
  errors: number;
  current_operation: string;
  eta_seconds?: number | null;
  /** Jobs that run elsewhere: the job's merged `metadata`. */
  metadata?: JsonValue;
}
const processingProgress = s.object({
  job_id: s.uuid,
  stage: s.string,
  progress: s.number,
  zones_completed: s.uint,
  zones_total: s.uint,
  processed: s.uint,
  total: s.uint,
  errors: s.uint,
  current_operation: s.string,
  eta_seconds: s.optional(s.nullable(s.number)),
  metadata: s.optional(s.json),
});
assertSame<Infer<typeof processingProgress>, ProcessingProgressData>(true);

/** `zone_processing`: `zone_id` is `<job_id>:<zone_index>`. */
export interface ZoneProcessingData {
  job_id: string;
  zone_id: string;
  zone_index: number;
  processing_tool: string;
}
const zoneProcessing = s.object({
  job_id: s.uuid,
  zone_id: s.string,
  zone_index: s.uint,
  processing_tool: s.string,
});
assertSame<Infer<typeof zoneProcessing>, ZoneProcessingData>(true);

/** `zone_completed`. */
export interface ZoneCompletedData {
  job_id: string;
  zone_id: string;
  zone_index: number;
  rows: number;
  errors: number;
  duration_ms: number;
}
const zoneCompleted = s.object({
  job_id: s.uuid,
  zone_id: s.string,
  zone_index: s.uint,
  rows: s.uint,
  errors: s.uint,
  duration_ms: s.uint,
});
assertSame<Infer<typeof zoneCompleted>, ZoneCompletedData>(true);

/** A job's results: `CsvImportResults` for CSV imports, what the worker sent for jobs that run elsewhere. */
export type JobResults = CsvImportResults | JsonValue;

/** Whether `results` are a CSV import's (checked against their schema). */
export function isCsvImportResults(results: unknown): results is CsvImportResults {
  const errors: string[] = [];
  csvImportResults.check(results, 'results', errors);
  return errors.length === 0;
}

/** `processing_completed`: `results` as described by `CsvImportResults` for CSV imports, free for worker jobs. */
export interface ProcessingCompletedData {
  job_id: string;
  results: JobResults;
}
const processingCompleted = s.object({ job_id: s.uuid, results: s.json as Schema<JobResults> });
assertSame<Infer<typeof processingCompleted>, ProcessingCompletedData>(true);

/** `processing_failed`: `details` is free-form (`{stage, zones_completed}` for CSV jobs). */
export interface ProcessingFailedData {
  job_id: string;
  error: string;
  details: JsonValue;
  recoverable: boolean;
}
const processingFailed = s.object({ job_id: s.uuid, error: s.string, details: s.json, recoverable: s.boolean });
assertSame<Infer<typeof processingFailed>, ProcessingFailedData>(true);

/** `job_cancelled`: `by` is the user who cancelled. */
export interface JobCancelledData {
  job_id: string;
  by: string;
}
const jobCancelled = s.object({ job_id: s.uuid, by: s.string });
assertSame<Infer<typeof jobCancelled>, JobCancelledData>(true);

/** `cancel_requested`: someone (`by`) asked to cancel a job that runs elsewhere; its worker ends it. */
export interface CancelRequestedData {
  job_id: string;
  by: string;
}
const cancelRequested = s.object({ job_id: s.uuid, by: s.string });
assertSame<Infer<typeof cancelRequested>, CancelRequestedData>(true);

/** `job_stalled`: a job that runs elsewhere had no report since `since` (RFC 3339). */
export interface JobStalledData {
  job_id: string;
  since: string;
}
const jobStalled = s.object({ job_id: s.uuid, since: s.timestamp });
assertSame<Infer<typeof jobStalled>, JobStalledData>(true);

/** `export_started`: an export job began writing `format` (`csv` or `jsonl`). */
export interface ExportStartedData {
  job_id: string;
  format: string;
}
const exportStarted = s.object({ job_id: s.uuid, format: s.string });
assertSame<Infer<typeof exportStarted>, ExportStartedData>(true);

/** `export_progress`: rows written so far. */
export interface ExportProgressData {
  job_id: string;
  rows: number;
}
const exportProgress = s.object({ job_id: s.uuid, rows: s.uint });
assertSame<Infer<typeof exportProgress>, ExportProgressData>(true);

/** `export_completed`: the file is ready at `download_url`, a signed link that expires (`download_ttl_s`). */
export interface ExportCompletedData {
  job_id: string;
  rows: number;
  bytes: number;
  download_url: string;
}
const exportCompleted = s.object({ job_id: s.uuid, rows: s.uint, bytes: s.uint, download_url: s.string });
assertSame<Infer<typeof exportCompleted>, ExportCompletedData>(true);

/** `export_failed`. */
export interface ExportFailedData {
  job_id: string;
  error: string;
}
const exportFailed = s.object({ job_id: s.uuid, error: s.string });
assertSame<Infer<typeof exportFailed>, ExportFailedData>(true);

/** Event type → its `data`. */
export interface EventDataMap {
  connection_established: ConnectionEstablishedData;
  authenticated: AuthenticatedData;
  auth_failure: AuthFailureData;
  token_expiring: TokenExpiringData;
  token_refreshed: TokenRefreshedData;
  subscribed: SubscribedData;
  unsubscribed: UnsubscribedData;
  pong: PongData;
  error: ErrorData;
  warning: FreeFormData;
  info: FreeFormData;
  processing_started: ProcessingStartedData;
  status: StatusData;
  processing_progress: ProcessingProgressData;
  zone_processing: ZoneProcessingData;
  zone_completed: ZoneCompletedData;
  processing_completed: ProcessingCompletedData;
  processing_failed: ProcessingFailedData;
  job_cancelled: JobCancelledData;
  cancel_requested: CancelRequestedData;
  job_stalled: JobStalledData;
  export_started: ExportStartedData;
  export_progress: ExportProgressData;
  export_completed: ExportCompletedData;
  export_failed: ExportFailedData;
}
export type EventType = keyof EventDataMap;

/** The runtime schema of every event's `data`. */
export const EVENT_SCHEMAS: { [K in EventType]: Schema<EventDataMap[K]> } = {
  connection_established: connectionEstablished,
  authenticated,
  auth_failure: authFailure,
  token_expiring: tokenExpiring,
  token_refreshed: tokenRefreshed,
  subscribed,
  unsubscribed,
  pong,
  error,
  warning: s.json,
  info: s.json,
  processing_started: processingStarted,
  status,
  processing_progress: processingProgress,
  zone_processing: zoneProcessing,
  zone_completed: zoneCompleted,
  processing_completed: processingCompleted,
  processing_failed: processingFailed,
  job_cancelled: jobCancelled,
  cancel_requested: cancelRequested,
  job_stalled: jobStalled,
  export_started: exportStarted,
  export_progress: exportProgress,
  export_completed: exportCompleted,
  export_failed: exportFailed,
};

/** Every event type, in the server's order (`EventType::ALL`). */
export const EVENT_TYPES = Object.keys(EVENT_SCHEMAS) as EventType[];

/** Messages sent to one connection; they never carry `room`, `seq` or `epoch`. */
export const CONNECTION_EVENT_TYPES = [
  'connection_established',
  'authenticated',
  'auth_failure',
  'token_expiring',
  'token_refreshed',
  'subscribed',
  'unsubscribed',
  'pong',
  'error',
] as const satisfies readonly EventType[];
export type ConnectionEventType = (typeof CONNECTION_EVENT_TYPES)[number];
/** Events published into a room; they always carry `room`, `seq` and `epoch`. */
export type RoomEventType = Exclude<EventType, ConnectionEventType>;
export const ROOM_EVENT_TYPES = EVENT_TYPES.filter(
  (t) => !(CONNECTION_EVENT_TYPES as readonly string[]).includes(t),
) as RoomEventType[];

// ---------------------------------------------------------------------------------------------------
// The envelope.

/** Fields of every server message. */
interface EnvelopeBase<T extends EventType> {
  type: T;
  data: EventDataMap[T];
  /** Unique per event (the same for every member receiving a room event). */
  id: string;
  /** When the server created the message (RFC 3339, UTC, milliseconds). */
  ts: string;
  /** Present and `true` only on a redelivery (`ack=1`). */
  redelivered?: true;
}
/** A connection-level message of one type. */
export interface ConnectionEnvelopeOf<T extends ConnectionEventType> extends EnvelopeBase<T> {
  room?: undefined;
  seq?: undefined;
  epoch?: undefined;
}
/** An event of one type published into a room. */
export interface RoomEnvelopeOf<T extends RoomEventType> extends EnvelopeBase<T> {
  room: string;
  /** Position in the room: 1, 2, 3 ... */
  seq: number;
  /** The room's history epoch (32 hex digits). */
  epoch: string;
}
/** A connection-level message (a union over the types when `T` is a union). */
export type ConnectionEnvelope<T extends ConnectionEventType = ConnectionEventType> = T extends ConnectionEventType
  ? ConnectionEnvelopeOf<T>
  : never;
/** A room event (a union over the types when `T` is a union). */
export type RoomEnvelope<T extends RoomEventType = RoomEventType> = T extends RoomEventType ? RoomEnvelopeOf<T> : never;
/** The envelope of an event of type `T` (a union over types when `T` is a union). */
export type Envelope<T extends EventType = EventType> = T extends ConnectionEventType
  ? ConnectionEnvelopeOf<T>
  : T extends RoomEventType
    ? RoomEnvelopeOf<T>
    : never;

/** Whether `type` names a known event type. */
export function isEventType(type: unknown): type is EventType {
  return typeof type === 'string' && Object.prototype.hasOwnProperty.call(EVENT_SCHEMAS, type);
}

/** Whether `type` is a room event type. */
export function isRoomEventType(type: unknown): type is RoomEventType {
  return isEventType(type) && !(CONNECTION_EVENT_TYPES as readonly string[]).includes(type);
}

/**
 * Checks a decoded server message against the protocol: envelope fields and the typed `data` of its
 * event type. Returns the problems found (empty when it fits).
 */
export function validateEnvelope(value: unknown): string[] {
  const errors: string[] = [];
  if (!isPlainObject(value)) return [`envelope: expected an object, found ${describe(value)}`];
  const type = value.type;
  if (!isEventType(type)) return [`envelope.type: unknown event type ${JSON.stringify(type)}`];
  const base = {
    type: s.string,
    data: s.json,
    id: s.uuid,
    ts: s.timestamp,
    redelivered: s.optional(s.literal(true)),
  };
  // Room events carry room, seq and epoch; connection-level messages must not (strict: unknown field).
  const envelope = isRoomEventType(type)
    ? s.object({ ...base, room: s.string, seq: s.uint, epoch: s.string })
    : s.object(base);
  envelope.check(value, 'envelope', errors);
  if ('data' in value) EVENT_SCHEMAS[type].check(value.data, `${type}.data`, errors);
  return errors;
}

/** Type guard: a server message that fits the protocol. */
export function isEnvelope(value: unknown): value is Envelope {
  return validateEnvelope(value).length === 0;
}

// ---------------------------------------------------------------------------------------------------
// Client messages.

/** A resume position: the last `seq` seen and the `epoch` it belongs to. */
export interface Since {
  seq: number;
  epoch: string;
}
const since = s.object({ seq: s.uint, epoch: s.string });
assertSame<Infer<typeof since>, Since>(true);

export interface AuthenticateMessage {
  type: 'authenticate';
  token: string;
}
export interface SubscribeMessage {
  type: 'subscribe';
  room: string;
  since?: Since;
}
export interface UnsubscribeMessage {
  type: 'unsubscribe';
  room: string;
}
/** Cumulative: every event of `room` up to `seq`. */
export interface AckMessage {
  type: 'ack';
  room: string;
  seq: number;
}
/** `ts` is a number (the server refuses any other type); the pong echoes it. */
export interface PingMessage {
  type: 'ping';
  ts?: number;
}
export interface CancelMessage {
  type: 'cancel';
  job_id: string;
}
/** A fresh access JWT (not a WebSocket token) of the same user. */
export interface RefreshMessage {
  type: 'refresh';
  token: string;
}
export type ClientMessage =
  | AuthenticateMessage
  | SubscribeMessage
  | UnsubscribeMessage
  | AckMessage
  | PingMessage
  | CancelMessage
  | RefreshMessage;
export type ClientMessageType = ClientMessage['type'];

const clientMessageSchemas = {
  authenticate: s.object({ type: s.literal('authenticate'), token: s.string }),
  subscribe: s.object({ type: s.literal('subscribe'), room: s.string, since: s.optional(since) }),
  unsubscribe: s.object({ type: s.literal('unsubscribe'), room: s.string }),
  ack: s.object({ type: s.literal('ack'), room: s.string, seq: s.uint }),
  ping: s.object({ type: s.literal('ping'), ts: s.optional(s.number) }),
  cancel: s.object({ type: s.literal('cancel'), job_id: s.string }),
  refresh: s.object({ type: s.literal('refresh'), token: s.string }),
};
assertSame<Infer<(typeof clientMessageSchemas)['authenticate']>, AuthenticateMessage>(true);
assertSame<Infer<(typeof clientMessageSchemas)['subscribe']>, SubscribeMessage>(true);
assertSame<Infer<(typeof clientMessageSchemas)['unsubscribe']>, UnsubscribeMessage>(true);
assertSame<Infer<(typeof clientMessageSchemas)['ack']>, AckMessage>(true);
assertSame<Infer<(typeof clientMessageSchemas)['ping']>, PingMessage>(true);
assertSame<Infer<(typeof clientMessageSchemas)['cancel']>, CancelMessage>(true);
assertSame<Infer<(typeof clientMessageSchemas)['refresh']>, RefreshMessage>(true);
/** The runtime schema of every client message. */
export const CLIENT_MESSAGE_SCHEMAS: { [K in ClientMessageType]: Schema<Extract<ClientMessage, { type: K }>> } =
  clientMessageSchemas;
export const CLIENT_MESSAGE_TYPES = Object.keys(CLIENT_MESSAGE_SCHEMAS) as ClientMessageType[];

/** Checks a client message (flat, tagged by `type`, no unknown fields); returns the problems found. */
export function validateClientMessage(value: unknown): string[] {
  if (!isPlainObject(value)) return [`message: expected an object, found ${describe(value)}`];
  const type = value.type;
  if (typeof type !== 'string' || !Object.prototype.hasOwnProperty.call(CLIENT_MESSAGE_SCHEMAS, type)) {
    return [`message.type: unknown client message type ${JSON.stringify(type)}`];
  }
  const errors: string[] = [];
  CLIENT_MESSAGE_SCHEMAS[type as ClientMessageType].check(value, type, errors);
  return errors;
}

/** Type guard: a client message that fits the protocol. */
export function isClientMessage(value: unknown): value is ClientMessage {
  return validateClientMessage(value).length === 0;
}

/** The stage a progress value falls in. */
export function stageAt(progress: number): Stage {
  for (const st of STAGES) if (progress < st.to) return st.name;
  return 'categorization';
}
