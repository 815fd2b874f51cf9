// Browser end-to-end tests of the demo page: Debian's Chromium (headless, driven by playwright-core)
// against a real jobcast server serving the page it embeds.

import { randomUUID } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

import { generateCsv, REPO_ROOT, startServer, type JobcastServer } from '../test-support/server.js';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = join(REPO_ROOT, 'clients', 'e2e-screenshots');

let server: JobcastServer;
let context: BrowserContext;
let profile: string;
const pages: Page[] = [];

beforeAll(async () => {
  mkdirSync(SHOTS, { recursive: true });
  server = await startServer(['--zone-rows', '10', '--history-size', '100000']);
  profile = mkdtempSync(join(tmpdir(), 'jobcast-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-quic',
      '--no-first-run',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1000, height: 900 },
    timeout: 60_000,
  });
});

afterEach(async () => {
  for (const p of pages.splice(0)) await p.close().catch(() => undefined);
});

afterAll(async () => {
  await context?.close().catch(() => undefined);
  await server?.stop();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

/** Opens the demo page with `?token=`, failing the test on any page error. */
async function openDemo(token: string, viewport?: { width: number; height: number }): Promise<Page> {
  const page = await context.newPage();
  pages.push(page);
  if (viewport) await page.setViewportSize(viewport);
  const problems: string[] = [];
  page.on('pageerror', (e) => problems.push(e.message));
  await page.goto(`${server.url}/?token=${encodeURIComponent(token)}`);
  await page.getByRole('status', { name: 'Connection: Live' }).waitFor({ timeout: 15_000 });
  expect(new URL(page.url()).searchParams.get('token')).toBeNull(); // taken out of the address bar
  (page as Page & { problems?: string[] }).problems = problems;
  return page;
}

const problemsOf = (page: Page) => (page as Page & { problems?: string[] }).problems ?? [];

async function progressOf(page: Page): Promise<number> {
  return Number(await page.getByRole('progressbar', { name: 'Import progress' }).getAttribute('aria-valuenow'));
}

async function zoneCounts(page: Page): Promise<{ total: number; done: number }> {
  return page.evaluate(() => {
    const cells = [...document.querySelectorAll('.zones li')];
    return {
      total: cells.length,
      done: cells.filter((c) => ['completed', 'errors'].includes(c.getAttribute('data-state') ?? '')).length,
    };
  });
}

async function userToken(): Promise<{ user: string; token: string }> {
  const user = `demo-${randomUUID().slice(0, 8)}`;
  return { user, token: await server.token(user, `tenant-${user}`) };
}

describe('the demo page', () => {
  it('imports the sample with the development admin token and shows 100% and the results', async () => {
    const page = await openDemo(server.adminToken);
    expect(await page.locator('#token-hint').textContent()).toMatch(/^Signed in as dev-admin · tenant default · admin, publisher/);
    await page.getByRole('button', { name: 'Use the sample' }).click();
    const bar = page.getByRole('progressbar', { name: 'Import progress' });
    await page.waitForFunction(
      () => document.querySelector('[role=progressbar]')?.getAttribute('aria-valuenow') === '100',
      undefined,
      { timeout: 30_000 },
    );
    expect(await bar.getAttribute('aria-valuetext')).toBe('100.0%, categorization');
    await page.getByTestId('status').filter({ hasText: 'Completed' }).waitFor();
    const summary = page.getByRole('table', { name: 'Summary' });
    await summary.waitFor();
    expect(await summary.getByRole('row', { name: /Rows processed/ }).textContent()).toContain('2,400');
    const invalid = page.getByRole('table', { name: 'Invalid rows' });
    expect(await invalid.textContent()).toContain('invalid date "2026-13-45"');
    expect(await invalid.getByRole('row').nth(1).getByRole('cell').first().textContent()).toBe('58');
    expect(await page.getByRole('table', { name: 'Flagged cells' }).textContent()).toContain('formula injection');
    expect(await page.getByRole('table', { name: 'Categories' }).textContent()).toContain('groceries');
    expect(await zoneCounts(page)).toEqual({ total: 240, done: 240 });
    expect(await page.getByRole('img', { name: 'Zones: 240 of 240 completed' }).count()).toBe(1);
    // Every stage done, the cancel button off, the log has the whole story.
    expect(await page.locator('.stages li[data-state=done]').count()).toBe(5);
    expect(await page.getByRole('button', { name: 'Cancel import' }).isDisabled()).toBe(true);
    const log = page.getByRole('log');
    expect(await log.textContent()).toContain('upload accepted');
    expect(await log.textContent()).toMatch(/completed: \d+ inserted/);
    expect(await page.getByRole('alert').count()).toBe(0);
    await page.screenshot({ path: join(SHOTS, 'completed.png'), fullPage: true });
    expect(problemsOf(page)).toEqual([]);
  });

  it('runs a simulated worker job, reported stage by stage over HTTP, to completion', async () => {
    const page = await openDemo(server.adminToken);
    await page.getByRole('button', { name: 'Run a simulated worker' }).click();
    await page.waitForFunction(
      () => document.querySelector('[role=progressbar]')?.getAttribute('aria-valuenow') === '100',
      undefined,
      { timeout: 30_000 },
    );
    await page.getByTestId('status').filter({ hasText: 'Completed' }).waitFor();
    const log = page.getByRole('log');
    await page.waitForFunction(() => document.querySelector('[role=log]')?.textContent?.includes('the simulated worker ended'));
    expect(await log.textContent()).toContain('the simulated worker ended: completed');
    expect(await log.textContent()).toContain('completed: {"items":15}');
    expect(await page.getByRole('alert').count()).toBe(0);
    expect(problemsOf(page)).toEqual([]);
  });

  it('keeps following the job through a forced disconnect and fills every zone', async () => {
    const { user, token } = await userToken();
    const page = await openDemo(token);
    await page.getByLabel('Choose a CSV file').setInputFiles({
      name: 'big.csv',
      mimeType: 'text/csv',
      buffer: Buffer.from(generateCsv(30_000)),
    });
    await page.waitForFunction(
      () => document.querySelectorAll('.zones li[data-state=completed]').length >= 5,
      undefined,
      { timeout: 30_000 },
    );
    const [conn] = (await server.connections()).filter((c) => c.user_id === user);
    expect(conn).toBeDefined();
    expect((await server.disconnect(conn!.connection_id)).status).toBe(200);
    const atDisconnect = await zoneCounts(page);
    expect(atDisconnect.done).toBeLessThan(3000);
    const jobId = await page.locator('.facts code').textContent();
    const snapshot = await server.http('GET', `/api/v1/jobs/${jobId}`, { token });
    expect(snapshot.json.status).not.toBe('completed'); // the disconnect really was mid-job
    // The page notices, reconnects (a new connection of the same user) and resumes.
    await page.getByRole('log').getByText(/connection lost \(4000/).waitFor({ timeout: 10_000 });
    await page.getByRole('log').getByText('reconnected', { exact: true }).waitFor({ timeout: 15_000 });
    await page.getByRole('log').getByText(/resumed job:.* missed events replayed/).waitFor({ timeout: 15_000 });
    await page.waitForFunction(
      () => document.querySelector('[role=progressbar]')?.getAttribute('aria-valuenow') === '100',
      undefined,
      { timeout: 90_000 },
    );
    await page.getByRole('table', { name: 'Summary' }).waitFor();
    expect(await page.getByTestId('inserted').textContent()).toBe('30,000');
    expect(await zoneCounts(page)).toEqual({ total: 3000, done: 3000 });
    const now = (await server.connections()).filter((c) => c.user_id === user);
    expect(now).toHaveLength(1);
    expect(now[0]!.connection_id).not.toBe(conn!.connection_id);
    expect(await page.getByRole('status', { name: 'Connection: Live' }).count()).toBe(1);
    await page.screenshot({ path: join(SHOTS, 'after-disconnect.png'), fullPage: true });
    expect(problemsOf(page)).toEqual([]);
  });

  it('cancels a running import', async () => {
    const { token } = await userToken();
    const page = await openDemo(token);
    await page.getByLabel('Choose a CSV file').setInputFiles({
      name: 'huge.csv',
      mimeType: 'text/csv',
      buffer: Buffer.from(generateCsv(60_000)),
    });
    await page.waitForFunction(
      () => document.querySelectorAll('.zones li[data-state=completed]').length >= 3,
      undefined,
      { timeout: 30_000 },
    );
    const cancel = page.getByRole('button', { name: 'Cancel import' });
    expect(await cancel.isEnabled()).toBe(true);
    await cancel.focus();
    await page.keyboard.press('Enter'); // keyboard works
    await page.getByTestId('status').filter({ hasText: /Cancelled by demo-/ }).waitFor({ timeout: 30_000 });
    await page.getByRole('log').getByText(/^cancelled by demo-/).waitFor();
    expect(await progressOf(page)).toBeLessThan(100);
    const zones = await zoneCounts(page);
    expect(zones.total).toBe(6000);
    expect(zones.done).toBeLessThan(6000);
    expect(await cancel.isDisabled()).toBe(true);
    expect(await page.getByRole('table', { name: 'Summary' }).count()).toBe(0);
    await page.screenshot({ path: join(SHOTS, 'cancelled.png'), fullPage: true });
    expect(problemsOf(page)).toEqual([]);
  });

  it('shows a clear error for a dropped file that is not a CSV, and is readable on a phone', async () => {
    const { token } = await userToken();
    const page = await openDemo(token, { width: 390, height: 844 });
    const dataTransfer = await page.evaluateHandle(() => {
      const dt = new DataTransfer();
      dt.items.add(new File([new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0, 0, 0, 0])], 'photo.png', { type: 'image/png' }));
      return dt;
    });
    await page.locator('.drop').dispatchEvent('drop', { dataTransfer });
    const alert = page.getByRole('alert');
    await alert.waitFor({ timeout: 15_000 });
    expect(await alert.textContent()).toContain('Upload refused: photo.png (image/png) is not a CSV file');
    // Nothing wider than the screen.
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    expect(overflow).toBeLessThanOrEqual(0);
    await page.screenshot({ path: join(SHOTS, 'phone-error.png'), fullPage: true });
    expect(problemsOf(page)).toEqual([]);
  });
});
