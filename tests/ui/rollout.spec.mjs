// The rollout page in Debian's chromium, driven by playwright-core through the loopback
// forwarder (plain HTTP, no certificate in the browser). tests/it/ui.rs starts the controller,
// the agents and the forwarder, runs this script and checks what it reports against the API.
//
// UI_MODE=rollout: a script execution over pool UI_POOL is followed to SUCCEEDED (screenshot
// of the task view mid-rollout to UI_SCREENSHOT), then a long task over UI_POOL_LONG is
// cancelled with the page's button: CANCELLING, then CANCELLED.
// UI_MODE=measure: load time and bytes of the task view of UI_TASK (10,000 machines).
// Results go to UI_RESULT as JSON.

import { createRequire } from 'node:module';
import { writeFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';

const env = (k) => {
  if (!process.env[k]) throw new Error(`${k} is not set`);
  return process.env[k];
};
const require = createRequire(path.join(env('UI_NODE_BASE'), 'package.json'));
const { chromium } = require('playwright-core');

const mode = env('UI_MODE');
const openUrl = env('UI_OPEN_URL');
const origin = new URL(openUrl).origin;
const userDataDir = env('UI_USER_DATA_DIR');
mkdirSync(userDataDir, { recursive: true });

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.UI_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1280, height: 900 },
});
const page = context.pages()[0] || (await context.newPage());
const problems = [];
page.on('pageerror', (e) => problems.push('page error: ' + e.message));
// Chromium logs every non-2xx answer: the 409 of a retry with nothing to retry (the test
// clicks it on a cancelled task, and checks the page shows it) and the 404 of the favicon
// it asks for on its own are expected; anything else is a problem.
page.on('console', (m) => {
  if (m.type() === 'error' && !/status of (404|409)/.test(m.text())) problems.push('console: ' + m.text());
});

const log = (...a) => console.log('[ui]', ...a);
const text = async (sel) => ((await page.textContent(sel)) || '').trim();

// The page's own fetch, so the request carries the forwarder's cookie and this origin.
async function call(method, p, body) {
  return page.evaluate(async ([method, p, body]) => {
    const r = await fetch(p, { method, headers: body ? { 'Content-Type': 'application/json' } : {}, body: body ? JSON.stringify(body) : undefined });
    return { status: r.status, body: await r.json() };
  }, [method, p, body]);
}

// Records every text #task-state shows, in order (a poll's worth of CANCELLING included).
async function watchState() {
  await page.waitForSelector('#task-state .state');
  await page.evaluate(() => {
    window.__states = [];
    const el = document.getElementById('task-state');
    const note = () => {
      const t = el.textContent.trim();
      if (t && window.__states[window.__states.length - 1] !== t) window.__states.push(t);
    };
    note();
    new MutationObserver(note).observe(el, { childList: true, subtree: true, characterData: true });
  });
}
const states = () => page.evaluate(() => window.__states);
const waitState = (s, timeout) => page.waitForFunction((s) => document.querySelector('#task-state')?.textContent.trim() === s, s, { timeout });

