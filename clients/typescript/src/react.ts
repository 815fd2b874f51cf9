// React bindings: <JobcastProvider> owns one JobcastClient (created lazily, connected while mounted,
// reference-counted so StrictMode's mount-unmount-mount opens a single socket), and hooks read from it.

import {
  createContext,
  createElement,
  useContext,
  useEffect,
  useRef,
  useState,
  useSyncExternalStore,
  type ReactNode,
} from 'react';

import { JobcastClient, type ConnectionState, type JobcastClientOptions, type TokenReason } from './client.js';
import { initialJobState, JobTracker, type JobState } from './job.js';
import type { Envelope, JsonValue, RoomEnvelope, SubscribedData } from './protocol.js';

const ClientContext = createContext<JobcastClient | null>(null);

export type JobcastProviderProps = {
  children?: ReactNode;
} & (
  | { /** A client you created (the provider retains it while mounted, and never creates another). */ client: JobcastClient }
  | ({ client?: undefined } & JobcastClientOptions)
);

/**
 * Provides one `JobcastClient` to the hooks below it. Pass `client`, or the client options (`url`,
 * `getToken`, ...) and the provider creates the client on first render. Options are read once, except
 * `getToken`, whose latest value is always used.
 */
export function JobcastProvider(props: JobcastProviderProps): ReactNode {
  const getTokenRef = useRef<JobcastClientOptions['getToken'] | undefined>(undefined);
  getTokenRef.current = props.client ? undefined : props.getToken;
  const [client] = useState<JobcastClient>(() => {
    if (props.client) return props.client;
    const { children: _children, client: _client, ...options } = props;
    // The constructor has no side effects: StrictMode may call this twice and keep one.
    return new JobcastClient({ ...options, getToken: (reason: TokenReason) => getTokenRef.current!(reason) });
  });
  const active = props.client ?? client;
  useEffect(() => {
    active.retain();
    return () => active.release();
  }, [active]);
  return createElement(ClientContext.Provider, { value: active }, props.children);
}

/** The provider's client. */
export function useJobcast(): JobcastClient {
  const client = useContext(ClientContext);
  if (!client) throw new Error('useJobcast must be used inside <JobcastProvider>');
  return client;
}

/** The connection state, re-rendering on change. */
export function useConnectionState(): ConnectionState {
  const client = useJobcast();
  return useSyncExternalStore(
    (notify) => client.onState(() => notify()),
    () => client.state,
    () => client.state,
  );
}

export interface RoomSubscription {
  /** The last `subscribed` answer (null until joined). */
  subscribed: SubscribedData | null;
  /** Why joining failed (`SubscriptionError`), or null. */
  error: Error | null;
}

/**
 * Joins `room` while mounted (null: none) and calls `handler` with each of its events, in order and
 * without duplicates, across reconnects. `handler` may change between renders without re-joining.
 */
export function useRoom(
  room: string | null | undefined,
  handler: (event: RoomEnvelope) => void,
  options: { fromStart?: boolean } = {},
): RoomSubscription {
  const client = useJobcast();
  const handlerRef = useRef(handler);
  handlerRef.current = handler;
  const [sub, setSub] = useState<RoomSubscription>({ subscribed: null, error: null });
  const fromStart = options.fromStart ?? false;
  useEffect(() => {
    if (!room) return;
    let live = true;
    setSub({ subscribed: null, error: null });
    const offEvents = client.onRoom(room, (e) => handlerRef.current(e));
    const offSubscribed = client.on('subscribed', (e) => {
      if (live && e.data.room === room) setSub({ subscribed: e.data, error: null });
    });
    client.subscribe(room, { fromStart }).then(
      (d) => live && setSub({ subscribed: d, error: null }),
      (err: Error) => live && setSub({ subscribed: null, error: err }),
    );
    return () => {
      live = false;
      offEvents();
      offSubscribed();
      client.unsubscribe(room);
    };
  }, [client, room, fromStart]);
  return sub;
}

/** What `useJobProgress` returns. */
export interface JobProgress extends JobState {
  /** The client's connection state. */
  connection: ConnectionState;
  /** Whether the job's room is joined: `idle` (no job), `subscribing`, `subscribed`, `error`. */
  subscription: 'idle' | 'subscribing' | 'subscribed' | 'error';
  /** Why the room could not be joined. */
  subscriptionError: Error | null;
}

const schedule: (fn: () => void) => void =
  typeof requestAnimationFrame === 'function'
    ? (fn) => void requestAnimationFrame(fn)
    : (fn) => void setTimeout(fn, 16);

/**
 * Follows job `jobId` (null: none): status, stage, progress, ETA, zones, message, error and results,
 * starting from the `subscribed` snapshot and replaying the room's history when it already has events
 * (`fromStart`). Renders at most once per animation frame however fast events come.
 */
export function useJobProgress(jobId: string | null | undefined): JobProgress {
  const client = useJobcast();
  const connection = useConnectionState();
  const [state, setState] = useState<JobState>(() => initialJobState(jobId ?? null));
  const [sub, setSub] = useState<{ status: JobProgress['subscription']; error: Error | null }>({
    status: jobId ? 'subscribing' : 'idle',
    error: null,
  });
  useEffect(() => {
    if (!jobId) {
      setState(initialJobState(null));
      setSub({ status: 'idle', error: null });
      return;
    }
    const room = `job:${jobId}`;
    const tracker = new JobTracker(jobId);
    let live = true;
    let pending = false;
    const flush = () => {
      pending = false;
      if (live) setState(tracker.state());
    };
    const apply = (e: Envelope) => {
      tracker.apply(e);
      if (!pending) {
        pending = true;
        schedule(flush);
      }
    };
    setState(tracker.state());
    setSub({ status: 'subscribing', error: null });
    const offEvents = client.onRoom(room, apply);
    const offSubscribed = client.on('subscribed', (e) => {
      if (e.data.room !== room) return;
      apply(e);
      if (live) setSub({ status: 'subscribed', error: null });
    });
    client.subscribe(room, { fromStart: true }).then(
      (d) => {
        if (!live) return;
        // Already joined by someone else: start from the last known snapshot.
        if (tracker.state().status === null) apply({ type: 'subscribed', data: d } as Envelope);
        setSub({ status: 'subscribed', error: null });
      },
      (err: Error) => live && setSub({ status: 'error', error: err }),
    );
    return () => {
      live = false;
      offEvents();
      offSubscribed();
      client.unsubscribe(room);
    };
  }, [client, jobId]);
  return { ...state, connection, subscription: sub.status, subscriptionError: sub.error };
}

/** What `useJob` returns: `useJobProgress`, with the job's `metadata` typed. */
export interface JobView<Meta> extends Omit<JobProgress, 'metadata'> {
  /** The metadata of the job's creation and its worker's reports, merged (null until there is some). */
  metadata: Meta | null;
}

/**
 * Follows job `jobId` like `useJobProgress`, typed on the metadata its worker reports:
 * `const job = useJob<{ album: string; last?: string }>(id); job.metadata?.album`. The type is the
 * caller's promise about what the worker sends; it is not checked at run time.
 */
export function useJob<Meta = JsonValue>(jobId: string | null | undefined): JobView<Meta> {
  const progress = useJobProgress(jobId);
  return progress as unknown as JobView<Meta>;
}
