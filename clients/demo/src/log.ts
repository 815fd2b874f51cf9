// The event log's store: entries added from anywhere, rendered at most once per animation frame.

import { useSyncExternalStore } from 'react';

export interface LogEntry {
  id: number;
  time: string;
  kind: 'event' | 'connection' | 'app' | 'error';
  text: string;
  seq?: number;
}

const MAX = 500;

export class Log {
  private entries: LogEntry[] = [];
  private snapshot: LogEntry[] = [];
  private listeners = new Set<() => void>();
  private scheduled = false;
  private next = 1;

  add(kind: LogEntry['kind'], text: string, seq?: number): void {
    const d = new Date();
    const time = [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, '0')).join(':');
    this.entries.push({ id: this.next++, time, kind, text, seq });
    if (this.entries.length > MAX) {
      // Drop the oldest room event; the page's own lines, connection changes and errors stay.
      const i = this.entries.findIndex((e) => e.kind === 'event');
      this.entries.splice(i >= 0 ? i : 0, 1);
    }
    this.schedule();
  }

  clear(): void {
    this.entries = [];
    this.schedule();
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      this.snapshot = this.entries.slice();
      for (const l of this.listeners) l();
    });
  }

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  get = (): LogEntry[] => this.snapshot;
}

export function useLog(log: Log): LogEntry[] {
  return useSyncExternalStore(log.subscribe, log.get, log.get);
}
