// fieldhand's rollout page (controller::ui): hash routes, short polling of /v1 on this
// origin, DOM built with textContent only (no HTML from data), no framework, no build step.
'use strict';

const MACHINE_STATES = ['PENDING', 'DISPATCHED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'TIMED_OUT', 'SKIPPED', 'CANCELLED'];
const TASK_STATES = ['PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'HALTED', 'CANCELLING', 'CANCELLED'];
const TERMINAL = new Set(['SUCCEEDED', 'FAILED', 'HALTED', 'CANCELLED']);
const COLORS = { PENDING: '#b7c0c9', DISPATCHED: '#8fb8ea', RUNNING: '#2f7bd8', SUCCEEDED: '#2e9d4f', FAILED: '#d23c3c', TIMED_OUT: '#e07b1f', SKIPPED: '#9aa3ad', CANCELLED: '#4b535c' };
const PAGE = 100;
const POLL_MS = 1500;
const SVG = 'http://www.w3.org/2000/svg';

// Results of machines as this page saw them in task tables (the API keeps no per-machine history).
const seenResults = new Map();

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

const enc = encodeURIComponent;
const state = (v) => h('span', { class: 'state ' + (v || ''), text: v || '—' });
const when = (t) => (t ? new Date(t).toLocaleString() : '—');
const clock = (ms) => new Date(ms).toLocaleTimeString();
const firstLines = (text, n) => {
  const lines = (text || '').split('\n');
  let out = lines.slice(0, n).join('\n');
  if (out.length > 240) out = out.slice(0, 240);
  return out + (lines.length > n || out.length < (text || '').trimEnd().length ? ' …' : '');
};

class ApiError extends Error {
  constructor(status, body) {
    const code = body && body.error_code ? body.error_code : 'HTTP_' + status;
    super(status + ' ' + code + ': ' + (body && body.error_msg ? body.error_msg : 'no answer'));
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error_msg: text.slice(0, 200) }; }
  if (!r.ok) throw new ApiError(r.status, data);
  return { data, headers: r.headers, bytes: text.length };
}

// A route the controller does not serve yet (another release): 404 "no route".
const missing = (e) => e instanceof ApiError && e.status === 404 && /no route/.test(e.message);

function setStatus(text, bad) {
  const el = document.getElementById('status');
  el.textContent = text;
  el.className = bad ? 'err' : '';
}

// One view at a time: navigating bumps the generation, which ends the old view's polls.
let generation = 0;
function poll(gen, fn, ms) {
  const tick = async () => {
    if (gen !== generation) return;
    if (!document.hidden) {
      try {
        await fn();
        if (gen === generation) setStatus('live · updated ' + clock(Date.now()));
      } catch (e) {
        if (gen === generation) setStatus('update failed: ' + e.message, true);
      }
    }
    if (gen === generation) setTimeout(tick, typeof ms === 'function' ? ms() : ms);
  };
  tick();
}

function route() {
  const gen = ++generation;
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || '');
  const view = document.getElementById('view');
  view.replaceChildren();
  for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('on', a.dataset.nav === (parts[0] || 'tasks').replace(/^(task|machine)$/, (m) => (m === 'task' ? 'tasks' : 'pools')));
  const views = { tasks: tasksView, task: taskView, pools: poolsView, machine: machineView };
  const fn = views[parts[0] || 'tasks'];
  if (!fn) {
    view.append(h('p', { text: 'No such view: #/' + path }));
    return;
  }
  fn(view, gen, parts[1], params);
}

// ---- tasks -------------------------------------------------------------------------------

