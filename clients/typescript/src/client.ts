// JobcastClient: one WebSocket to a jobcast server that stays up. It fetches a token on every connect,
// reconnects with exponential backoff and full jitter, re-subscribes every room with `since` so nothing
// is missed, drops duplicates, batches cumulative acks, refreshes its credential, pings, and decodes
// binary frames. Works in browsers (global WebSocket) and in Node (pass the `ws` package's WebSocket).

import { backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from './backoff.js';
import { decodeFrame, type FramePayload } from './decode.js';
import {
  CloseCode,
  isRoomEventType,
  type ClientMessage,
  type Envelope,
  type EventType,
  type JobSnapshot,
  type RoomEnvelope,
  type Since,
  type SubscribedData,
} from './protocol.js';

/** Where the connection is: `open` means authenticated and usable. */
export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

/**
 * Why `getToken` is called: `'connect'` before every connection attempt (return a single-use WebSocket
 * token from `POST /api/v1/auth/websocket-token`, or an access JWT), `'refresh'` when the server says the
 * credential is about to expire (`token_expiring`): then it MUST return a fresh access JWT of the same
 * user (WebSocket tokens are refused by `refresh`).
 */
export type TokenReason = 'connect' | 'refresh';

/** The part of the WebSocket API the client uses (browser `WebSocket` and `ws` both fit). */
export interface WebSocketLike {
  readonly readyState: number;
  binaryType: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface JobcastClientOptions {
  /** The WebSocket endpoint, e.g. `ws://127.0.0.1:8080/ws` (`http(s)://` and, in a browser, `/ws` work too). */
  url: string;
  /** Returns the token for a connection or a refresh; called on every connect (see `TokenReason`). */
  getToken: (reason: TokenReason) => string | Promise<string>;
  /** `auto` (default): large messages arrive as gzip(msgpack) binary frames; `json`: always text. */
  format?: 'auto' | 'json';
  /** Acknowledged delivery (`ack=1`): the client sends cumulative `ack`s, batched (default false). */
  ack?: boolean;
  /** How long received events wait before their acks go out together (default 200 ms). */
  ackIntervalMs?: number;
  /** Reconnect backoff: base, cap, maximum attempts (defaults 500 ms, 30 s, unlimited). */
  reconnect?: BackoffOptions;
  /**
   * After a 4001 close, reconnect at most this many times in a row without an `authenticated` in
   * between, and only when `getToken('connect')` returns a token other than the refused one (default 1).
   */
  maxAuthRetries?: number;
  /** Application `ping` interval (default 25 s; 0 turns pings off). */
  pingIntervalMs?: number;
  /** No `pong` within this time after a ping: the connection counts as dead (default 10 s). */
  pongTimeoutMs?: number;
  /** From opening the socket to `authenticated`; past it the attempt is dropped (default 15 s). */
  connectTimeoutMs?: number;
  /** The WebSocket implementation (default: `globalThis.WebSocket`; in Node 20 pass `ws`'s). */
  WebSocket?: WebSocketConstructor;
  /** Random source for the jitter (tests). */
  random?: () => number;
}

/** Options of `subscribe`. */
export interface SubscribeOptions {
  /** Resume after this position (e.g. one saved from `position(room)` in an earlier session). */
  since?: Since;
  /**
   * Deliver the room's history from its first event, even when the room already has events when the
   * client joins (e.g. a job uploaded before subscribing): the client joins, learns the room's epoch,
   * and asks again with `since: {seq: 0, epoch}`; events before that answer are dropped, the replay
   * brings them all in order. Limited by the server's `history_size`.
   */
  fromStart?: boolean;
}

/** A refused `subscribe` (`error` code `unknown_room`, `forbidden` or `too_many_subscriptions`). */
export class SubscriptionError extends Error {
  constructor(
    readonly room: string,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'SubscriptionError';
  }
}

/** How a connection ended. */
export interface DisconnectInfo {
  code: number;
  reason: string;
  /** Whether the client will try again. */
  willReconnect: boolean;
  /** The delay before the next attempt, when it will. */
  delayMs?: number;
}

export interface ClientStats {
  textFrames: number;
  binaryFrames: number;
  /** Room events dropped because their `seq` was already seen. */
  duplicates: number;
  /** Successful connections after the first. */
  reconnects: number;
  /** `ack` messages sent. */
  acksSent: number;
  /** Round trip of the last `ping`, in ms. */
  lastRttMs: number | null;
}

interface RoomEntry {
  room: string;
  refs: number;
  /** Last seq delivered (0: none) and the epoch it belongs to. */
  seq: number;
  epoch?: string;
  fromStart: boolean;
  /** Waiting for the answer to the `since: {seq: 0}` re-subscribe of `fromStart`. */
  awaitingReplay: boolean;
  /** A `subscribed` arrived on the current connection. */
  joined: boolean;
  /** A `subscribed` arrived on some connection. */
  joinedBefore: boolean;
  /** Joined by the server itself (`/ws/jobs/{id}`), not by `subscribe`. */
  auto: boolean;
  /** A `subscribe` went out on the current connection and is not answered yet. */
  requested: boolean;
  last?: SubscribedData;
  waiters: { resolve: (d: SubscribedData) => void; reject: (e: Error) => void }[];
  removeTimer?: ReturnType<typeof setTimeout>;
  /** Highest seq received on this connection, and whether an ack is due. */
  ackSeq: number;
  ackDue: boolean;
}

type Handler<A extends unknown[]> = (...args: A) => void;

class Emitter<M extends Record<string, unknown[]>> {
  private map = new Map<keyof M, Set<Handler<any>>>();
  on<K extends keyof M>(key: K, fn: Handler<M[K]>): () => void {
    let set = this.map.get(key);
    if (!set) this.map.set(key, (set = new Set()));
    set.add(fn);
    return () => void set!.delete(fn);
  }
  emit<K extends keyof M>(key: K, ...args: M[K]): void {
    const set = this.map.get(key);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (e) {
        console.error('jobcast: a listener threw', e);
      }
    }
  }
}

type Events = {
  [K in EventType]: [Envelope<K>];
} & {
  '*': [Envelope];
  state: [ConnectionState, ConnectionState];
  disconnect: [DisconnectInfo];
  clientError: [Error];
};

const SUBSCRIBE_ERRORS = ['unknown_room', 'forbidden', 'too_many_subscriptions'];

export class JobcastClient {
  private readonly opts: Required<Omit<JobcastClientOptions, 'WebSocket' | 'reconnect'>> & {
    reconnect: Required<BackoffOptions>;
    WebSocket?: WebSocketConstructor;
  };
  private readonly emitter = new Emitter<Events>();
  private _state: ConnectionState = 'idle';
  private ws: WebSocketLike | null = null;
  /** Incremented for every socket; callbacks of older sockets are ignored. */
  private generation = 0;
  private readonly rooms = new Map<string, RoomEntry>();
  private attempt = 0;
  private authFailures = 0;
  private lastCloseWasAuth = false;
  private lastToken: string | null = null;
  private everOpened = false;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private pingTimer: ReturnType<typeof setInterval> | undefined;
  private pongTimer: ReturnType<typeof setTimeout> | undefined;
  private ackTimer: ReturnType<typeof setTimeout> | undefined;
  private releaseTimer: ReturnType<typeof setTimeout> | undefined;
  private retainCount = 0;
  private inbox: Promise<void> = Promise.resolve();
  private pings = new Map<number, { resolve: (rtt: number) => void; reject: (e: Error) => void }>();

  /** `job:<id>` when `url` is `/ws/jobs/<id>` (the server joins that room by itself). */
  private readonly autoRoom: string | null;

  /** The `connection_id` of the current connection (admin endpoints use it). */
  connectionId: string | null = null;
  /** The user and tenant of the current connection, and when its credential expires. */
  identity: { user_id: string; tenant: string; expires_at: string } | null = null;
  readonly stats: ClientStats = {
    textFrames: 0,
    binaryFrames: 0,
    duplicates: 0,
    reconnects: 0,
    acksSent: 0,
    lastRttMs: null,
  };

  constructor(options: JobcastClientOptions) {
    this.opts = {
      url: options.url,
      getToken: options.getToken,
      format: options.format ?? 'auto',
      ack: options.ack ?? false,
      ackIntervalMs: options.ackIntervalMs ?? 200,
      reconnect: {
        baseMs: options.reconnect?.baseMs ?? DEFAULT_BACKOFF.baseMs,
        capMs: options.reconnect?.capMs ?? DEFAULT_BACKOFF.capMs,
        maxAttempts: options.reconnect?.maxAttempts ?? DEFAULT_BACKOFF.maxAttempts,
      },
      maxAuthRetries: options.maxAuthRetries ?? 1,
      pingIntervalMs: options.pingIntervalMs ?? 25_000,
      pongTimeoutMs: options.pongTimeoutMs ?? 10_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 15_000,
      random: options.random ?? Math.random,
      WebSocket: options.WebSocket,
    };
    const job = /\/ws\/jobs\/([^/?#]+)/.exec(options.url);
    this.autoRoom = job ? `job:${decodeURIComponent(job[1]!).toLowerCase()}` : null;
  }

  // ----------------------------------------------------------------------------------------------
  // Public API

  /** The connection state. */
  get state(): ConnectionState {
    return this._state;
  }

  /** Opens the connection (no-op when already connecting or open). */
  connect(): void {
    if (this._state !== 'idle' && this._state !== 'closed') return;
    this.attempt = 0;
    this.authFailures = 0;
    this.lastCloseWasAuth = false;
    this.setState('connecting');
    void this.open();
  }

  /** Closes the connection for good (until `connect()` is called again). Subscriptions are kept. */
  close(): void {
    clearTimeout(this.releaseTimer);
    this.generation++;
    this.stopTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, 'client closed');
      } catch {
        /* already closed */
      }
    }
    for (const p of this.pings.values()) p.reject(new Error('the client was closed'));
    this.pings.clear();
    if (this._state !== 'idle' && this._state !== 'closed') this.setState('closed');
  }

  /**
   * Reference-counted connect/close for shared owners (React providers): the first `retain` connects,
   * the last `release` closes on the next tick unless something retains again first.
   */
  retain(): void {
    this.retainCount++;
    clearTimeout(this.releaseTimer);
    this.connect();
  }

  /** See `retain`. */
  release(): void {
    this.retainCount = Math.max(0, this.retainCount - 1);
    if (this.retainCount === 0) {
      clearTimeout(this.releaseTimer);
      this.releaseTimer = setTimeout(() => {
        if (this.retainCount === 0) this.close();
      }, 0);
    }
  }

  /**
   * Joins `room` (reference-counted: each call needs one `unsubscribe`). The promise resolves with the
   * first `subscribed` answer, or rejects with a `SubscriptionError`. The client re-joins the room
   * after every reconnect, with `since` set to the last event it delivered.
   */
  subscribe(room: string, options: SubscribeOptions = {}): Promise<SubscribedData> {
    let entry = this.rooms.get(room);
    if (entry) {
      entry.refs++;
      clearTimeout(entry.removeTimer);
      entry.removeTimer = undefined;
      if (entry.joined && entry.last) return Promise.resolve(entry.last);
    } else {
      entry = this.newEntry(room, 1, options);
      this.rooms.set(room, entry);
      if (this._state === 'open') this.sendSubscribe(entry);
    }
    const e = entry;
    const joined = new Promise<SubscribedData>((resolve, reject) => e.waiters.push({ resolve, reject }));
    joined.catch(() => undefined); // callers that do not await it get no unhandled rejection
    return joined;
  }

  private newEntry(room: string, refs: number, options: SubscribeOptions): RoomEntry {
    return {
      room,
      refs,
      seq: options.since?.seq ?? 0,
      epoch: options.since?.epoch,
      fromStart: options.fromStart ?? false,
      awaitingReplay: false,
      joined: false,
      joinedBefore: false,
      auto: false,
      requested: false,
      waiters: [],
      ackSeq: 0,
      ackDue: false,
    };
  }

  /** Leaves `room` once every `subscribe` of it has been matched by an `unsubscribe`. */
  unsubscribe(room: string): void {
    const entry = this.rooms.get(room);
    if (!entry) return;
    entry.refs = Math.max(0, entry.refs - 1);
    if (entry.refs > 0 || entry.removeTimer) return;
    // Deferred by a tick, so an immediate re-subscribe (React StrictMode) costs no round trip.
    entry.removeTimer = setTimeout(() => {
      if (this.rooms.get(room) !== entry || entry.refs > 0) return;
      this.rooms.delete(room);
      for (const w of entry.waiters) w.reject(new SubscriptionError(room, 'unsubscribed', `left ${room}`));
      if (this._state === 'open' && (entry.joined || entry.requested)) this.send({ type: 'unsubscribe', room });
    }, 0);
  }

  /** The rooms the client is in (or joining). */
  get subscriptions(): string[] {
    return [...this.rooms.keys()];
  }

  /** The last delivered position in `room` (to resume in a later session), if any. */
  position(room: string): Since | null {
    const e = this.rooms.get(room);
    return e?.epoch ? { seq: e.seq, epoch: e.epoch } : null;
  }

  /** The last `subscribed` answer for `room` (its `snapshot` is the job's state for job rooms). */
  lastSubscribed(room: string): SubscribedData | null {
    return this.rooms.get(room)?.last ?? null;
  }

  /** Snapshot of `room` from its last `subscribed`. */
  snapshot(room: string): JobSnapshot | null {
    return this.rooms.get(room)?.last?.snapshot ?? null;
  }

  /** Asks the server to cancel a job (errors arrive as `error` events). */
  cancel(jobId: string): boolean {
    return this.send({ type: 'cancel', job_id: jobId });
  }

  /** Sends an application `ping`; resolves with the round trip in ms. */
  ping(): Promise<number> {
    const ts = Date.now() + Math.random() / 2; // unique per ping
    const sent = this.send({ type: 'ping', ts });
    if (!sent) return Promise.reject(new Error('not connected'));
    return new Promise((resolve, reject) => this.pings.set(ts, { resolve, reject }));
  }

  /** Sends a raw client message; false when not connected. */
  send(message: ClientMessage): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  /** Typed events: `on('processing_progress', e => e.data.progress)`; `'*'` for every message. */
  on<K extends EventType | '*'>(type: K, handler: (envelope: Events[K][0]) => void): () => void {
    return this.emitter.on(type, handler as Handler<Events[K]>);
  }

  /** Every room event of `room`, in order, without duplicates. */
  onRoom(room: string, handler: (envelope: RoomEnvelope) => void): () => void {
    return this.emitter.on('*', (env) => {
      if (env.room === room) handler(env as RoomEnvelope);
    });
  }

  /** Connection state changes. */
  onState(handler: (state: ConnectionState, previous: ConnectionState) => void): () => void {
    return this.emitter.on('state', handler);
  }

  /** A connection ended (with the close code), and whether the client will reconnect. */
  onDisconnect(handler: (info: DisconnectInfo) => void): () => void {
    return this.emitter.on('disconnect', handler);
  }

  /** Client-side problems: `getToken` failed, a frame could not be decoded, a refresh failed. */
  onClientError(handler: (error: Error) => void): () => void {
    return this.emitter.on('clientError', handler);
  }

  // ----------------------------------------------------------------------------------------------
  // Connecting

  private setState(state: ConnectionState): void {
    const prev = this._state;
    if (prev === state) return;
    this._state = state;
    this.emitter.emit('state', state, prev);
  }

  private url(token: string): string {
    let base = this.opts.url;
    if (/^https?:/.test(base)) base = base.replace(/^http/, 'ws');
    else if (base.startsWith('/') && typeof location !== 'undefined') {
      base = `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}${base}`;
    }
    const u = new URL(base);
    u.searchParams.set('token', token);
    u.searchParams.set('format', this.opts.format);
    if (this.opts.ack) u.searchParams.set('ack', '1');
    return u.toString();
  }

  private async open(): Promise<void> {
    const gen = ++this.generation;
    const afterAuthFailure = this.lastCloseWasAuth;
    let token: string;
    try {
      token = await this.opts.getToken('connect');
      if (typeof token !== 'string' || token === '') throw new Error('getToken returned no token');
    } catch (e) {
      if (gen !== this.generation) return;
      this.emitter.emit('clientError', asError(e, 'getToken failed'));
      if (afterAuthFailure) return this.stop(CloseCode.UNAUTHORIZED, 'no fresh token');
      return this.scheduleReconnect({ code: 0, reason: 'getToken failed' });
    }
    if (gen !== this.generation) return; // closed or superseded meanwhile
    if (afterAuthFailure && token === this.lastToken) {
      return this.stop(CloseCode.UNAUTHORIZED, 'the token was refused and getToken returned it again');
    }
    this.lastToken = token;
    const Ctor = this.opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      this.emitter.emit('clientError', new Error('no WebSocket implementation: pass options.WebSocket (e.g. ws)'));
      return this.stop(0, 'no WebSocket implementation');
    }
    let ws: WebSocketLike;
    try {
      ws = new Ctor(this.url(token));
    } catch (e) {
      this.emitter.emit('clientError', asError(e, 'cannot open a WebSocket'));
      return this.scheduleReconnect({ code: 0, reason: 'cannot open a WebSocket' });
    }
    this.ws = ws;
    ws.binaryType = 'arraybuffer';
    ws.onmessage = (ev: { data: FramePayload }) => {
      if (gen !== this.generation) return;
      this.enqueue(ev.data);
    };
    ws.onclose = (ev: { code?: number; reason?: string }) => {
      if (gen !== this.generation) return;
      this.onSocketClosed(ev.code ?? 1006, ev.reason ?? '');
    };
    ws.onerror = () => {
      /* a close event follows */
    };
    this.connectTimer = setTimeout(() => {
      if (gen === this.generation && this._state !== 'open') this.dropSocket(4008, 'connect timeout');
    }, this.opts.connectTimeoutMs);
  }

  /** Abandons the current socket without waiting for its close event, then reconnects. */
  private dropSocket(code: number, reason: string): void {
    const ws = this.ws;
    this.generation++;
    if (ws) {
      detach(ws);
      try {
        ws.close(4000, reason.slice(0, 100));
      } catch {
        /* ignore */
      }
    }
    this.onSocketClosed(code, reason);
  }

  private stopTimers(): void {
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.connectTimer);
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    clearTimeout(this.ackTimer);
    this.reconnectTimer = this.connectTimer = this.pingTimer = this.pongTimer = this.ackTimer = undefined;
  }

  private onSocketClosed(code: number, reason: string): void {
    this.stopTimers();
    this.ws = null;
    this.connectionId = null;
    for (const e of this.rooms.values()) {
      e.joined = false;
      e.requested = false;
      e.awaitingReplay = false;
    }
    for (const p of this.pings.values()) p.reject(new Error('connection closed'));
    this.pings.clear();
    if (this._state === 'closed') return;
    if (code === CloseCode.FORBIDDEN || code === CloseCode.UNKNOWN_JOB) return this.stop(code, reason);
    if (code === CloseCode.UNAUTHORIZED) {
      this.authFailures++;
      if (this.authFailures > this.opts.maxAuthRetries) return this.stop(code, reason);
      this.lastCloseWasAuth = true;
    } else {
      this.lastCloseWasAuth = false;
    }
    this.scheduleReconnect({ code, reason });
  }

  private stop(code: number, reason: string): void {
    this.stopTimers();
    this.generation++;
    const err = new Error(`connection closed for good (${code} ${reason})`);
    for (const e of this.rooms.values()) {
      for (const w of e.waiters) w.reject(err);
      e.waiters = [];
    }
    this.emitter.emit('disconnect', { code, reason, willReconnect: false });
    this.setState('closed');
  }

  private scheduleReconnect(info: { code: number; reason: string }): void {
    if (this.attempt >= this.opts.reconnect.maxAttempts) {
      return this.stop(info.code, `${info.reason}; gave up after ${this.attempt} attempts`);
    }
    const delayMs = backoffDelay(this.attempt, this.opts.reconnect, this.opts.random);
    this.attempt++;
    this.emitter.emit('disconnect', { ...info, willReconnect: true, delayMs });
    this.setState('reconnecting');
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => void this.open(), delayMs);
  }

  // ----------------------------------------------------------------------------------------------
  // Receiving

  private enqueue(payload: FramePayload): void {
    if (typeof payload === 'string') this.stats.textFrames++;
    else this.stats.binaryFrames++;
    const decoded = decodeFrame(payload);
    decoded.catch(() => undefined); // handled in order below
    this.inbox = this.inbox.then(async () => {
      let message: unknown;
      try {
        message = await decoded;
      } catch (e) {
        this.emitter.emit('clientError', asError(e, 'cannot decode a frame'));
        return;
      }
      try {
        this.handle(message as Envelope);
      } catch (e) {
        this.emitter.emit('clientError', asError(e, 'cannot handle a message'));
      }
    });
  }

  private handle(env: Envelope): void {
    if (!env || typeof env !== 'object' || typeof env.type !== 'string') return;
    if (isRoomEventType(env.type) && typeof env.room === 'string' && typeof env.seq === 'number') {
      return this.handleRoomEvent(env as RoomEnvelope);
    }
    switch (env.type) {
      case 'connection_established':
        this.connectionId = env.data.connection_id;
        break;
      case 'authenticated':
        this.onAuthenticated(env.data);
        break;
      case 'token_expiring':
        void this.refresh();
        break;
      case 'subscribed':
        if (!this.onSubscribed(env.data)) return; // internal step of fromStart
        break;
      case 'pong': {
        const p = typeof env.data.client_ts === 'number' ? this.pings.get(env.data.client_ts) : undefined;
        clearTimeout(this.pongTimer);
        this.pongTimer = undefined;
        if (p && typeof env.data.client_ts === 'number') {
          this.pings.delete(env.data.client_ts);
          const rtt = Date.now() - Math.floor(env.data.client_ts);
          this.stats.lastRttMs = rtt;
          p.resolve(rtt);
        }
        break;
      }
      case 'error':
        this.onError(env.data.code, env.data.message);
        break;
    }
    this.emit(env);
  }

  private emit(env: Envelope): void {
    this.emitter.emit(env.type, env as never);
    this.emitter.emit('*', env);
  }

  private onAuthenticated(data: { user_id: string; tenant: string; expires_at: string }): void {
    clearTimeout(this.connectTimer);
    this.identity = { user_id: data.user_id, tenant: data.tenant, expires_at: data.expires_at };
    this.attempt = 0;
    this.authFailures = 0;
    this.lastCloseWasAuth = false;
    if (this.everOpened) this.stats.reconnects++;
    this.everOpened = true;
    for (const e of this.rooms.values()) {
      e.ackSeq = 0;
      e.ackDue = false;
      // Rooms the server joins us to by itself (`/ws/jobs/{id}`) are not asked for again.
      if (!e.removeTimer && !e.auto) this.sendSubscribe(e);
    }
    if (this.opts.pingIntervalMs > 0) {
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => this.heartbeat(), this.opts.pingIntervalMs);
    }
    this.setState('open');
  }

  private heartbeat(): void {
    if (this.pongTimer) return; // one outstanding ping at a time
    const gen = this.generation;
    this.ping().catch(() => undefined);
    this.pongTimer = setTimeout(() => {
      if (gen === this.generation) this.dropSocket(4008, 'pong timeout');
    }, this.opts.pongTimeoutMs);
  }

  private async refresh(): Promise<void> {
    const gen = this.generation;
    try {
      const token = await this.opts.getToken('refresh');
      if (gen !== this.generation) return;
      this.send({ type: 'refresh', token });
    } catch (e) {
      this.emitter.emit('clientError', asError(e, 'getToken("refresh") failed'));
    }
  }

  private sendSubscribe(e: RoomEntry): void {
    const since = e.epoch !== undefined ? { seq: e.seq, epoch: e.epoch } : undefined;
    e.requested = this.send(since ? { type: 'subscribe', room: e.room, since } : { type: 'subscribe', room: e.room });
  }

  /** Returns false when the answer is an internal step that users should not see. */
  private onSubscribed(data: SubscribedData): boolean {
    let e = this.rooms.get(data.room);
    if (!e) {
      if (data.room !== this.autoRoom) return true; // e.g. the answer to a subscribe we took back
      // The room the server joins us to on `/ws/jobs/{id}`: follow it like our own, without a reference.
      e = this.newEntry(data.room, 0, {});
      e.auto = true;
      this.rooms.set(data.room, e);
    }
    const requested = e.requested;
    e.requested = false;
    if (!data.recovered) {
      if (!requested && !e.awaitingReplay && e.epoch !== undefined && e.joinedBefore) {
        // The server re-joined us after a reconnect, from its current position: ask for what we missed.
        e.awaitingReplay = true;
        e.requested = this.send({ type: 'subscribe', room: e.room, since: { seq: e.seq, epoch: e.epoch } });
        return false;
      }
      if (e.fromStart && !e.awaitingReplay && e.seq === 0 && e.epoch === undefined && data.seq > 0) {
        // Joined a room that already has events: ask for all of them.
        e.awaitingReplay = true;
        e.epoch = data.epoch;
        e.requested = this.send({ type: 'subscribe', room: e.room, since: { seq: 0, epoch: data.epoch } });
        return false;
      }
      // Start over from the room's current position (the snapshot tells the state).
      e.seq = data.seq;
    }
    e.epoch = data.epoch;
    e.awaitingReplay = false;
    e.joined = true;
    e.joinedBefore = true;
    e.last = data;
    const waiters = e.waiters;
    e.waiters = [];
    for (const w of waiters) w.resolve(data);
    return true;
  }

  private onError(code: string, message: string): void {
    if (!SUBSCRIBE_ERRORS.includes(code)) return;
    // Errors carry no room field: match a pending subscribe by the room named in the message.
    const pending = [...this.rooms.values()].filter((e) => e.requested && !e.joined);
    const entry =
      pending.find((e) => message.includes(e.room)) ?? (code === 'too_many_subscriptions' ? pending[0] : undefined);
    if (!entry) return;
    this.rooms.delete(entry.room);
    clearTimeout(entry.removeTimer);
    for (const w of entry.waiters) w.reject(new SubscriptionError(entry.room, code, message));
  }

  private handleRoomEvent(env: RoomEnvelope): void {
    const e = this.rooms.get(env.room);
    if (!e || !e.joined || e.awaitingReplay) return; // not (yet) ours: the replay will bring it
    if (this.opts.ack) {
      e.ackSeq = Math.max(e.ackSeq, env.seq);
      e.ackDue = true;
      this.scheduleAck();
    }
    if (env.epoch !== e.epoch) {
      // A new history: positions of the old one mean nothing.
      e.epoch = env.epoch;
      e.seq = env.seq - 1;
    }
    if (env.seq <= e.seq) {
      this.stats.duplicates++;
      return;
    }
    e.seq = env.seq;
    this.emit(env as Envelope);
  }

  private scheduleAck(): void {
    if (this.ackTimer) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = undefined;
      for (const e of this.rooms.values()) {
        if (!e.ackDue || !e.joined) continue;
        if (this.send({ type: 'ack', room: e.room, seq: e.ackSeq })) {
          e.ackDue = false;
          this.stats.acksSent++;
        }
      }
    }, this.opts.ackIntervalMs);
  }
}

function detach(ws: WebSocketLike): void {
  ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  // A socket closed before it opened still reports an error on some platforms.
  ws.onerror = () => undefined;
}

function asError(e: unknown, context: string): Error {
  if (e instanceof Error) return e;
  return new Error(`${context}: ${String(e)}`);
}
