// Exponential backoff with full jitter: the n-th retry (n = 0, 1, 2 ...) waits a random time between 0
// and min(capMs, baseMs * 2^n).

export interface BackoffOptions {
  /** First ceiling, in milliseconds (default 500). */
  baseMs?: number;
  /** Largest ceiling, in milliseconds (default 30000). */
  capMs?: number;
  /** Give up after this many consecutive failed attempts (default: never). */
  maxAttempts?: number;
}

export const DEFAULT_BACKOFF = { baseMs: 500, capMs: 30_000, maxAttempts: Infinity } as const;

/** The ceiling of the `attempt`-th retry's delay. */
export function backoffCeiling(attempt: number, options: BackoffOptions = {}): number {
  const base = options.baseMs ?? DEFAULT_BACKOFF.baseMs;
  const cap = options.capMs ?? DEFAULT_BACKOFF.capMs;
  return Math.min(cap, base * 2 ** Math.min(attempt, 52));
}

/** The delay of the `attempt`-th retry: full jitter over [0, ceiling). */
export function backoffDelay(attempt: number, options: BackoffOptions = {}, random: () => number = Math.random): number {
  return Math.floor(random() * backoffCeiling(attempt, options));
}