function tasksView(view, gen, _id, params) {
  const pool = params.get('pool') || '';
  const st = params.get('state') || '';
  const cursors = [''];
  let page = 0;
  const poolIn = h('input', { id: 'filter-pool', placeholder: 'pool id', value: pool });
  const stateSel = h('select', { id: 'filter-state' }, h('option', { value: '', text: 'any state' }),
    TASK_STATES.map((v) => h('option', { value: v, text: v, selected: v === st })));
  const apply = () => { location.hash = '#/tasks?pool=' + enc(poolIn.value.trim()) + '&state=' + enc(stateSel.value); };
  poolIn.addEventListener('change', apply);
  stateSel.addEventListener('change', apply);
  const body = h('tbody');
  const info = h('span', { class: 'muted' });
  const prev = h('button', { text: '← newer', disabled: true, onclick: () => { page -= 1; refresh(); } });
  const next = h('button', { text: 'older →', disabled: true, onclick: () => { page += 1; refresh(); } });
  const msg = h('div');
  view.append(h('h1', { text: 'Tasks' }),
    h('div', { class: 'filters' }, 'Pool ', poolIn, ' State ', stateSel),
    msg,
    h('table', { id: 'tasks-table' }, h('thead', {}, h('tr', {}, ['Created', 'Task', 'Kind', 'Pool', 'State', 'Machines', 'By', 'Finished'].map((t) => h('th', { text: t })))), body),
    h('div', { class: 'pager' }, prev, next, info));
  let unserved = false;
  async function refresh() {
    if (unserved) return;
    const q = new URLSearchParams({ pool_id: pool, state: st, limit: '50' });
    if (cursors[page]) q.set('cursor', cursors[page]);
    let r;
    try {
      r = await api('GET', '/v1/tasks?' + q);
    } catch (e) {
      if (!missing(e)) throw e;
      unserved = true;
      msg.replaceChildren(h('div', { class: 'msg' }, 'This controller does not list tasks yet (GET /v1/tasks: ' + e.message + '). Open a task by its id above, or from a pool’s last operation on ',
        h('a', { href: '#/pools', text: 'Pools' }), '.'));
      return;
    }
    const nextCursor = r.headers.get('Fieldhand-Next-Cursor');
    if (nextCursor) cursors[page + 1] = nextCursor;
    prev.disabled = page === 0;
    next.disabled = !nextCursor;
    info.textContent = 'page ' + (page + 1);
    body.replaceChildren(...(r.data || []).map((t) => h('tr', {},
      h('td', { text: when(t.created_at) }),
      h('td', {}, h('a', { href: '#/task/' + enc(t.task_id), text: t.task_id })),
      h('td', { text: t.kind }),
      h('td', {}, h('a', { href: '#/pools', text: t.pool_id })),
      h('td', {}, state(t.state)),
      h('td', {}, miniBar(t.machine_states || {})),
      h('td', { text: [t.created_by, t.cancelled_by ? 'cancelled by ' + t.cancelled_by : ''].filter(Boolean).join(', ') }),
      h('td', { text: when(t.finished_at) }))));
    if (!r.data || r.data.length === 0) body.append(h('tr', {}, h('td', { colspan: 8, class: 'muted', text: 'no task' })));
  }
  poll(gen, refresh, 2000);
}

function miniBar(counts) {
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  const bar = h('div', { class: 'bar', title: Object.entries(counts).map(([k, v]) => k + ' ' + v).join(', ') });
  for (const k of MACHINE_STATES) {
    if (!counts[k]) continue;
    const seg = h('span', { class: 'seg-' + k });
    seg.style.width = (100 * counts[k] / total) + '%';
    bar.append(seg);
  }
  return h('div', {}, bar, h('span', { class: 'note', text: total + ' machines' }));
}

// ---- one task ----------------------------------------------------------------------------