const result = {};
try {
  await page.goto(openUrl);
  await page.waitForSelector('#view h1');
  if (!page.url().startsWith(origin + '/ui/')) throw new Error('the one-time URL did not open the page: ' + page.url());

  if (mode === 'rollout') {
    const pool = env('UI_POOL');
    // A gray batch of one machine, then the rest: each machine works a few seconds, so the
    // page has a rollout in progress to show.
    const created = await call('POST', `/v1/pools/${pool}/script-executions`, {
      command_content: 'echo "step 1 of 2 on $(uname -n)"; sleep 4; echo "step 2 of 2: done"',
      command_type: 'sh', gray_count: 1,
    });
    if (created.status !== 200) throw new Error('script execution refused: ' + JSON.stringify(created));
    const id = created.body.task_id;
    result.rollout_task = id;
    await page.goto(`${origin}/ui/#/task/${id}`);
    await watchState();
    // Mid-rollout: the gray batch done, the second batch at work.
    await page.waitForFunction(() => {
      const b0 = document.querySelector('[data-batch="0"] .state');
      const b1 = document.querySelector('[data-batch="1"] .state');
      return b0?.textContent === 'SUCCEEDED' && b1 && b1.textContent !== 'PENDING' && b1.textContent !== 'SUCCEEDED';
    }, null, { timeout: 60000 });
    await page.screenshot({ path: env('UI_SCREENSHOT'), fullPage: true });
    log('screenshot mid-rollout:', env('UI_SCREENSHOT'));
    await waitState('SUCCEEDED', 60000);
    await page.waitForFunction(() => document.querySelectorAll('#machines-table tbody tr').length === 4);
    const rows = await page.$$eval('#machines-table tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent.trim())));
    for (const r of rows) {
      if (r[2] !== 'SUCCEEDED' || r[3] !== '0' || !r[5].includes('step 1 of 2')) throw new Error('unexpected row ' + JSON.stringify(r));
    }
    result.rollout_states = await states();
    const note = await text('#chart-note');
    if (!/observed since it opened/.test(note)) throw new Error('the chart does not say what it is drawn from: ' + note);
    if ((await page.$$('#chart polyline')).length === 0) throw new Error('no line in the chart');
    log('rollout states seen:', result.rollout_states.join(' → '));

    // The other views: the pool with its members online, and one machine.
    await page.goto(`${origin}/ui/#/pools`);
    await page.waitForSelector(`[data-pool="${pool}"]`);
    const card = await text(`[data-pool="${pool}"]`);
    if (!card.includes('4 (4 online)')) throw new Error('pool card: ' + card);
    await page.click(`[data-pool="${pool}"] .members a >> nth=0`);
    await page.waitForSelector('#machine-online');
    const machine = await text('#view');
    if (!machine.includes('online') || !/Expires.*in \d+ days/.test(machine) || !machine.includes(id)) throw new Error('machine view: ' + machine.slice(0, 600));

    // A long task, cancelled from the page.
    const long = await call('POST', `/v1/pools/${env('UI_POOL_LONG')}/script-executions`, {
      command_content: 'echo started; sleep 300', command_type: 'sh', execution_timeout_seconds: 900,
    });
    if (long.status !== 200) throw new Error('long task refused: ' + JSON.stringify(long));
    result.cancel_task = long.body.task_id;
    await page.goto(`${origin}/ui/#/task/${result.cancel_task}`);
    await watchState();
    await page.waitForFunction(() => [...document.querySelectorAll('#machines-table tbody tr td:nth-child(3)')].some((td) => td.textContent === 'RUNNING'), null, { timeout: 60000 });
    await page.click('#btn-cancel');
    if ((await text('#btn-cancel')) !== 'Confirm cancel') throw new Error('cancel asks for a second click');
    await page.click('#btn-cancel');
    await waitState('CANCELLED', 60000);
    result.cancel_states = await states();
    log('cancel states seen:', result.cancel_states.join(' → '), '|', await text('#task-msg'));
    // Retry is another developer's route: its answer (a new task, or its error) is shown.
    await page.click('#btn-retry');
    await page.waitForFunction((id) => !location.hash.endsWith(id) || document.querySelector('#task-msg')?.textContent.includes('retry'), result.cancel_task, { timeout: 10000 });
    result.retry = page.url().endsWith(result.cancel_task) ? await text('#task-msg') : 'opened ' + page.url();
    log('retry:', result.retry);
    // A cancelled task has no failed machine: the page shows the controller's refusal.
    if (!/nothing to retry/.test(result.retry)) throw new Error('retry showed: ' + result.retry);
  } else if (mode === 'measure') {
    const id = env('UI_TASK');
    const sizes = {};
    page.on('response', async (r) => {
      const u = new URL(r.url());
      if (u.origin !== origin) return;
      try { sizes[u.pathname] = sizes[u.pathname] || (await r.body()).length; } catch { /* a redirect has no body */ }
    });
    const loads = [];
    for (let i = 0; i < 3; i++) {
      // A new document each time (no cache: the assets are served no-cache).
      await page.goto('about:blank');
      const t0 = Date.now();
      await page.goto(`${origin}/ui/#/task/${id}`);
      await page.waitForFunction(() => document.querySelectorAll('#machines-table tbody tr').length === 100 &&
        document.querySelectorAll('#batches .batch').length === 2 &&
        /of 10000$/.test(document.getElementById('pager-info').textContent), null, { timeout: 60000 });
      loads.push(Date.now() - t0);
    }
    result.load_ms = loads;
    result.rows = await page.$$eval('#machines-table tbody tr', (t) => t.length);
    result.asset_bytes = ['/ui/', '/ui/app.js', '/ui/app.css'].reduce((a, p) => a + (sizes[p] || 0), 0);
    result.sizes = sizes;
    await page.click('#page-next');
    await page.waitForFunction(() => /^rows 101/.test(document.getElementById('pager-info').textContent));
    result.second_page = await text('#pager-info');
    // One poll's cost: the two requests a poll makes, timed inside the page.
    result.poll = await page.evaluate(async (id) => {
      const time = async (p) => { const t0 = performance.now(); const r = await fetch(p); const b = await r.text(); return { ms: Math.round(performance.now() - t0), bytes: b.length }; };
      return { summary: await time(`/v1/tasks/${id}/summary`), machines_page: await time(`/v1/tasks/${id}/machines?limit=100&offset=0`), full_task: await time(`/v1/tasks/${id}`) };
    }, id);
    log('load times (ms):', loads.join(', '), '| assets', result.asset_bytes, 'bytes | poll', JSON.stringify(result.poll));
  } else {
    throw new Error('UI_MODE must be rollout or measure');
  }
  if (problems.length) throw new Error('the page reported errors:\n' + problems.join('\n'));
  writeFileSync(env('UI_RESULT'), JSON.stringify(result, null, 2));
} catch (e) {
  console.error('[ui] failed:', e.stack || e);
  console.error('[ui] page text:', ((await page.textContent('body').catch(() => '')) || '').slice(0, 2000));
  console.error('[ui] problems:', problems.join('\n'));
  await context.close();
  process.exit(1);
}
await context.close();
