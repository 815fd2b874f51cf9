// Test support: starts a real jobcast server (the binary built by cargo) on a free port with its own
// data directory, mints tokens with `jobcast token`, and talks HTTP to it with node:http (not the
// global fetch, which DOM test environments replace).

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, createWriteStream } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath, URL as NodeURL } from 'node:url';

const here = fileURLToPath(new NodeURL('.', import.meta.url));
/** The repository root (clients/ is one level below it). */
export const REPO_ROOT = resolve(here, '..', '..');
/** The server binary: $JOBCAST_BIN, else target/debug/jobcast of this repository. */
export const JOBCAST_BIN = process.env.JOBCAST_BIN ?? join(REPO_ROOT, 'target', 'debug', 'jobcast');

export interface HttpResponse<T = any> {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json: T;
}

export interface JobcastServer {
  /** `http://127.0.0.1:PORT` */
  url: string;
  /** `ws://127.0.0.1:PORT/ws` */
  wsUrl: string;
  /** The development admin token the server printed (user dev-admin, tenant default). */
  adminToken: string;
  dataDir: string;
  /** Mints an access JWT with the server's secret. */
  token(user: string, tenant: string, opts?: { roles?: string[]; ttl?: number }): Promise<string>;
  /** Exchanges an access JWT for a single-use WebSocket token. */
  wsToken(access: string): Promise<string>;
  http<T = any>(method: string, path: string, opts?: { token?: string; json?: unknown; body?: Buffer; headers?: Record<string, string> }): Promise<HttpResponse<T>>;
  /** POST /api/v1/uploads (multipart: batch_id, file). */
  upload(token: string, csv: string | Buffer, opts?: { batchId?: string; filename?: string; contentType?: string }): Promise<HttpResponse>;
  /** The admin connection listing. */
  connections(): Promise<{ connection_id: string; user_id: string | null; tenant: string | null; rooms: string[]; ack: boolean; format: string }[]>;
  /** Admin: closes a connection with 4000. */
  disconnect(connectionId: string): Promise<HttpResponse>;
  stop(): Promise<void>;
}

/** Starts `jobcast serve` on 127.0.0.1:0 with a memory store; extra flags are appended. */
export async function startServer(extraArgs: string[] = []): Promise<JobcastServer> {
  const dataDir = mkdtempSync(join(tmpdir(), 'jobcast-test-'));
  const args = ['serve', '--bind', '127.0.0.1:0', '--store', 'memory', '--data-dir', dataDir, ...extraArgs];
  const child: ChildProcess = spawn(JOBCAST_BIN, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, JOBCAST_LOG: process.env.JOBCAST_LOG ?? 'warn' },
  });
  child.stderr!.pipe(createWriteStream(join(dataDir, 'server.log')));
  const { url, adminToken } = await new Promise<{ url: string; adminToken: string }>((ok, fail) => {
    let url = '';
    const timer = setTimeout(() => fail(new Error('jobcast did not start within 20 s')), 20_000);
    child.once('error', (e) => fail(e));
    child.once('exit', (code) => fail(new Error(`jobcast exited early with ${code}`)));
    const lines = createInterface({ input: child.stdout! });
    lines.on('line', (line) => {
      const listening = /^jobcast listening on (http:\/\/\S+)/.exec(line);
      if (listening) url = listening[1]!;
      const admin = /^development admin token[^:]*: (\S+)$/.exec(line);
      if (admin && url) {
        clearTimeout(timer);
        ok({ url, adminToken: admin[1]! });
      }
    });
  });

  const http = <T = any>(
    method: string,
    path: string,
    opts: { token?: string; json?: unknown; body?: Buffer; headers?: Record<string, string> } = {},
  ): Promise<HttpResponse<T>> =>
    new Promise((ok, fail) => {
      const headers: Record<string, string> = { ...opts.headers };
      if (opts.token) headers.authorization = `Bearer ${opts.token}`;
      let body = opts.body;
      if (opts.json !== undefined) {
        body = Buffer.from(JSON.stringify(opts.json));
        headers['content-type'] = 'application/json';
      }
      if (body) headers['content-length'] = String(body.length);
      const req = request(new NodeURL(path, url), { method, headers, timeout: 30_000 }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json: any = undefined;
          try {
            json = text ? JSON.parse(text) : undefined;
          } catch {
            /* not JSON */
          }
          ok({ status: res.statusCode ?? 0, headers: res.headers, text, json });
        });
      });
      req.on('timeout', () => req.destroy(new Error(`${method} ${path} timed out`)));
      req.on('error', fail);
      req.end(body);
    });

  const server: JobcastServer = {
    url,
    wsUrl: url.replace(/^http/, 'ws') + '/ws',
    adminToken,
    dataDir,
    token: (user, tenant, opts = {}) =>
      new Promise((ok, fail) => {
        const a = ['token', '--user', user, '--tenant', tenant, '--data-dir', dataDir];
        if (opts.ttl !== undefined) a.push('--ttl', String(opts.ttl));
        for (const r of opts.roles ?? []) a.push('--role', r);
        execFile(JOBCAST_BIN, a, { timeout: 20_000 }, (err, stdout) => (err ? fail(err) : ok(stdout.trim())));
      }),
    async wsToken(access) {
      const r = await http('POST', '/api/v1/auth/websocket-token', { token: access });
      if (r.status !== 201) throw new Error(`websocket-token: ${r.status} ${r.text}`);
      return r.json.token as string;
    },
    http,
    upload(token, csv, opts = {}) {
      const boundary = `----jobcast${randomUUID()}`;
      const parts: Buffer[] = [];
      if (opts.batchId) {
        parts.push(
          Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="batch_id"\r\n\r\n${opts.batchId}\r\n`),
        );
      }
      parts.push(
        Buffer.from(
          `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="${opts.filename ?? 'test.csv'}"\r\n` +
            `Content-Type: ${opts.contentType ?? 'text/csv'}\r\n\r\n`,
        ),
        Buffer.isBuffer(csv) ? csv : Buffer.from(csv),
        Buffer.from(`\r\n--${boundary}--\r\n`),
      );
      return http('POST', '/api/v1/uploads', {
        token,
        body: Buffer.concat(parts),
        headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
      });
    },
    async connections() {
      const r = await http('GET', '/api/v1/admin/connections', { token: adminToken });
      if (r.status !== 200) throw new Error(`connections: ${r.status} ${r.text}`);
      return r.json.connections;
    },
    disconnect: (id) => http('DELETE', `/api/v1/admin/connections/${id}`, { token: adminToken }),
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise<void>((ok) => child.once('exit', () => ok()));
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(timer);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
  return server;
}

/**
 * A CSV of `rows` valid, distinct data rows (a random tag keeps them distinct from every other file, so
 * nothing counts as a duplicate of an earlier import in the same tenant).
 */
export function generateCsv(rows: number): string {
  const tag = randomUUID().slice(0, 8);
  const shops = ['Whole Foods Market', 'Uber trip', 'Netflix', 'Shell', 'Pharmacy', 'Amazon', 'Salary'];
  const out = ['date,amount,description'];
  for (let i = 0; i < rows; i++) {
    const day = String((i % 28) + 1).padStart(2, '0');
    const month = String((Math.floor(i / 28) % 12) + 1).padStart(2, '0');
    const cents = ((i * 7919) % 100000) / 100;
    out.push(`2025-${month}-${day},-${cents.toFixed(2)},${shops[i % shops.length]} ${tag} #${i}`);
  }
  return out.join('\n') + '\n';
}