function taskView(view, gen, id) {
  const openedAt = Date.now();
  const samples = [];
  let offset = 0;
  let filter = '';
  let summary = null;
  let pageDirty = true;
  let readSinceEnd = false;
  const title = h('h1', { text: 'Task ' + id });
  const meta = h('div', { class: 'counts', id: 'task-meta' });
  const taskState = h('span', { id: 'task-state' });
  const msg = h('div', { id: 'task-msg' });
  let confirmTimer = null;
  const cancelBtn = h('button', { id: 'btn-cancel', class: 'danger', text: 'Cancel task', disabled: true });
  cancelBtn.addEventListener('click', async () => {
    if (!cancelBtn.dataset.armed) {
      // Two clicks, no modal dialog: a cancel stops every machine of the task.
      cancelBtn.dataset.armed = '1';
      cancelBtn.textContent = 'Confirm cancel';
      confirmTimer = setTimeout(() => { delete cancelBtn.dataset.armed; cancelBtn.textContent = 'Cancel task'; }, 5000);
      return;
    }
    clearTimeout(confirmTimer);
    delete cancelBtn.dataset.armed;
    cancelBtn.textContent = 'Cancel task';
    await act('cancel', (r) => 'Cancel requested: the task is ' + r.data.state + '.');
  });
  const retryBtn = h('button', { id: 'btn-retry', text: 'Retry', title: 'a new task over the machines that did not succeed', disabled: true,
    onclick: () => act('retry', (r) => { location.hash = '#/task/' + enc(r.data.task_id); return 'Retrying as task ' + r.data.task_id + '.'; }) });
  const resumeBtn = h('button', { id: 'btn-resume', text: 'Resume', title: 'go on with a halted task', disabled: true,
    onclick: () => act('resume', () => 'Resumed.') });
  async function act(what, done) {
    msg.replaceChildren();
    try {
      const r = await api('POST', '/v1/tasks/' + enc(id) + '/' + what);
      msg.replaceChildren(h('div', { class: 'msg', text: done(r) }));
      // Cancel and resume answer with this task: show its state now (a CANCELLING that
      // ends before the next poll is still shown), then refresh the rest.
      if (r.data && r.data.task_id === id && r.data.state) taskState.replaceChildren(state(r.data.state));
      pageDirty = true;
      await refresh();
    } catch (e) {
      msg.replaceChildren(h('div', { class: 'msg err', text: what + ' failed: ' + e.message + (missing(e) ? ' (this controller does not serve ' + what + ' yet)' : '') }));
    }
  }
  const batches = h('div', { id: 'batches' });
  const chart = s('svg', { class: 'chart', id: 'chart', viewBox: '0 0 640 180', role: 'img', 'aria-label': 'machines by state over time' });
  const legend = h('div', { class: 'legend' });
  const chartNote = h('p', { class: 'note', id: 'chart-note' });
  const filterSel = h('select', { id: 'machine-filter' });
  filterSel.addEventListener('change', () => { filter = filterSel.value; offset = 0; pageDirty = true; refreshPage(); });
  const pagerInfo = h('span', { id: 'pager-info', class: 'muted' });
  const prev = h('button', { id: 'page-prev', text: '← previous', onclick: () => { offset = Math.max(0, offset - PAGE); refreshPage(); } });
  const next = h('button', { id: 'page-next', text: 'next →', onclick: () => { offset += PAGE; refreshPage(); } });
  const rows = h('tbody');
  view.append(title, h('div', { class: 'card' }, h('div', { class: 'counts' }, h('span', {}, 'State ', taskState), meta),
    h('div', { class: 'actions' }, cancelBtn, retryBtn, resumeBtn), msg),
  h('h2', { text: 'Batches' }), batches,
  h('h2', { text: 'Machines by state over time' }), chart, legend, chartNote,
  h('h2', { text: 'Machines' }),
  h('div', { class: 'pager' }, 'Show ', filterSel, prev, next, pagerInfo),
  h('table', { id: 'machines-table' }, h('thead', {}, h('tr', {}, ['Machine', 'Batch', 'State', 'Exit', 'Error', 'Output (first lines)'].map((t) => h('th', { text: t, class: t === 'Batch' || t === 'Exit' ? 'num' : null })))), rows));

  function renderSummary(t) {
    summary = t;
    taskState.replaceChildren(state(t.state));
    const done = Object.entries(t.machine_states).filter(([k]) => !['PENDING', 'DISPATCHED', 'RUNNING'].includes(k)).reduce((a, [, v]) => a + v, 0);
    meta.replaceChildren(
      h('span', {}, 'Kind ', h('b', { text: t.kind })),
      h('span', {}, 'Pool ', h('a', { href: '#/pools', text: t.pool_id })),
      h('span', { id: 'task-total' }, h('b', { text: done + ' / ' + t.machines }), ' machines done'),
      h('span', {}, 'Created ', h('b', { text: when(t.created_at) })),
      h('span', {}, 'Finished ', h('b', { text: when(t.finished_at) })));
    cancelBtn.disabled = !['PENDING', 'RUNNING'].includes(t.state);
    retryBtn.disabled = !TERMINAL.has(t.state);
    resumeBtn.disabled = t.state !== 'HALTED';
    batches.replaceChildren(...t.batches.map((b) => {
      const bar = h('div', { class: 'bar' });
      const counts = h('div', { class: 'counts' });
      for (const k of MACHINE_STATES) {
        const n = b.machine_states[k];
        if (!n) continue;
        const seg = h('span', { class: 'seg-' + k, title: k + ' ' + n });
        seg.style.width = (100 * n / b.machines) + '%';
        bar.append(seg);
        counts.append(h('span', { 'data-state': k }, k + ' ', h('b', { text: n })));
      }
      return h('div', { class: 'card batch', 'data-batch': b.index },
        h('div', {}, h('b', { text: b.index === 0 && t.batches.length > 1 ? 'Gray batch' : 'Batch ' + b.index }), h('div', {}, state(b.state))),
        h('div', {}, bar, counts, h('span', { class: 'note', text: b.machines + (b.machines === 1 ? ' machine' : ' machines') })));
    }));
    const options = [h('option', { value: '', text: 'all (' + t.machines + ')' })];
    for (const k of MACHINE_STATES) if (t.machine_states[k]) options.push(h('option', { value: k, text: k + ' (' + t.machine_states[k] + ')' }));
    if (filter && !t.machine_states[filter]) options.push(h('option', { value: filter, text: filter + ' (0)' }));
    filterSel.replaceChildren(...options);
    filterSel.value = filter;
    samples.push({ t: Date.now(), c: t.machine_states, n: t.machines });
    if (samples.length > 1200) samples.splice(0, samples.length - 1200);
    drawChart();
  }

  function drawChart() {
    chart.replaceChildren();
    // One SVG unit per CSS pixel, so the labels keep their shape at any width.
    const W = Math.max(320, Math.round(chart.getBoundingClientRect().width) || 640), H = 180, L = 36, B = 18, T = 8, R = 8;
    chart.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
    const t0 = samples[0].t;
    const t1 = Math.max(samples[samples.length - 1].t, t0 + 10000);
    const max = Math.max(1, ...samples.map((p) => p.n));
    const x = (t) => L + (W - L - R) * (t - t0) / (t1 - t0);
    const y = (v) => H - B - (H - B - T) * v / max;
    chart.append(s('line', { class: 'axis', x1: L, y1: y(0), x2: W - R, y2: y(0) }), s('line', { class: 'axis', x1: L, y1: T, x2: L, y2: y(0) }));
    const label = (text, ax, ay, anchor) => { const el = s('text', { x: ax, y: ay, 'text-anchor': anchor }); el.textContent = text; chart.append(el); };
    label(String(max), L - 4, T + 8, 'end');
    label('0', L - 4, y(0), 'end');
    label(clock(t0), L, H - 4, 'start');
    label(clock(t1), W - R, H - 4, 'end');
    legend.replaceChildren();
    for (const k of MACHINE_STATES) {
      if (!samples.some((p) => p.c[k])) continue;
      const pts = samples.map((p) => x(p.t).toFixed(1) + ',' + y(p.c[k] || 0).toFixed(1)).join(' ');
      chart.append(s('polyline', { points: pts, fill: 'none', stroke: COLORS[k], 'stroke-width': 2, 'data-state': k }));
      const sw = h('i');
      sw.style.background = COLORS[k];
      legend.append(h('span', {}, sw, k));
    }
    chartNote.textContent = 'Drawn from what this page has observed since it opened at ' + clock(openedAt) + ' (' + samples.length +
      ' samples, one per poll); it is not the task’s recorded history, and starts again when the page is reloaded.';
  }

  async function refreshPage() {
    const q = new URLSearchParams({ limit: String(PAGE), offset: String(offset) });
    if (filter) q.set('state', filter);
    const r = await api('GET', '/v1/tasks/' + enc(id) + '/machines?' + q);
    const p = r.data;
    if (p.total > 0 && offset >= p.total) { offset = Math.floor((p.total - 1) / PAGE) * PAGE; return refreshPage(); }
    prev.disabled = offset === 0;
    next.disabled = offset + PAGE >= p.total;
    pagerInfo.textContent = p.total === 0 ? 'no machine' : 'rows ' + (offset + 1) + '–' + (offset + p.machines.length) + ' of ' + p.total;
    rows.replaceChildren(...p.machines.map((m) => {
      const seen = seenResults.get(m.machine_id) || [];
      const at = seen.findIndex((r) => r.task_id === id);
      const rec = { task_id: id, state: m.state, exit_code: m.exit_code, error_code: m.error_code, out: firstLines(m.stdout, 1), seen: Date.now() };
      if (at >= 0) seen[at] = rec; else seen.unshift(rec);
      seenResults.set(m.machine_id, seen.slice(0, 20));
      return h('tr', { 'data-machine': m.machine_id },
        h('td', {}, h('a', { href: '#/machine/' + enc(m.machine_id), text: m.machine_id })),
        h('td', { class: 'num', text: m.batch }),
        h('td', {}, state(m.state)),
        h('td', { class: 'num', text: m.exit_code === null || m.exit_code === undefined ? '' : m.exit_code }),
        h('td', { title: m.error_msg || null, text: m.error_code || '' }),
        h('td', {}, h('pre', { text: firstLines(m.stdout, 3) })));
    }));
    pageDirty = false;
  }

  async function refresh() {
    const r = await api('GET', '/v1/tasks/' + enc(id) + '/summary');
    renderSummary(r.data);
    // A finished task's rows no longer change: read its page once after it ended (the rows
    // may have moved since the last read), then only on demand.
    const ended = TERMINAL.has(r.data.state);
    if (!ended) readSinceEnd = false;
    if (!ended || pageDirty || !readSinceEnd) {
      await refreshPage();
      readSinceEnd = ended;
    }
  }
  poll(gen, async () => {
    try {
      await refresh();
    } catch (e) {
      if (e instanceof ApiError && e.code === 'TASK_NOT_FOUND') { view.replaceChildren(h('h1', { text: 'Task ' + id }), h('div', { class: 'msg err', text: e.message })); generation++; return; }
      throw e;
    }
  }, () => (summary && TERMINAL.has(summary.state) ? 5000 : POLL_MS));
}

