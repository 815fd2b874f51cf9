// A scripted stand-in for a WebSocket, for unit tests of the client's state machine.
import type { WebSocketLike } from '../src/client.js';

let ids = 0;

export class FakeSocket implements WebSocketLike {
  static all: FakeSocket[] = [];
  static reset(): void {
    FakeSocket.all = [];
  }
  static get last(): FakeSocket {
    return FakeSocket.all[FakeSocket.all.length - 1]!;
  }

  readyState = 0;
  binaryType = 'blob';
  sent: any[] = [];
  closedByClient: { code?: number; reason?: string } | null = null;
  readonly createdAt = Date.now();
  onopen: ((e: any) => void) | null = null;
  onmessage: ((e: any) => void) | null = null;
  onclose: ((e: any) => void) | null = null;
  onerror: ((e: any) => void) | null = null;

  constructor(readonly url: string) {
    FakeSocket.all.push(this);
  }
  send(data: string): void {
    if (this.readyState !== 1) throw new Error('not open');
    this.sent.push(JSON.parse(data));
  }
  close(code?: number, reason?: string): void {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }
  get token(): string | null {
    return new URL(this.url).searchParams.get('token');
  }

  // The server's side.
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(type: string, data: unknown, room?: { room: string; seq: number; epoch: string; redelivered?: true }): void {
    const env: any = { type, data, id: `00000000-0000-4000-8000-${String(++ids).padStart(12, '0')}`, ts: '2026-11-22T08:00:00.000Z' };
    if (room) Object.assign(env, room);
    this.onmessage?.({ data: JSON.stringify(env) });
  }
  /** Opens and authenticates. */
  accept(user = 'alice', tenant = 'acme'): void {
    this.open();
    this.receive('connection_established', {
      connection_id: '9b2e4f6a-1c3d-4e5f-8a7b-6c5d4e3f2a10',
      heartbeat_interval_s: 30,
      server_version: 'jobcast/0.1.0',
      features: [],
    });
    this.receive('authenticated', { user_id: user, tenant, expires_at: '2026-11-22T09:00:00Z' });
  }
  serverClose(code: number, reason = ''): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  sentOfType(type: string): any[] {
    return this.sent.filter((m) => m.type === type);
  }
}
