// The Annotate tab's keys and clicks (demo/queue_ui.py). One path for everything: read what is on
// screen (#mel-q-view's data-* attributes: task id, prediction ids, entities), add a fresh token
// per key press, send one JSON command through the hidden #mel-q-go button, and ignore further
// keys until the answer (carrying the same token in data-nonce) is on screen.
// Shortcuts never fire while a text field has focus, and never type into one.
(() => {
  if (window.melQueue) return;  // Gradio may insert the head twice
  const Q = window.melQueue = {
    loading: false, pending: null, keyAt: 0, log: [], sent: [], ignored: 0, timeoutMs: 30000,
  };
  const view = () => document.getElementById('mel-q-view');
  const onScreen = () => { const v = view(); return v && v.offsetParent !== null ? v : null; };
  const typing = (t) => !!t && (t.tagName === 'TEXTAREA' || t.tagName === 'SELECT' || t.isContentEditable ||
    (t.tagName === 'INPUT' && !['radio', 'checkbox', 'button', 'submit', 'reset'].includes(t.type)));
  const uuid = () => {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  };
  const busy = (on) => {
    Q.loading = on;
    const box = document.getElementById('mel-q-task');  // (Gradio scopes the page's CSS: classes go on our elements)
    if (box) box.classList.toggle('mel-q-busy', on);
    clearTimeout(Q.timer);
    if (on) Q.timer = setTimeout(() => busy(false), Q.timeoutMs);  // the server never answered: let keys work
  };
  const field = (sel) => document.querySelector(`${sel} textarea, ${sel} input`);
  // empty a Gradio text box (its value is kept by the page's framework: tell it with an input event)
  const clearField = (box) => { box.value = ''; box.dispatchEvent(new Event('input', {bubbles: true})); };

  // what the page sends with the hidden button (its click event's js reads it)
  Q.take = () => JSON.stringify(Q.pending || {});
  Q.send = (cmd, at) => {
    const v = onScreen();
    if (!v) return false;
    if (Q.loading) { Q.ignored += 1; return false; }
    const d = v.dataset;
    let shown = [];
    try { shown = JSON.parse(d.predictionIds || '[]'); } catch (e) { shown = []; }
    const full = Object.assign({project: d.project, task_id: d.taskId, shown, token: uuid()}, cmd);
    const go = document.getElementById('mel-q-go');
    if (!go) return false;
    Q.pending = full;
    Q.keyAt = at === undefined ? performance.now() : at;
    Q.fromTask = d.taskId;
    Q.sent.push({token: full.token, action: full.action, task_id: full.task_id});
    busy(true);
    go.click();
    return true;
  };
  // tests only: send a command as given (no lock, no token added), e.g. a stale or repeated one
  Q.sendRaw = (cmd) => {
    Q.pending = cmd;
    Q.keyAt = performance.now();
    busy(true);
    document.getElementById('mel-q-go').click();
  };

  const helpBox = () => document.getElementById('mel-q-help');
  const helpOpen = () => !!helpBox() && helpBox().classList.contains('open');
  const help = (open) => { if (helpBox()) helpBox().classList.toggle('open', open); };

  Q.act = (action, opts, at) => {
    const v = onScreen();
    if (!v) return false;
    const d = v.dataset;
    opts = opts || {};
    switch (action) {
      case 'accept_gemel':
        return Q.send({action, entity_id: d.gemelEntity || '', prediction_id: d.gemelPrediction || null}, at);
      case 'accept_dim': {
        let ids = [];
        try { ids = JSON.parse(d.dimIds || '[]'); } catch (e) { ids = []; }
        const i = Number(opts.index);
        if (!(i >= 0 && i < ids.length)) return false;  // no such candidate on screen: nothing is sent
        return Q.send({action, entity_id: ids[i], prediction_id: d.dimPrediction || null}, at);
      }
      case 'search':
        if (opts.entity_id) return Q.send({action, entity_id: opts.entity_id}, at);
        { const box = field('#mel-q-search'); if (box) { box.focus(); box.select(); } }
        return true;
      case 'nil': case 'skip': case 'back': case 'forward':
        return Q.send({action}, at);
      case 'undo':
        return Q.send({action, undo_id: d.undoId || null}, at);
      case 'flag': {
        const box = field('#mel-q-comment');
        if (opts.comment !== undefined) {
          const sent = Q.send({action, comment: opts.comment}, at);
          if (sent && box && box.value === opts.comment) clearField(box);
          return sent;
        }
        if (box) { box.focus(); box.select(); }  // a new comment replaces the last one
        return true;
      }
      case 'help':
        help(!helpOpen());
        return true;
      default:
        return false;
    }
  };

  const KEYS = {g: 'accept_gemel', Enter: 'accept_gemel', n: 'nil', s: 'skip', u: 'undo', '/': 'search',
                h: 'help', '?': 'help', x: 'flag', ArrowLeft: 'back', ArrowRight: 'forward', b: 'back', f: 'forward'};

  document.addEventListener('keydown', (e) => {
    if (!onScreen() || e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const t = e.target;
    if (typing(t)) {  // in a text field: only Escape (leave it), Enter in the comment box (flag), and
      // Tab / ArrowDown from the search box to its results (the next field in the page is the comment box)
      if (e.key === 'Escape') { t.blur(); e.preventDefault(); return; }
      if (e.key === 'Enter' && t.closest('#mel-q-comment')) {
        e.preventDefault();
        const comment = t.value;
        if (comment.trim() && Q.act('flag', {comment}, e.timeStamp)) {
          clearField(t);  // sent: a later Enter here must not flag the next task with the same comment
          t.blur();
        }
      }
      if ((e.key === 'Tab' && !e.shiftKey || e.key === 'ArrowDown') && t.closest('#mel-q-search')) {
        const first = document.querySelector('#mel-q-found .mel-q-pick');
        if (first) { e.preventDefault(); first.focus(); first.scrollIntoView({block: 'nearest'}); }
      }
      return;
    }
    // Up / Down between the search results
    if ((e.key === 'ArrowDown' || e.key === 'ArrowUp') && t && t.closest && t.closest('#mel-q-found')) {
      const picks = Array.from(document.querySelectorAll('#mel-q-found .mel-q-pick'));
      const i = picks.indexOf(t.closest('.mel-q-pick'));
      const next = picks[i + (e.key === 'ArrowDown' ? 1 : -1)];
      if (next) { e.preventDefault(); next.focus(); next.scrollIntoView({block: 'nearest'}); }
      return;
    }
    if (e.key === 'Escape') { help(false); return; }
    // Enter on a focused button or result clicks it (the browser does that): not a shortcut then
    if (e.key === 'Enter' && t && t.closest && t.closest('button, a, [role=button], summary')) return;
    let action = KEYS[e.key];
    let opts;
    if (/^[0-9]$/.test(e.key)) { action = 'accept_dim'; opts = {index: (Number(e.key) + 9) % 10}; }
    if (!action) return;
    e.preventDefault();
    if (e.repeat && action !== 'help') { Q.ignored += 1; return; }  // a held key saves once
    Q.act(action, opts, e.timeStamp);
  });

  document.addEventListener('click', (e) => {
    const el = e.target.closest && e.target.closest('#mel-q-view [data-action], .mel-q-help [data-action], #mel-q-found [data-action]');
    if (!el || !onScreen()) return;
    e.preventDefault();
    Q.act(el.dataset.action, {index: el.dataset.index, entity_id: el.dataset.entityId}, e.timeStamp);
    if (el.blur) el.blur();
  });

  // The answer is on screen when #mel-q-view carries the token of the pending command.
  const seen = () => {
    const v = view();
    if (!v || !Q.pending || !Q.loading || v.dataset.nonce !== Q.pending.token) return;
    const dom = performance.now();
    const entry = {action: Q.pending.action, from: Q.fromTask, to: v.dataset.taskId, dom_ms: dom - Q.keyAt,
                   ok: !v.querySelector('.mel-q-ack.err')};
    busy(false);
    requestAnimationFrame(() => { entry.paint_ms = performance.now() - Q.keyAt; Q.log.push(entry); });
  };
  // KB search results arrive below the task: bring them on screen (a 768-pixel-high window hides them)
  let shownResults = null;
  const results = () => {
    const found = document.getElementById('mel-q-found');
    if (found && found !== shownResults && found.offsetParent !== null) {
      shownResults = found;
      found.scrollIntoView({block: 'nearest'});
    }
  };
  new MutationObserver(results).observe(document.documentElement, {childList: true, subtree: true});
  new MutationObserver(seen).observe(document.documentElement, {childList: true, subtree: true, attributes: true,
                                                                attributeFilter: ['data-nonce']});
})();