// ---- pools -------------------------------------------------------------------------------

function poolsView(view, gen) {
  const list = h('div', { id: 'pools' });
  const note = h('p', { class: 'note' });
  view.append(h('h1', { text: 'Pools' }), note, list);
  let derived = false;
  async function pools() {
    if (!derived) {
      try {
        const r = await api('GET', '/v1/pools');
        const details = await Promise.all(r.data.map((p) => api('GET', '/v1/pools/' + enc(p.pool_id)).then((d) => d.data, () => null)));
        note.textContent = '';
        return r.data.map((p, i) => ({ pool_id: p.pool_id, count: p.machines, online: p.online, provisioning: p.provisioning,
          members: details[i] ? details[i].machines.map((m) => ({ machine_id: m, online: null })) : [] }));
      } catch (e) {
        if (!missing(e)) throw e;
        derived = true;
      }
    }
    note.textContent = 'Pools derived from GET /v1/machines (this controller does not serve GET /v1/pools yet).';
    const machines = (await api('GET', '/v1/machines')).data;
    const by = new Map();
    for (const m of machines) {
      const k = m.pool_id || '';
      if (!by.has(k)) by.set(k, []);
      by.get(k).push(m);
    }
    const out = [];
    for (const [pool, ms] of [...by.entries()].sort()) {
      let provisioning = null;
      if (pool) provisioning = await api('GET', '/v1/pools/' + enc(pool) + '/provisioning-status').then((r) => r.data, () => null);
      out.push({ pool_id: pool, count: ms.length, online: ms.filter((m) => m.online).length, provisioning, members: ms.map((m) => ({ machine_id: m.machine_id, online: m.online })) });
    }
    return out;
  }
  poll(gen, async () => {
    const ps = await pools();
    list.replaceChildren(...ps.map(poolCard));
    if (ps.length === 0) list.append(h('p', { class: 'muted', text: 'No machine has connected yet.' }));
  }, () => (derived ? 5000 : 2000));
}

