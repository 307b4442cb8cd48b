// tracer dashboard: a single page, hash-routed, no framework and no build.
//
// Data flow: one EventSource on /api/stream keeps `state.topology` current
// (every 2 s) and tells the mounted page; pages that need other endpoints
// (/api/stat, /api/routes) poll them on the same cadence. The tap page owns a
// second EventSource on /api/tap. Every value that came from the network is
// escaped before it goes into HTML: process names and request paths are
// chosen by whoever runs or calls a workload, not by us.
(function () {
  'use strict';

  const WINDOWS = ['10s', '1m', '10m'];
  const POLL_MS = 2000;
  const STATUS_POLL_MS = 10000;
  const TAP_MAX_ROWS = 500;
  const RECONNECT_MS = 3000;

  const state = {
    window: initialWindow(),
    topology: null, // last /api/topology or snapshot event
    status: null, // last /api/status
    page: null, // the mounted page: {onSnapshot, onWindow, unmount}
    stream: null, // the snapshot EventSource wrapper
  };

  // ---------------------------------------------------------------------------
  // Small helpers

  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function esc(v) {
    return String(v == null ? '' : v).replace(/[&<>"']/g, (c) => ({
      '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
    }[c]));
  }

  // Workload names such as "10.0.0.5:80" or "[other]" go into hash paths.
  const workloadHref = (name) => '#/workload/' + encodeURIComponent(name);

  function initialWindow() {
    try {
      const w = localStorage.getItem('tracer.window');
      if (WINDOWS.includes(w)) return w;
    } catch (e) { /* storage may be disabled; the default is fine */ }
    return '1m';
  }

  // ---------------------------------------------------------------------------
  // Formatting. Tests read these strings from the DOM, so they are plain text:
  // RPS with one decimal, success as a percentage with two, integers unformatted.

  const fmtRps = (x) => (x == null || !isFinite(x) ? '—' : Number(x).toFixed(1));
  const fmtPct = (sr) => (sr == null || !isFinite(sr) ? '—' : (sr * 100).toFixed(2) + '%');
  const fmtInt = (n) => (n == null ? '—' : String(Math.round(n)));

  // Loopback services answer in microseconds: below 0.1 ms, show µs rather than "0.01 ms".
  function fmtMs(v) {
    if (v == null || !isFinite(v)) return '—';
    if (v < 0.1) return Math.max(1, Math.round(v * 1000)) + ' µs';
    if (v < 10) return v.toFixed(2) + ' ms';
    if (v < 100) return v.toFixed(1) + ' ms';
    return Math.round(v) + ' ms';
  }

  // Shorter forms for graph labels, where space is tight.
  function shortPct(sr) {
    // Truncate, not round: 98.96% must not read "99.0%" on an amber edge.
    const p = Math.floor(sr * 1000) / 10;
    return (p >= 100 ? '100' : p.toFixed(1)) + '%';
  }
  function shortMs(v) {
    if (v == null) return null;
    if (v < 0.1) return Math.max(1, Math.round(v * 1000)) + 'µs';
    return (v < 10 ? v.toFixed(1) : Math.round(v)) + 'ms';
  }

  function fmtDuration(s) {
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  function fmtClock(tsMs) {
    const d = new Date(tsMs);
    const p = (n, w) => String(n).padStart(w || 2, '0');
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
  }

  // Health class from a WindowStats: thresholds as in Linkerd's dashboard.
  function health(stats) {
    if (!stats || !stats.requests) return 'idle';
    if (stats.success_rate >= 0.99) return 'ok';
    if (stats.success_rate >= 0.95) return 'warn';
    return 'bad';
  }

  function statusClass(code) {
    const c = Math.floor(Number(code) / 100);
    return c >= 2 && c <= 5 ? `s${c}xx` : 'sxxx';
  }

  // Read the palette from CSS, so the canvas graph matches the tables.
  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }
  const healthColor = (h) => cssVar('--' + h);

  // ---------------------------------------------------------------------------
  // Talking to the daemon

  function apiUrl(path, params) {
    const q = new URLSearchParams();
    Object.entries(params || {}).forEach(([k, v]) => {
      if (v != null && v !== '') q.set(k, v);
    });
    const qs = q.toString();
    return 'api/' + path + (qs ? '?' + qs : '');
  }

  // fetch + JSON. A network error means the daemon is unreachable (banner);
  // an HTTP error with a JSON body is the daemon talking, so it is thrown with
  // its message for the page to show.
  async function api(path, params) {
    let res;
    try {
      res = await fetch(apiUrl(path, params), { cache: 'no-store' });
    } catch (e) {
      reachability.fail('fetch');
      throw e;
    }
    reachability.ok('fetch');
    let body = null;
    try { body = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) {
      const err = new Error((body && body.error) || `HTTP ${res.status}`);
      err.status = res.status;
      throw err;
    }
    return body;
  }

  // EventSource retries by itself after a dropped connection, but gives up for
  // good on an HTTP error or a wrong content type (readyState CLOSED), e.g.
  // while a proxy in front of the daemon restarts; then we reconnect ourselves.
  function openStream(url, handlers, onState) {
    let es = null, timer = null, closed = false;
    function connect() {
      es = new EventSource(url);
      es.onopen = () => onState && onState('open');
      es.onerror = () => {
        onState && onState('error');
        if (es.readyState === EventSource.CLOSED && !closed) {
          clearTimeout(timer);
          timer = setTimeout(connect, RECONNECT_MS);
        }
      };
      Object.entries(handlers).forEach(([ev, fn]) => {
        es.addEventListener(ev, (msg) => {
          let data;
          try { data = JSON.parse(msg.data); } catch (e) { return; }
          fn(data);
        });
      });
    }
    connect();
    return {
      close() {
        closed = true;
        clearTimeout(timer);
        if (es) es.close();
      },
    };
  }

  // The banner shows while any source (snapshot stream, fetches) is failing.
  const reachability = {
    failing: new Set(),
    fail(src) { this.failing.add(src); this.render(); },
    ok(src) { this.failing.delete(src); this.render(); },
    render() {
      const down = this.failing.size > 0;
      const b = $('#banner');
      if (down) {
        b.className = 'banner';
        b.textContent = 'daemon not reachable, retrying…';
        b.hidden = false;
      } else if (state.status && state.status.ready === false) {
        b.className = 'banner info';
        b.textContent = 'daemon is starting: eBPF programs are not attached yet';
        b.hidden = false;
      } else {
        b.hidden = true;
      }
      $('#live-dot').className = 'live-dot ' + (down ? 'down' : state.topology ? 'up' : '');
      // What is on screen is no longer live: say so by dimming it.
      document.body.classList.toggle('stale', down);
    },
  };

  // ---------------------------------------------------------------------------
  // Snapshot stream and header

  function startSnapshotStream() {
    if (state.stream) state.stream.close();
    const w = state.window;
    state.stream = openStream(apiUrl('stream', { window: w }), {
      snapshot: (data) => {
        reachability.ok('stream');
        setTopology(data);
      },
    }, (s) => (s === 'error' ? reachability.fail('stream') : reachability.ok('stream')));
    // The stream's first event can be up to 2 s away: fetch once right now.
    api('topology', { window: w }).then(setTopology, () => {});
  }

  function setTopology(data) {
    // A late answer for a window we already left must not overwrite the new one.
    if (!data || (data.window && data.window !== state.window)) return;
    state.topology = data;
    document.body.dataset.loaded = 'true'; // first data is in: a marker for tests
    reachability.render();
    if (state.page && state.page.onSnapshot) state.page.onSnapshot(data);
  }

  async function pollStatus() {
    try {
      state.status = await api('status');
      const s = state.status;
      const parts = [];
      if (s.version) parts.push('v' + String(s.version).replace(/^v/, ''));
      if (s.uptime_seconds != null) parts.push('up ' + fmtDuration(s.uptime_seconds));
      if (s.programs != null) parts.push(s.programs + ' programs');
      $('#daemon-text').textContent = parts.join(' · ') || 'connected';
    } catch (e) {
      $('#daemon-text').textContent = 'unreachable';
    }
    reachability.render();
  }

  function setWindow(w) {
    if (!WINDOWS.includes(w) || w === state.window) return;
    state.window = w;
    try { localStorage.setItem('tracer.window', w); } catch (e) { /* ignore */ }
    renderWindowSelect();
    startSnapshotStream();
    if (state.page && state.page.onWindow) state.page.onWindow(w);
  }

  function renderWindowSelect() {
    $$('#window-select button').forEach((b) => b.classList.toggle('active', b.dataset.window === state.window));
  }

  // ---------------------------------------------------------------------------
  // Sparklines: inline SVG from a history ([Point], oldest first, 10 s slots).
  // X is placed by time over the last 10 minutes, so rows line up and a series
  // that started recently fills only the right-hand part.

  function sparkline(points, key, opts) {
    opts = opts || {};
    const w = opts.width || 120, h = opts.height || 26, pad = 2;
    const color = opts.color || cssVar('--accent');
    const pts = (points || []).filter((p) => p && p.t != null);
    if (pts.length < 2) {
      return `<svg class="spark" width="${w}" height="${h}" aria-hidden="true">` +
        `<line class="base" x1="0" x2="${w}" y1="${h - pad}" y2="${h - pad}"/></svg>`;
    }
    const tMax = pts[pts.length - 1].t, tMin = tMax - 590;
    const vals = pts.map((p) => p[key]).filter((v) => v != null && isFinite(v));
    let lo = opts.min != null ? opts.min : 0;
    let hi = opts.max != null ? opts.max : Math.max(...vals, 0);
    if (opts.min == null && key === 'success_rate') lo = Math.min(0.9, ...vals);
    if (hi - lo < 1e-9) hi = lo + 1;
    const x = (t) => pad + ((t - tMin) / (tMax - tMin)) * (w - 2 * pad);
    const y = (v) => h - pad - ((v - lo) / (hi - lo)) * (h - 2 * pad);

    // One path per run of non-null values: a gap means "no data", not zero.
    const runs = [];
    let cur = [];
    pts.forEach((p) => {
      const v = p[key];
      if (p.t < tMin || v == null || !isFinite(v)) {
        if (cur.length) runs.push(cur);
        cur = [];
      } else cur.push([x(p.t), y(v)]);
    });
    if (cur.length) runs.push(cur);
    let svg = `<svg class="spark" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" aria-hidden="true">`;
    svg += `<line class="base" x1="0" x2="${w}" y1="${h - pad}" y2="${h - pad}"/>`;
    runs.forEach((run) => {
      const d = run.map((q, i) => (i ? 'L' : 'M') + q[0].toFixed(1) + ' ' + q[1].toFixed(1)).join('');
      if (run.length > 1 && !opts.noArea) {
        const area = `${d}L${run[run.length - 1][0].toFixed(1)} ${h - pad}L${run[0][0].toFixed(1)} ${h - pad}Z`;
        svg += `<path class="area" d="${area}" fill="${color}"/>`;
      }
      svg += `<path class="line" d="${d}" stroke="${color}"/>`;
    });
    const last = runs.length ? runs[runs.length - 1] : null;
    if (last) {
      const q = last[last.length - 1];
      svg += `<circle cx="${q[0].toFixed(1)}" cy="${q[1].toFixed(1)}" r="2" fill="${color}"/>`;
    }
    return svg + '</svg>';
  }

  // ---------------------------------------------------------------------------
  // Table pieces shared by several pages

  function srCell(stats) {
    const h = health(stats);
    const sr = stats ? stats.success_rate : null;
    const cls = stats && stats.requests ? h : 'idle muted';
    return `<td class="num sr ${cls}" data-v="${sr == null ? '' : sr}"><span class="dot ${h}"></span>${fmtPct(sr)}</td>`;
  }

  const lat = (stats, k) => (stats && stats.latency ? stats.latency[k] : null);
  const numCell = (text, v) => `<td class="num${text === '—' ? ' muted' : ''}" data-v="${v == null ? '' : v}">${esc(text)}</td>`;
  const nameLink = (name) => `<a href="${workloadHref(name)}">${esc(name)}</a>`;

  // Edges from the topology, one row per peer (inbound: the caller; outbound: the callee).
  function peerTable(edges, dir, withRequests) {
    if (!edges.length) return `<div class="empty">No ${dir === 'in' ? 'inbound' : 'outbound'} traffic seen.</div>`;
    const rows = edges.map((e) => {
      const peer = dir === 'in' ? e.src : e.dst;
      const w = e.window;
      // data-peer, not data-src/data-dst: those mark the rows of #edges only.
      return `<tr data-peer="${esc(peer)}">` +
        `<td class="name">${nameLink(peer)}</td>` +
        numCell(fmtRps(w.rps), w.rps) + srCell(w) +
        numCell(fmtMs(lat(w, 'p50_ms')), lat(w, 'p50_ms')) +
        numCell(fmtMs(lat(w, 'p99_ms')), lat(w, 'p99_ms')) +
        (withRequests ? numCell(fmtInt(e.requests), e.requests) : '') + '</tr>';
    }).join('');
    return `<table class="data compact"><thead><tr><th>${dir === 'in' ? 'From' : 'To'}</th>` +
      '<th class="num">RPS</th><th class="num">Success</th><th class="num">p50</th><th class="num">p99</th>' +
      (withRequests ? '<th class="num">Requests</th>' : '') + `</tr></thead><tbody>${rows}</tbody></table>`;
  }

  const byName = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
  const sortEdges = (edges) => edges.slice().sort((a, b) => byName(a.src, b.src) || byName(a.dst, b.dst));

  // Replace a table body only when its HTML changed: keeps hover and text
  // selection stable between identical snapshots.
  function setHTML(node, html) {
    if (node && node._html !== html) {
      node.innerHTML = html;
      node._html = html;
    }
  }

  // ---------------------------------------------------------------------------
  // Page: topology

  function TopologyPage(view) {
    view.innerHTML = `
      <div class="kpis" id="kpis"></div>
      <div class="card graph-card">
        <div class="card-h"><h2>Service topology</h2><span class="meta" id="topo-meta"></span>
          <div class="right">
            <div class="legend">
              <span><span class="dot ok"></span>≥ 99%</span><span><span class="dot warn"></span>≥ 95%</span>
              <span><span class="dot bad"></span>&lt; 95%</span><span><span class="dot idle"></span>no requests</span>
            </div>
            <button class="btn small" id="relayout" title="Lay the graph out again and fit it">Re-layout</button>
          </div>
        </div>
        <div class="graph-wrap">
          <div id="graph"></div>
          <div class="card side" id="side" hidden></div>
          <div class="graph-hint">Click a workload or an edge for details · drag to pan · scroll to zoom · double-click a workload to open it</div>
        </div>
      </div>
      <!-- Automated tests read this table: keep its id, the data-src/data-dst
           rows and exactly seven cells (sparklines live in the edge panel). -->
      <div class="card">
        <div class="card-h"><h2>Edges</h2><span class="meta" id="edges-meta"></span></div>
        <div class="table-wrap"><table class="data" id="edges">
          <thead><tr><th>Source</th><th>Destination</th><th class="num">RPS</th><th class="num">Success</th>
          <th class="num">p50</th><th class="num">p99</th><th class="num">Requests</th></tr></thead>
          <tbody></tbody></table></div>
      </div>`;

    let selected = null; // {type: 'node', name} | {type: 'edge', src, dst}
    const graph = createGraph($('#graph', view), {
      onSelect: (sel) => { selected = sel; renderSide(); highlightRow(); },
    });

    $('#relayout', view).addEventListener('click', () => graph.relayout());
    $('#side', view).addEventListener('click', (ev) => {
      if (ev.target.closest('[data-close]')) graph.select(null);
    });
    // Clicking a table row selects that edge in the graph as well.
    $('#edges tbody', view).addEventListener('click', (ev) => {
      const tr = ev.target.closest('tr');
      if (!tr || ev.target.closest('a')) return;
      graph.select({ type: 'edge', src: tr.dataset.src, dst: tr.dataset.dst });
    });

    function render(topo) {
      graph.update(topo);
      const edges = sortEdges(topo.edges || []);
      const pairs = new Set(edges.map((e) => e.src + '\u2192' + e.dst));
      const tcpOnly = (topo.tcp || []).filter((e) => !pairs.has(e.src + '\u2192' + e.dst)).length;
      $('#topo-meta', view).textContent = `${(topo.nodes || []).length} workloads · ${edges.length} edges` +
        (tcpOnly ? ` · ${tcpOnly} TCP only (dashed)` : '') + ` · window ${topo.window}`;
      setHTML($('#kpis', view), kpiStrip(topo));
      $('#edges-meta', view).textContent = 'success rate and latency over the last ' + topo.window + '; requests since the daemon started';
      const rows = edges.map((e) => {
        const w = e.window;
        return `<tr data-src="${esc(e.src)}" data-dst="${esc(e.dst)}">` +
          `<td class="name">${nameLink(e.src)}</td><td class="name">${nameLink(e.dst)}</td>` +
          numCell(fmtRps(w.rps), w.rps) + srCell(w) +
          numCell(fmtMs(lat(w, 'p50_ms')), lat(w, 'p50_ms')) +
          numCell(fmtMs(lat(w, 'p99_ms')), lat(w, 'p99_ms')) +
          numCell(fmtInt(e.requests), e.requests) + '</tr>';
      }).join('');
      setHTML($('#edges tbody', view), rows || '<tr><td colspan="7" class="empty">No HTTP traffic observed yet.</td></tr>');
      highlightRow();
      renderSide();
    }

    function highlightRow() {
      $$('#edges tbody tr', view).forEach((tr) => tr.classList.toggle('selected', !!selected &&
        ((selected.type === 'edge' && tr.dataset.src === selected.src && tr.dataset.dst === selected.dst) ||
         (selected.type === 'node' && (tr.dataset.src === selected.name || tr.dataset.dst === selected.name)))));
    }

    function renderSide() {
      const side = $('#side', view);
      const topo = state.topology;
      let html = '';
      if (topo && selected && selected.type === 'node') {
        const node = (topo.nodes || []).find((n) => n.name === selected.name);
        if (node) html = nodePanel(node, topo);
      }
      if (topo && selected && selected.type === 'edge') {
        const e = (topo.edges || []).find((x) => x.src === selected.src && x.dst === selected.dst);
        if (e) html = edgePanel(e);
      }
      side.hidden = !html;
      setHTML(side, html);
    }

    if (state.topology) render(state.topology);

    return {
      onSnapshot: render,
      unmount: () => graph.destroy(),
    };
  }

  function statBoxes(items) {
    return '<div class="kv">' + items.map(([k, v]) => `<div><span class="k">${esc(k)}</span><span class="v">${esc(v)}</span></div>`).join('') + '</div>';
  }

  function nodePanel(node, topo) {
    const inbound = sortEdges(topo.edges.filter((e) => e.dst === node.name));
    const outbound = sortEdges(topo.edges.filter((e) => e.src === node.name));
    const s = node.inbound || node.outbound;
    const role = node.inbound ? (node.outbound ? 'server and client' : 'server') : 'client only';
    return `<div class="card-h"><h2>Workload</h2>${closeBtn}</div><div class="card-b">
      <div class="side-title">${esc(node.name)}</div>
      <div class="side-sub">${esc(role)}${node.inbound ? '' : ' · numbers below are its outbound requests'}</div>
      ${statBoxes([['RPS', fmtRps(s && s.rps)], ['Success', fmtPct(s && s.success_rate)],
        ['p50', fmtMs(lat(s, 'p50_ms'))], ['p99', fmtMs(lat(s, 'p99_ms'))]])}
      <h3>Inbound</h3>${peerTable(inbound, 'in')}
      <h3>Outbound</h3>${peerTable(outbound, 'out')}
      <div class="link-row"><a class="btn primary small" href="${workloadHref(node.name)}">Open workload →</a>
      ${node.inbound ? `<a class="btn small" href="#/tap?to=${encodeURIComponent(node.name)}">Tap</a>` : ''}</div>
    </div>`;
  }

  function edgePanel(e) {
    const w = e.window;
    const color = healthColor(health(w) === 'idle' ? 'idle' : health(w));
    return `<div class="card-h"><h2>Edge</h2>${closeBtn}</div><div class="card-b">
      <div class="side-title">${esc(e.src)}<span class="arrow">→</span>${esc(e.dst)}</div>
      <div class="side-sub">${e.dst_addrs && e.dst_addrs.length ? 'to ' + esc(e.dst_addrs.join(', ')) : ''}</div>
      ${statBoxes([['RPS', fmtRps(w.rps)], ['Success', fmtPct(w.success_rate)],
        ['p50', fmtMs(lat(w, 'p50_ms'))], ['p99', fmtMs(lat(w, 'p99_ms'))]])}
      <h3>RPS, last 10 min</h3>${sparkline(e.history, 'rps', { width: 320, height: 40, color })}
      <h3>Success rate</h3>${sparkline(e.history, 'success_rate', { width: 320, height: 40, color })}
      <h3>p99 latency</h3>${sparkline(e.history, 'p99_ms', { width: 320, height: 40, color: cssVar('--server') })}
      <div class="side-sub" style="margin-top:10px">${fmtInt(e.requests)} requests since the daemon started</div>
      <div class="link-row"><a class="btn small" href="${workloadHref(e.src)}">${esc(e.src)}</a>
      <a class="btn small" href="${workloadHref(e.dst)}">${esc(e.dst)}</a>
      <a class="btn small" href="#/tap?from=${encodeURIComponent(e.src)}&to=${encodeURIComponent(e.dst)}">Tap</a></div>
    </div>`;
  }

  const closeBtn = '<button class="btn small right-btn" data-close title="Close">✕</button>';

  // Totals over all edges for the window, and the edges that need a look.
  function kpiStrip(topo) {
    const edges = topo.edges || [];
    const total = edges.reduce((a, e) => a + (e.window.requests || 0), 0);
    const fails = edges.reduce((a, e) => a + (e.window.failures || 0), 0);
    const rps = edges.reduce((a, e) => a + (e.window.rps || 0), 0);
    const all = { requests: total, success_rate: total ? (total - fails) / total : 1 };
    const unhealthy = edges.filter((e) => ['warn', 'bad'].includes(health(e.window)))
      .sort((a, b) => a.window.success_rate - b.window.success_rate);
    const servers = (topo.nodes || []).filter((n) => n.inbound).length;
    const kpi = (k, v, cls, foot) => `<div class="card kpi"><div class="k">${k}</div><div class="v ${cls || ''}">${v}</div><div class="foot">${foot}</div></div>`;
    const attention = unhealthy.length
      ? unhealthy.slice(0, 3).map((e) => `<a href="${workloadHref(e.dst)}">${esc(e.src)} → ${esc(e.dst)}</a> <span class="${health(e.window)}-text">${fmtPct(e.window.success_rate)}</span>`).join('<br>') +
        (unhealthy.length > 3 ? `<br>and ${unhealthy.length - 3} more` : '')
      : 'every edge with traffic is at ≥ 99% success';
    return kpi('Requests / s', fmtRps(rps), '', `${fmtInt(total)} requests in ${esc(topo.window)}`) +
      kpi('Success rate', fmtPct(all.success_rate), total ? health(all) : '', `${fmtInt(fails)} failures (5xx)`) +
      kpi('Workloads', String((topo.nodes || []).length), '', `${servers} serving HTTP · ${edges.length} edges`) +
      `<div class="card kpi attention"><div class="k">Needs attention</div><div class="v ${unhealthy.length ? 'bad' : 'ok'}">${unhealthy.length}</div><div class="foot">${attention}</div></div>`;
  }

  // The Cytoscape graph. Element ids are derived from names; when a snapshot
  // has exactly the same ids as what is drawn, only data changes (labels,
  // colours, widths), so the layout, zoom and pan the user chose stay put.
  function createGraph(container, opts) {
    if (typeof cytoscape !== 'function') {
      container.innerHTML = '<div class="empty">The graph library failed to load (assets/cytoscape.min.js).</div>';
      return { update() {}, relayout() {}, select() {}, destroy() {} };
    }
    const measure = document.createElement('canvas').getContext('2d');
    measure.font = '600 13px ' + cssVar('--sans');
    const C = {
      ok: cssVar('--ok'), warn: cssVar('--warn'), bad: cssVar('--bad'), idle: cssVar('--idle'),
      nodeBg: cssVar('--node-bg'), nodeText: cssVar('--node-text'), labelBg: cssVar('--edge-label-bg'),
      accent: cssVar('--accent'), muted: cssVar('--muted'),
    };
    const cy = cytoscape({
      container,
      minZoom: 0.25,
      maxZoom: 3,
      boxSelectionEnabled: false,
      autoungrabify: false,
      style: [
        { selector: 'node', style: {
          shape: 'round-rectangle', 'background-color': C.nodeBg,
          'border-width': 2.5, 'border-color': 'data(color)',
          label: 'data(label)', color: C.nodeText, 'font-size': 13, 'font-weight': 600,
          'font-family': cssVar('--sans'), 'text-valign': 'center', 'text-halign': 'center',
          width: 'data(w)', height: 34,
        } },
        { selector: 'node[kind = "client"]', style: { 'border-style': 'solid', 'border-width': 1.5, 'border-color': C.muted, color: C.muted } },
        { selector: 'node[kind = "external"]', style: { 'border-style': 'dashed' } },
        { selector: 'edge', style: {
          'curve-style': 'bezier', width: 'data(width)', 'line-color': 'data(color)',
          'target-arrow-shape': 'triangle', 'target-arrow-color': 'data(color)', 'arrow-scale': 1.1,
          label: 'data(label)', 'font-size': 11, 'font-family': cssVar('--sans'), color: 'data(textColor)',
          'text-background-color': C.labelBg, 'text-background-opacity': 0.92, 'text-background-padding': 3,
          'text-background-shape': 'round-rectangle', 'text-border-color': 'data(color)', 'text-border-width': 1,
          'text-border-opacity': 0.55,
        } },
        { selector: 'edge[?tcp]', style: { 'line-style': 'dashed', 'target-arrow-shape': 'vee' } },
        { selector: '.faded', style: { opacity: 0.18 } },
        { selector: 'node:selected', style: { 'border-width': 4, 'overlay-color': C.accent, 'overlay-opacity': 0.08, 'overlay-padding': 6 } },
        { selector: 'edge:selected', style: { 'overlay-color': C.accent, 'overlay-opacity': 0.12, 'overlay-padding': 4 } },
      ],
    });
    let signature = '';
    // Markers for automated checks (and for curious humans in devtools):
    // data-nodes/data-edges count what is drawn, data-rendered appears once
    // the canvas has actually been painted with elements on it.
    cy.on('render', () => {
      if (cy.elements().nonempty() && !container.dataset.rendered) container.dataset.rendered = 'true';
    });

    function nodeData(n) {
      const served = !!n.inbound;
      // "10.0.0.5:80" or "[::1]:80": a server that is not a process on this host.
      const external = /^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:.]+\]):\d+$/i.test(n.name);
      const kind = !served ? 'client' : external ? 'external' : 'server';
      const h = served ? health(n.inbound) : 'idle';
      return {
        id: 'n:' + n.name, name: n.name, label: n.name, kind,
        color: served ? C[h] : C.idle,
        w: Math.max(60, Math.ceil(measure.measureText(n.name).width) + 28),
      };
    }

    function edgeData(e) {
      const w = e.window;
      const h = health(w);
      let label = 'no requests';
      if (w.requests) {
        const p99 = shortMs(lat(w, 'p99_ms'));
        label = `${fmtRps(w.rps)} rps · ${shortPct(w.success_rate)}` + (p99 ? ` · p99 ${p99}` : '');
      }
      // Line width grows with the log of the rate: 1 rps and 1000 rps both stay readable.
      const width = w.rps > 0 ? Math.min(6, 1.5 + Math.log10(1 + w.rps) * 1.6) : 1.2;
      return {
        id: 'e:' + e.src + '\u2192' + e.dst, source: 'n:' + e.src, target: 'n:' + e.dst,
        src: e.src, dst: e.dst, label, color: C[h], width,
        textColor: h === 'bad' ? C.bad : h === 'idle' ? C.idle : C.nodeText,
      };
    }

    // A TCP connection between two workloads that exchange no HTTP (a database, a cache, TLS
    // not followed): dashed, labelled with its connections.
    function tcpEdgeData(e) {
      let label = `${e.open} open · ${e.established} conn${e.established === 1 ? '' : 's'}`;
      if (e.failed) label += ` · ${e.failed} failed`;
      const color = e.failed && !e.established ? C.bad : e.failed ? C.warn : C.idle;
      return {
        id: 't:' + e.src + '\u2192' + e.dst, source: 'n:' + e.src, target: 'n:' + e.dst,
        src: e.src, dst: e.dst, label, color, width: 1.2, tcp: true,
        textColor: e.failed ? color : C.idle,
      };
    }

    function update(topo) {
      const nodes = (topo.nodes || []).slice();
      const http = new Set((topo.edges || []).map((e) => e.src + '\u2192' + e.dst));
      const tcp = (topo.tcp || []).filter((e) => !http.has(e.src + '\u2192' + e.dst));
      // An edge may name a node the snapshot did not list; draw it anyway.
      const known = new Set(nodes.map((n) => n.name));
      (topo.edges || []).concat(tcp).forEach((e) => [e.src, e.dst].forEach((name) => {
        if (!known.has(name)) { known.add(name); nodes.push({ name, inbound: null, outbound: null }); }
      }));
      const els = nodes.map((n) => ({ group: 'nodes', data: nodeData(n) }))
        .concat((topo.edges || []).map((e) => ({ group: 'edges', data: edgeData(e) })))
        .concat(tcp.map((e) => ({ group: 'edges', data: tcpEdgeData(e) })));
      const sig = els.map((x) => x.data.id).sort().join('\n');
      container.dataset.nodes = String(nodes.length);
      container.dataset.edges = String((topo.edges || []).length + tcp.length);
      if (sig === signature) {
        cy.batch(() => els.forEach((x) => cy.getElementById(x.data.id).data(x.data)));
        return;
      }
      // The set changed: replace what differs, keep what stays, lay out again.
      const wanted = new Set(els.map((x) => x.data.id));
      cy.batch(() => {
        cy.elements().filter((ele) => !wanted.has(ele.id())).remove();
        els.forEach((x) => {
          const ele = cy.getElementById(x.data.id);
          if (ele.nonempty()) ele.data(x.data);
          else cy.add(x);
        });
      });
      signature = sig;
      relayout();
      applySelection(current); // new elements must fade like the rest
    }

    // Layered left-to-right layout: callers on the left, the servers they call
    // to their right, so edges run roughly horizontally and their labels stay
    // legible. Cytoscape's breadthfirst ranks nodes by *shortest* distance from
    // a root (a server called both directly and through a proxy lands in the
    // proxy's column), so ranks and row order are computed here and handed to
    // the built-in 'preset' layout.
    function relayout() {
      if (!cy.nodes().length) return;
      const pos = layeredPositions(cy);
      cy.layout({ name: 'preset', positions: (n) => pos.get(n.id()), animate: false, fit: false }).run();
      cy.fit(undefined, 50);
      // A small graph fitted to a big canvas would get huge: cap the zoom.
      if (cy.zoom() > 1.25) { cy.zoom(1.25); cy.center(); }
    }

    let current = null; // the selection, kept to re-apply after elements change

    function applySelection(sel) {
      current = sel;
      cy.elements().removeClass('faded').unselect();
      if (!sel) return;
      let focus;
      if (sel.type === 'node') focus = cy.getElementById('n:' + sel.name);
      else focus = cy.getElementById('e:' + sel.src + '\u2192' + sel.dst);
      if (focus.empty()) return;
      focus.select();
      const keep = sel.type === 'node' ? focus.closedNeighborhood() : focus.union(focus.connectedNodes());
      cy.elements().not(keep).addClass('faded');
    }

    function select(sel) {
      applySelection(sel);
      opts.onSelect(sel);
    }

    cy.on('tap', 'node', (ev) => select({ type: 'node', name: ev.target.data('name') }));
    cy.on('tap', 'edge', (ev) => select({ type: 'edge', src: ev.target.data('src'), dst: ev.target.data('dst') }));
    cy.on('tap', (ev) => { if (ev.target === cy) select(null); });
    cy.on('dbltap', 'node', (ev) => { location.hash = workloadHref(ev.target.data('name')); });

    // For devtools and automated checks: window.tracer.cy is the live graph.
    window.tracer.cy = cy;
    return {
      update, relayout, select,
      destroy() { window.tracer.cy = null; cy.destroy(); },
    };
  }

  // Positions for a layered drawing of the graph in `cy` (a Map id -> {x, y}).
  //  1. rank = longest path from a caller, ignoring edges that close a cycle;
  //     a pure caller then moves right to sit just before its nearest callee.
  //  2. order within each column by the barycentre of neighbours' rows,
  //     a few sweeps each way (the classic heuristic against crossings).
  //  3. columns are as far apart as the widest node plus the widest edge label.
  function layeredPositions(cy) {
    const ids = cy.nodes().map((n) => n.id()).sort();
    const succ = new Map(ids.map((id) => [id, []]));
    const pred = new Map(ids.map((id) => [id, []]));
    cy.edges().forEach((e) => {
      const a = e.source().id(), b = e.target().id();
      if (a !== b) { succ.get(a).push(b); pred.get(b).push(a); }
    });
    // Depth-first search marks back edges so that cycles do not loop forever.
    const back = new Set(), color = new Map();
    function dfs(u) {
      color.set(u, 1);
      succ.get(u).forEach((v) => {
        if (color.get(v) === 1) back.add(u + '\0' + v);
        else if (!color.get(v)) dfs(v);
      });
      color.set(u, 2);
    }
    ids.filter((id) => !pred.get(id).length).forEach((id) => { if (!color.get(id)) dfs(id); });
    ids.forEach((id) => { if (!color.get(id)) dfs(id); });
    const fwd = (a, b) => !back.has(a + '\0' + b);
    const rank = new Map();
    function rankOf(u) {
      if (rank.has(u)) return rank.get(u);
      rank.set(u, 0); // provisional, in case of a (non-forward) loop
      const ps = pred.get(u).filter((p) => fwd(p, u));
      const r = ps.length ? Math.max(...ps.map(rankOf)) + 1 : 0;
      rank.set(u, r);
      return r;
    }
    ids.forEach(rankOf);
    ids.forEach((id) => {
      const ss = succ.get(id).filter((v) => fwd(id, v));
      if (!pred.get(id).length && ss.length) rank.set(id, Math.max(0, Math.min(...ss.map((v) => rank.get(v))) - 1));
    });

    const cols = [];
    ids.forEach((id) => { const r = rank.get(id); (cols[r] = cols[r] || []).push(id); });
    const row = new Map();
    const place = () => cols.forEach((c) => c && c.forEach((id, i) => row.set(id, i - (c.length - 1) / 2)));
    place();
    const bary = (id, nbrs) => {
      const ys = nbrs.get(id).map((v) => row.get(v));
      return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : row.get(id);
    };
    for (let sweep = 0; sweep < 6; sweep++) {
      const nbrs = sweep % 2 ? succ : pred;
      cols.forEach((c) => c && c.sort((a, b) => bary(a, nbrs) - bary(b, nbrs) || byName(a, b)));
      place();
    }

    const ctx = document.createElement('canvas').getContext('2d');
    ctx.font = '11px ' + cssVar('--sans');
    const labelW = Math.max(0, ...cy.edges().map((e) => ctx.measureText(e.data('label') || '').width));
    const nodeW = Math.max(60, ...cy.nodes().map((n) => n.data('w') || 60));
    const colGap = nodeW + labelW + 70;
    const rowGap = 84;
    const pos = new Map();
    ids.forEach((id) => pos.set(id, { x: rank.get(id) * colGap, y: row.get(id) * rowGap }));
    return pos;
  }

  // ---------------------------------------------------------------------------
  // Page: workloads (like `linkerd viz stat`)

  function WorkloadsPage(view) {
    view.innerHTML = `
      <div class="page-head"><h1>Workloads</h1><span class="sub" id="wl-sub">HTTP servers seen on this host</span></div>
      <div class="card"><div class="table-wrap"><table class="data" id="workloads">
        <thead><tr><th>Name</th><th class="num">Success</th><th class="num">RPS</th><th class="num">p50</th>
        <th class="num">p95</th><th class="num">p99</th><th class="num">Requests</th><th>Status codes</th><th>RPS, last 10 min</th></tr></thead>
        <tbody><tr><td colspan="9" class="empty">Loading…</td></tr></tbody></table></div></div>`;
    const poll = poller(async () => {
      const data = await api('stat', { window: state.window });
      render(data);
    }, (e) => setHTML($('#workloads tbody', view), `<tr><td colspan="9" class="empty">${esc(e.message)}</td></tr>`));

    function render(data) {
      const list = (data.workloads || []).slice().sort((a, b) => byName(a.name, b.name));
      $('#wl-sub', view).textContent = `HTTP servers seen on this host · success, RPS and latency over the last ${data.window}; requests since the daemon started`;
      const rows = list.map((w) => {
        const s = w.window;
        return `<tr data-name="${esc(w.name)}"><td class="name">${nameLink(w.name)}</td>` +
          srCell(s) + numCell(fmtRps(s.rps), s.rps) +
          numCell(fmtMs(lat(s, 'p50_ms')), lat(s, 'p50_ms')) +
          numCell(fmtMs(lat(s, 'p95_ms')), lat(s, 'p95_ms')) +
          numCell(fmtMs(lat(s, 'p99_ms')), lat(s, 'p99_ms')) +
          numCell(fmtInt(w.requests), w.requests) +
          `<td>${codesBar(w.status_codes)}</td>` +
          `<td class="spark-cell">${sparkline(w.history, 'rps', { color: healthColor(health(s) === 'idle' ? 'idle' : 'ok') })}</td></tr>`;
      }).join('');
      setHTML($('#workloads tbody', view), rows || '<tr><td colspan="9" class="empty">No HTTP servers observed yet.</td></tr>');
    }

    return { onWindow: poll.now, unmount: poll.stop };
  }

  // A stacked bar of status-code classes, with exact counts in the tooltip.
  function codesBar(codes) {
    const cls = { 2: 0, 3: 0, 4: 0, 5: 0 };
    let total = 0;
    Object.entries(codes || {}).forEach(([code, n]) => {
      const c = Math.floor(Number(code) / 100);
      if (cls[c] != null) cls[c] += n;
      total += n;
    });
    if (!total) return '<span class="muted">—</span>';
    const title = Object.entries(codes).sort().map(([c, n]) => `${c}: ${n}`).join(', ');
    const parts = [2, 3, 4, 5].filter((c) => cls[c]).map((c) => `<span class="c${c}" style="width:${(cls[c] / total * 100).toFixed(2)}%"></span>`).join('');
    return `<span class="codes" title="${esc(title)}">${parts}</span>`;
  }

  // Runs `fn` now and every POLL_MS; never two at once, stops on unmount.
  function poller(fn, onError) {
    let timer = null, stopped = false, running = false;
    async function tick() {
      clearTimeout(timer);
      if (stopped || running) return;
      running = true;
      try { await fn(); } catch (e) { if (onError) onError(e); }
      running = false;
      if (!stopped) timer = setTimeout(tick, POLL_MS);
    }
    tick();
    return { now: tick, stop() { stopped = true; clearTimeout(timer); } };
  }

  // ---------------------------------------------------------------------------
  // Page: one workload

  function WorkloadPage(view, name) {
    view.innerHTML = `
      <div class="page-head"><h1>${esc(name)}</h1><span class="sub" id="wl-role"></span>
        <div class="actions"><a class="btn" href="#/tap?to=${encodeURIComponent(name)}">Tap inbound</a>
        <a class="btn" href="#/tap?from=${encodeURIComponent(name)}">Tap outbound</a></div></div>
      <div class="metrics" id="golden"></div>
      <div class="card">
        <div class="card-h"><h2>Routes</h2><span class="meta" id="routes-meta"></span></div>
        <div class="table-wrap"><table class="data" id="routes">
          <thead><tr><th>Route</th><th>Method</th><th class="num">RPS</th><th class="num">Success</th><th class="num">p50</th>
          <th class="num">p95</th><th class="num">p99</th><th class="num">Requests</th><th>RPS, last 10 min</th></tr></thead>
          <tbody><tr><td colspan="9" class="empty">Loading…</td></tr></tbody></table></div>
      </div>
      <div class="two-col">
        <div class="card"><div class="card-h"><h2>Inbound</h2><span class="meta">who calls ${esc(name)}</span></div><div id="wl-in"></div></div>
        <div class="card"><div class="card-h"><h2>Outbound</h2><span class="meta">what ${esc(name)} calls</span></div><div id="wl-out"></div></div>
      </div>`;
    let stat = null; // this workload's /api/stat entry, or null if it serves nothing

    const poll = poller(async () => {
      const [statRes, routesRes] = await Promise.all([
        api('stat', { window: state.window }),
        api('routes', { workload: name, window: state.window }).catch((e) => (e.status === 404 ? null : Promise.reject(e))),
      ]);
      stat = (statRes.workloads || []).find((w) => w.name === name) || null;
      renderGolden();
      renderRoutes(routesRes);
    }, (e) => setHTML($('#routes tbody', view), `<tr><td colspan="9" class="empty">${esc(e.message)}</td></tr>`));

    // Golden metrics: the workload as a server (from /api/stat); for a
    // client-only workload, its outbound requests (from the topology).
    function renderGolden() {
      const node = state.topology && (state.topology.nodes || []).find((n) => n.name === name);
      let s = null, hist = [], role;
      if (stat) {
        s = stat.window; hist = stat.history || []; role = 'server · inbound requests';
      } else if (node && node.inbound) {
        s = node.inbound; hist = node.history || []; role = 'server · inbound requests';
      } else if (node && node.outbound) {
        s = node.outbound; role = 'client only · outbound requests';
        hist = mergeHistories(state.topology.edges.filter((e) => e.src === name).map((e) => e.history || []));
      } else {
        role = state.topology ? 'not seen in the current data' : '';
      }
      $('#wl-role', view).textContent = role + (state.topology ? ` · window ${state.window}` : '');
      const h = health(s);
      const card = (k, v, unit, cls, spark, foot) => `<div class="card metric"><div class="k">${k}</div>` +
        `<div class="v ${cls || ''}">${esc(v)}${unit ? `<small>${unit}</small>` : ''}</div>${spark || ''}` +
        `<div class="foot">${foot || '&nbsp;'}</div></div>`;
      const msParts = (v) => { const t = fmtMs(v); return t === '—' ? ['—', ''] : t.split(' '); };
      const [p50, p50u] = msParts(lat(s, 'p50_ms'));
      const [p95, p95u] = msParts(lat(s, 'p95_ms'));
      const [p99, p99u] = msParts(lat(s, 'p99_ms'));
      const sw = { width: 220, height: 34 };
      setHTML($('#golden', view),
        card('Requests / s', fmtRps(s && s.rps), 'rps', '', sparkline(hist, 'rps', sw),
          s ? `${fmtInt(s.requests)} requests in ${esc(state.window)}` : '') +
        card('Success rate', fmtPct(s && s.success_rate), '', s && s.requests ? h : '',
          sparkline(hist, 'success_rate', Object.assign({ color: healthColor(h === 'idle' ? 'ok' : h) }, sw)),
          s ? `${fmtInt(s.failures)} failures (5xx)` : '') +
        card('Latency p50', p50, p50u, '', sparkline(hist, 'p50_ms', Object.assign({ color: cssVar('--server') }, sw))) +
        card('Latency p95', p95, p95u, '', '', lat(s, 'max_ms') != null ? `max ${fmtMs(lat(s, 'max_ms'))}` : '') +
        card('Latency p99', p99, p99u, '', sparkline(hist, 'p99_ms', Object.assign({ color: cssVar('--client') }, sw))));
    }

    function renderRoutes(res) {
      if (!res) {
        $('#routes-meta', view).textContent = '';
        setHTML($('#routes tbody', view), `<tr><td colspan="9" class="empty">${esc(name)} serves no HTTP routes that the tracer has seen.</td></tr>`);
        return;
      }
      $('#routes-meta', view).textContent = `${res.routes.length} routes · window ${res.window}`;
      const routes = res.routes.slice().sort((a, b) => byName(a.route, b.route) || byName(a.method, b.method));
      const rows = routes.map((r) => {
        const s = r.window;
        return `<tr data-route="${esc(r.route)}" data-method="${esc(r.method)}"><td class="mono">${esc(r.route)}</td><td>${esc(r.method)}</td>` +
          numCell(fmtRps(s.rps), s.rps) + srCell(s) +
          numCell(fmtMs(lat(s, 'p50_ms')), lat(s, 'p50_ms')) +
          numCell(fmtMs(lat(s, 'p95_ms')), lat(s, 'p95_ms')) +
          numCell(fmtMs(lat(s, 'p99_ms')), lat(s, 'p99_ms')) +
          numCell(fmtInt(r.requests), r.requests) +
          `<td class="spark-cell">${sparkline(r.history, 'rps', { color: healthColor(health(s) === 'idle' ? 'idle' : health(s)) })}</td></tr>`;
      }).join('');
      setHTML($('#routes tbody', view), rows || '<tr><td colspan="9" class="empty">No routes yet.</td></tr>');
    }

    function renderEdges(topo) {
      const edges = topo.edges || [];
      setHTML($('#wl-in', view), peerTable(sortEdges(edges.filter((e) => e.dst === name)), 'in', true));
      setHTML($('#wl-out', view), peerTable(sortEdges(edges.filter((e) => e.src === name)), 'out', true));
    }

    function onSnapshot(topo) {
      renderEdges(topo);
      renderGolden();
    }
    if (state.topology) onSnapshot(state.topology);
    return { onSnapshot, onWindow: poll.now, unmount: poll.stop };
  }

  // Sum several edges' histories slot by slot (for a client-only workload).
  function mergeHistories(hs) {
    const by = new Map();
    hs.forEach((h) => h.forEach((p) => {
      const m = by.get(p.t) || { t: p.t, requests: 0, failures: 0, rps: 0, p50_ms: null, p99_ms: null };
      m.requests += p.requests; m.failures += p.failures; m.rps += p.rps;
      // Quantiles do not add up; the worst edge's is an honest upper bound.
      if (p.p50_ms != null) m.p50_ms = Math.max(m.p50_ms || 0, p.p50_ms);
      if (p.p99_ms != null) m.p99_ms = Math.max(m.p99_ms || 0, p.p99_ms);
      by.set(p.t, m);
    }));
    return Array.from(by.values()).sort((a, b) => a.t - b.t).map((m) =>
      Object.assign(m, { success_rate: m.requests ? (m.requests - m.failures) / m.requests : 1 }));
  }

  // ---------------------------------------------------------------------------
  // Page: tap (live request stream)

  const TAP_FILTERS = ['to', 'from', 'path', 'method'];

  function TapPage(view, params) {
    const methods = ['', 'GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS'];
    view.innerHTML = `
      <div class="page-head"><h1>Tap</h1><span class="sub">live requests as the tracer sees them, newest first</span></div>
      <div class="card">
        <form class="tap-form" id="tap-form" autocomplete="off">
          <div class="field"><label for="f-to">To workload</label><input id="f-to" name="to" list="wl-names" placeholder="any"></div>
          <div class="field"><label for="f-from">From workload</label><input id="f-from" name="from" list="wl-names" placeholder="any"></div>
          <div class="field"><label for="f-path">Path prefix</label><input id="f-path" name="path" placeholder="/"></div>
          <div class="field"><label for="f-method">Method</label><select id="f-method" name="method">
            ${methods.map((m) => `<option value="${m}">${m || 'any'}</option>`).join('')}</select></div>
          <button class="btn primary" type="submit" id="tap-start">Start</button>
          <button class="btn" type="button" id="tap-stop">Stop</button>
          <button class="btn" type="button" id="tap-clear">Clear</button>
          <div class="tap-stats">
            <span class="pill" id="tap-state">stopped</span>
            <span>received <b id="tap-count">0</b></span>
            <span>dropped <b id="tap-dropped">0</b></span>
          </div>
          <datalist id="wl-names"></datalist>
        </form>
        <div class="tap-scroll"><table class="data" id="tap">
          <thead><tr><th>Time</th><th>Source</th><th>Destination</th><th>Method</th><th>Path</th>
          <th class="num">Status</th><th class="num">Latency</th><th>Trace</th></tr></thead>
          <tbody></tbody></table></div>
      </div>`;
    const form = $('#tap-form', view);
    const tbody = $('#tap tbody', view);
    let stream = null, received = 0, dropped = 0, pending = [], flushTimer = null;

    TAP_FILTERS.forEach((k) => { if (params.get(k)) form.elements[k].value = params.get(k); });
    fillNames(state.topology);

    function filters() {
      const f = {};
      TAP_FILTERS.forEach((k) => { const v = form.elements[k].value.trim(); if (v) f[k] = v; });
      return f;
    }

    function setState(s, text) {
      const el = $('#tap-state', view);
      el.className = 'pill ' + s;
      el.textContent = text;
    }

    function start() {
      stop();
      const f = filters();
      // Keep the filters in the URL (without a hashchange) so the view can be shared.
      const qs = new URLSearchParams(f).toString();
      history.replaceState(null, '', '#/tap' + (qs ? '?' + qs : ''));
      stream = openStream(apiUrl('tap', f), {
        request: (ev) => { received++; pending.push(ev); scheduleFlush(); },
        // Each event reports how many requests the daemon skipped for us since its last report.
        dropped: (d) => { dropped += Number(d.dropped) || 0; scheduleFlush(); },
      }, (s) => {
        if (s === 'open') { reachability.ok('tap'); setState('live', 'live'); } else { reachability.fail('tap'); setState('err', 'reconnecting'); }
      });
      setState('', 'connecting');
    }

    function stop() {
      if (stream) { stream.close(); stream = null; }
      reachability.ok('tap');
      setState('', 'stopped');
    }

    // Rows are added in batches: a busy server can send thousands of events a
    // second, and one DOM update per event would freeze the page.
    function scheduleFlush() {
      if (!flushTimer) flushTimer = setTimeout(flush, 100);
    }

    function flush() {
      flushTimer = null;
      const batch = pending.slice(-TAP_MAX_ROWS);
      pending = [];
      if (batch.length) {
        const frag = document.createElement('tbody');
        frag.innerHTML = batch.reverse().map(tapRow).join('');
        tbody.prepend(...frag.children);
        while (tbody.rows.length > TAP_MAX_ROWS) tbody.deleteRow(-1);
      }
      $('#tap-count', view).textContent = String(received);
      $('#tap-dropped', view).textContent = String(dropped);
    }

    form.addEventListener('submit', (ev) => { ev.preventDefault(); start(); });
    $('#tap-stop', view).addEventListener('click', stop);
    $('#tap-clear', view).addEventListener('click', () => {
      tbody.innerHTML = ''; received = 0; dropped = 0; pending = []; flush();
    });
    tbody.addEventListener('click', (ev) => {
      const tr = ev.target.closest('tr');
      if (tr && tr.dataset.trace && !ev.target.closest('a')) location.hash = '#/trace/' + tr.dataset.trace;
    });

    function fillNames(topo) {
      if (!topo) return;
      const html = (topo.nodes || []).map((n) => `<option value="${esc(n.name)}">`).join('');
      setHTML($('#wl-names', view), html);
    }

    start(); // tap runs as soon as the page opens, with the filters from the URL
    return {
      onSnapshot: fillNames,
      unmount() { stop(); clearTimeout(flushTimer); },
    };
  }

  function tapRow(e) {
    const trace = e.trace_id && /^[0-9a-f]{32}$/i.test(e.trace_id) ? e.trace_id : null;
    const status = e.status == null ? '—' : e.status;
    return `<tr class="tap-row" data-status="${esc(status)}"${trace ? ` data-trace="${trace}"` : ''}>` +
      `<td class="time">${fmtClock(e.ts_ms)}</td>` +
      `<td class="name">${esc(e.src)}</td><td class="name" title="${esc(e.dst_addr)}">${esc(e.dst)}</td>` +
      `<td>${esc(e.method)}</td><td class="path" title="route ${esc(e.route)} · seen by the ${esc(e.observer)}">${esc(e.path)}</td>` +
      `<td class="num"><span class="status ${statusClass(e.status)}">${esc(status)}</span></td>` +
      numCell(fmtMs(e.latency_ms), e.latency_ms) +
      `<td>${trace ? `<a href="#/trace/${trace}">${trace.slice(0, 8)}…</a>` : '<span class="muted">—</span>'}</td></tr>`;
  }

  // ---------------------------------------------------------------------------
  // Page: one trace, as a waterfall

  function TracePage(view, traceId) {
    view.innerHTML = `
      <div class="page-head"><h1>Trace</h1><span class="sub mono">${esc(traceId)}</span>
        <div class="actions"><button class="btn" id="tr-refresh">Refresh</button><a class="btn" href="#/tap">Back to tap</a></div></div>
      <div class="card"><div class="card-h"><h2>Spans</h2><span class="meta" id="tr-meta"></span></div>
      <div id="wf"><div class="empty">Loading…</div></div></div>`;
    let open = new Set();
    let spans = [];

    async function load() {
      try {
        const res = await api('spans', { trace_id: traceId, limit: 500 });
        spans = (res.spans || []).filter((s) => !s.trace_id || s.trace_id.toLowerCase() === traceId.toLowerCase());
        render();
      } catch (e) {
        $('#wf', view).innerHTML = `<div class="empty">${esc(e.message)}</div>`;
      }
    }

    function render() {
      if (!spans.length) {
        $('#tr-meta', view).textContent = '';
        $('#wf', view).innerHTML = '<div class="empty">No spans for this trace (yet). The daemon keeps recent spans only; a span is recorded once its request has finished.</div>';
        return;
      }
      const rows = waterfallOrder(spans);
      const t0 = Math.min(...spans.map((s) => s.start_unix_nano));
      const t1 = Math.max(...spans.map((s) => s.start_unix_nano + s.duration_ms * 1e6));
      const total = Math.max(t1 - t0, 1);
      const services = new Set(spans.map((s) => s.service));
      $('#tr-meta', view).textContent = `${spans.length} spans · ${services.size} services · ${fmtMs(total / 1e6)} · started ${fmtClock(t0 / 1e6)}`;
      let html = '<div class="wf"><div class="wf-row head"><div class="wf-name">Service · operation</div><div class="wf-track">' +
        ticks(total).map(([pct, label]) => `<div class="wf-tick" style="left:${pct}%"><span>${label}</span></div>`).join('') + '</div></div>';
      rows.forEach(({ span: s, depth }) => {
        const left = ((s.start_unix_nano - t0) / total) * 100;
        const width = Math.max((s.duration_ms * 1e6 / total) * 100, 0.2);
        // The duration label goes right of the bar; if the bar ends near the
        // right edge, inside the bar when it is wide, else left of it.
        let durPos = `left:${(left + width + 0.5).toFixed(2)}%`, durCls = '';
        if (left + width > 80) {
          if (width > 20) { durPos = `right:${(100 - left - width + 0.5).toFixed(2)}%`; durCls = ' inside'; }
          else durPos = `right:${(100 - left + 0.5).toFixed(2)}%`;
        }
        html += `<div class="wf-row" data-span="${esc(s.span_id)}">` +
          `<div class="wf-name" style="padding-left:${10 + depth * 18}px" title="${esc(s.service)} ${esc(s.name)}">` +
          `<span class="kind ${esc(s.kind)}">${esc(s.kind)}</span><span class="svc">${esc(s.service)}</span><span class="op">${esc(s.name)}</span></div>` +
          `<div class="wf-track"><div class="wf-bar ${esc(s.kind)}${s.error ? ' error' : ''}" style="left:${left.toFixed(3)}%;width:${width.toFixed(3)}%"></div>` +
          `<span class="wf-dur${durCls}" style="${durPos}">${fmtMs(s.duration_ms)}${s.status_code ? ' · ' + esc(s.status_code) : ''}</span></div>` +
          (open.has(s.span_id) ? spanDetail(s) : '') + '</div>';
      });
      $('#wf', view).innerHTML = html + '</div>';
    }

    $('#wf', view).addEventListener('click', (ev) => {
      const row = ev.target.closest('.wf-row[data-span]');
      if (!row || ev.target.closest('.wf-detail')) return;
      const id = row.dataset.span;
      if (open.has(id)) open.delete(id); else open.add(id);
      render();
    });
    $('#tr-refresh', view).addEventListener('click', load);
    load();
    return {};
  }

  // Depth-first from the roots (spans whose parent is absent), children by start time.
  function waterfallOrder(spans) {
    const ids = new Set(spans.map((s) => s.span_id));
    const kids = new Map();
    const roots = [];
    spans.forEach((s) => {
      if (s.parent_span_id && ids.has(s.parent_span_id) && s.parent_span_id !== s.span_id) {
        if (!kids.has(s.parent_span_id)) kids.set(s.parent_span_id, []);
        kids.get(s.parent_span_id).push(s);
      } else roots.push(s);
    });
    const byStart = (a, b) => a.start_unix_nano - b.start_unix_nano;
    const out = [];
    const seen = new Set();
    (function walk(list, depth) {
      list.sort(byStart).forEach((s) => {
        if (seen.has(s.span_id)) return; // guards against a parent cycle in bad data
        seen.add(s.span_id);
        out.push({ span: s, depth });
        walk(kids.get(s.span_id) || [], depth + 1);
      });
    })(roots, 0);
    return out;
  }

  // Four or five round-numbered ticks across the trace's duration (ns).
  function ticks(totalNs) {
    const totalMs = totalNs / 1e6;
    const raw = totalMs / 4;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = 0; v <= totalMs + 1e-9; v += step) out.push([(v / totalMs) * 100, v === 0 ? '0' : fmtMs(v)]);
    return out.filter(([p]) => p <= 96);
  }

  function spanDetail(s) {
    const kv = [
      ['span id', s.span_id], ['parent', s.parent_span_id || '—'], ['kind', s.kind], ['status', s.status_code],
      ['service', s.service], ['pid', s.pid], ['server', s.server], ['client', s.client],
      ['start', fmtClock(s.start_unix_nano / 1e6)], ['duration', fmtMs(s.duration_ms)],
      ['error', String(!!s.error)], ['sampled', String(!!s.sampled)],
    ];
    return `<div class="wf-detail"><dl>${kv.map(([k, v]) => `<dt>${k}</dt><dd>${esc(v == null ? '—' : v)}</dd>`).join('')}</dl></div>`;
  }

  // ---------------------------------------------------------------------------
  // Router

  function NotFoundPage(view) {
    view.innerHTML = '<div class="card"><div class="empty">No such page. <a href="#/">Back to the topology</a>.</div></div>';
    return {};
  }

  function parseHash() {
    const h = location.hash.replace(/^#/, '') || '/';
    const i = h.indexOf('?');
    const path = i < 0 ? h : h.slice(0, i);
    const params = new URLSearchParams(i < 0 ? '' : h.slice(i + 1));
    return { path, params };
  }

  function route() {
    const { path, params } = parseHash();
    if (state.page && state.page.unmount) state.page.unmount();
    state.page = null;
    // A window in the link (e.g. #/?window=10s) wins over the remembered one.
    if (WINDOWS.includes(params.get('window'))) setWindow(params.get('window'));
    // Each page renders into a fresh element: an answer that arrives after the
    // user moved on then updates a detached node instead of the new page.
    const view = document.createElement('div');
    view.className = 'page';
    $('#view').replaceChildren(view);
    let m, nav;
    if (path === '/' || path === '') { state.page = TopologyPage(view); nav = 'topology'; }
    else if (path === '/workloads') { state.page = WorkloadsPage(view); nav = 'workloads'; }
    else if ((m = path.match(/^\/workload\/(.+)$/))) { state.page = WorkloadPage(view, safeDecode(m[1])); nav = 'workloads'; }
    else if (path === '/tap') { state.page = TapPage(view, params); nav = 'tap'; }
    else if ((m = path.match(/^\/trace\/([0-9a-fA-F]+)$/))) { state.page = TracePage(view, m[1]); nav = 'tap'; }
    else state.page = NotFoundPage(view);
    $$('.nav a').forEach((a) => a.classList.toggle('active', a.dataset.nav === nav));
    window.scrollTo(0, 0);
  }

  function safeDecode(s) {
    try { return decodeURIComponent(s); } catch (e) { return s; }
  }

  function init() {
    window.tracer = { state, cy: null };
    renderWindowSelect();
    $('#window-select').addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-window]');
      if (b) setWindow(b.dataset.window);
    });
    window.addEventListener('hashchange', route);
    startSnapshotStream();
    pollStatus();
    setInterval(pollStatus, STATUS_POLL_MS);
    route();
  }

  init();
})();