function poolCard(p) {
  const pr = p.provisioning;
  const facts = h('dl', { class: 'facts' },
    h('dt', { text: 'Machines' }), h('dd', { text: p.count + ' (' + p.online + ' online)' }));
  if (pr) {
    facts.append(
      h('dt', { text: 'Operation' }), h('dd', {}, state(pr.operation), pr.task_id ? [' ', h('a', { href: '#/task/' + enc(pr.task_id), text: 'task ' + pr.task_id })] : null),
      h('dt', { text: 'Current image' }), h('dd', {}, pr.current_image_id || '—', ' ', pr.current_image_state ? state(pr.current_image_state) : null),
      h('dt', { text: 'Pending image' }), h('dd', {}, pr.pending_image_id || '—', ' ', pr.pending_image_state ? state(pr.pending_image_state) : null,
        pr.pending_image_progress !== null && pr.pending_image_progress !== undefined ? ' ' + pr.pending_image_progress + '%' : null,
        pr.start_time ? ' at ' + when(pr.start_time) : null),
      h('dt', { text: 'Last operation' }), h('dd', { text: pr.machines ? pr.machines.succeeded + ' succeeded, ' + pr.machines.failed + ' failed, ' + pr.machines.pending + ' pending, ' + pr.machines.skipped + ' skipped of ' + pr.machines.total : '—' }));
    if (pr.error_code) facts.append(h('dt', { text: 'Error' }), h('dd', { text: pr.error_code + ': ' + (pr.error_msg || '') }));
  }
  const shown = p.members.slice(0, 200);
  return h('div', { class: 'card', 'data-pool': p.pool_id },
    h('h2', { text: p.pool_id ? 'Pool ' + p.pool_id : 'In no pool' }), facts,
    h('div', { class: 'members' }, shown.map((m) => h('a', { href: '#/machine/' + enc(m.machine_id), class: m.online === null ? null : m.online ? 'online' : 'offline', title: m.online === null ? null : m.online ? 'online' : 'offline' }, (m.online === null ? '' : m.online ? '● ' : '○ ') + m.machine_id)),
      p.members.length > shown.length ? h('span', { class: 'muted', text: '+' + (p.members.length - shown.length) + ' more' }) : null));
}

// ---- one machine -------------------------------------------------------------------------

function machineView(view, gen, id) {
  const body = h('div');
  view.append(h('h1', { text: 'Machine ' + id }), body);
  poll(gen, async () => {
    let m;
    try {
      m = (await api('GET', '/v1/machines/' + enc(id))).data;
    } catch (e) {
      body.replaceChildren(h('div', { class: 'msg err', text: e.message }));
      if (e instanceof ApiError && e.status < 500) return;
      throw e;
    }
    const dl = (pairs) => h('dl', { class: 'facts' }, pairs.flatMap(([k, v]) => [h('dt', { text: k }), h('dd', {}, v === null || v === undefined || v === '' ? '—' : v)]));
    const expiry = m.certificate_not_after ? (() => {
      const days = Math.floor((new Date(m.certificate_not_after) - Date.now()) / 86400000);
      return when(m.certificate_not_after) + (days < 0 ? ' (EXPIRED)' : ' (in ' + days + ' days)');
    })() : null;
    const img = m.image || {};
    const seen = seenResults.get(id) || [];
    body.replaceChildren(
      h('div', { class: 'card' }, dl([
        ['Online', h('span', { class: m.online ? 'online' : 'offline', id: 'machine-online', text: m.online ? '● online' : '○ offline' })],
        ['Last seen', when(m.last_seen)],
        ['Pool', m.pool_id ? h('a', { href: '#/pools', text: m.pool_id }) : 'none'],
        ['Agent version', m.agent_version],
        ['Identity conflict', m.identity_conflict ? 'yes: two live agents present this identity' : 'no'],
      ])),
      h('h2', { text: 'Facts' }), h('div', { class: 'card' }, m.facts ? dl(Object.entries(m.facts).map(([k, v]) => [k, typeof v === 'object' ? JSON.stringify(v) : String(v)])) : h('span', { class: 'muted', text: 'not reported yet' })),
      h('h2', { text: 'Certificate' }), h('div', { class: 'card' }, dl([['Serial', m.certificate_serial], ['Expires', expiry]])),
      h('h2', { text: 'Image' }), h('div', { class: 'card' }, dl([
        ['Current', img.current_image_id ? [img.current_image_id, ' ', state(img.current_image_state)] : null],
        ['Pending', img.pending_image_id ? [img.pending_image_id, ' ', state(img.pending_image_state), img.pending_image_progress != null ? ' ' + img.pending_image_progress + '%' : ''] : null],
        ['Language', img.language],
      ])),
      h('h2', { text: 'Recent results' }),
      h('p', { class: 'note', text: 'Results of this machine in the tasks this page has shown since it opened (the API keeps no per-machine list yet).' }),
      seen.length ? h('table', {}, h('thead', {}, h('tr', {}, ['Task', 'State', 'Exit', 'Error', 'Output', 'Seen'].map((t) => h('th', { text: t })))),
        h('tbody', {}, seen.map((r) => h('tr', {}, h('td', {}, h('a', { href: '#/task/' + enc(r.task_id), text: r.task_id })), h('td', {}, state(r.state)),
          h('td', { text: r.exit_code ?? '' }), h('td', { text: r.error_code || '' }), h('td', {}, h('pre', { text: r.out })), h('td', { text: clock(r.seen) })))))
        : h('p', { class: 'muted', text: 'none seen yet' }));
  }, 2000);
}

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('goto').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const v = document.getElementById('goto-id').value.trim();
    if (!v) return;
    location.hash = (/^[0-9a-f]{8}-[0-9a-f]{4}-/i.test(v) ? '#/task/' : '#/machine/') + enc(v);
  });
  window.addEventListener('hashchange', route);
  route();
});
