// The Link tab's keyboard shortcuts (demo/ui.py); only while that tab is on screen, never while
// typing in a text box. The Annotate tab has its own (queue.js).
(() => {
  if (window.__melShortcuts) return;  // Gradio may insert the head twice
  window.__melShortcuts = true;
  const press = (id) => {
    const el = document.getElementById(id);
    const button = el && (el.tagName === 'BUTTON' ? el : el.querySelector('button'));
    if (button && !button.disabled) { button.click(); return true; }
    return false;
  };
  const linkTabShown = () => { const c = document.getElementById('mel-caption'); return c && c.offsetParent !== null; };
  const keys = {g: 'mel-accept-gemel', d: 'mel-accept-dim', n: 'mel-nil', s: 'mel-skip', u: 'mel-undo'};
  document.addEventListener('keydown', (e) => {
    if (!linkTabShown()) return;
    const t = e.target;
    const typing = t && (t.tagName === 'TEXTAREA' || t.isContentEditable ||
                         (t.tagName === 'INPUT' && !['radio', 'checkbox', 'button'].includes(t.type)));
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { if (press('mel-link')) e.preventDefault(); return; }
    if (e.key === 'Escape' && t && t.closest && t.closest('#mel-search')) {  // back to the keys, as in Annotate
      t.blur(); e.preventDefault(); return;
    }
    if (e.key === 'Enter' && t && t.type === 'radio' && t.closest && t.closest('#mel-search-results')) {
      if (!t.checked) t.click();  // Enter on a result (reached with Tab / arrows) links to it
      setTimeout(() => press('mel-pick'), 0);
      e.preventDefault(); return;
    }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    if (keys[e.key] && press(keys[e.key])) { e.preventDefault(); return; }
    if (e.key === '/') {
      const box = document.querySelector('#mel-search textarea, #mel-search input');
      if (box) { box.focus(); e.preventDefault(); }
      return;
    }
    if (/^[0-9]$/.test(e.key)) {  // choose DIM candidate N (1-9; 0 is the 10th), as its label says
      const radios = document.querySelectorAll('#mel-dim-choice input[type=radio]');
      const r = radios[e.key === '0' ? 9 : Number(e.key) - 1];
      if (r) { r.click(); e.preventDefault(); }
    }
  });
})();
// The DIM table's p column has a short header ("p (uncal.)", demo/render.py P_HEADERS): pointing at it
// shows what the legend above the table says in full (calibrated or not, and how it was computed).
(() => {
  if (window.__melPHeader) return;
  window.__melPHeader = true;
  document.addEventListener('mouseover', (e) => {
    const th = e.target instanceof Element && e.target.closest('#mel-dim th');
    const legend = document.querySelector('#mel-p-legend');
    if (!th || !legend || !th.textContent.trim().startsWith('p\u00a0(')) return;
    const label = legend.querySelector('.mel-p-label');
    const full = (label && label.title) || legend.textContent.trim();
    for (const el of [th, ...th.querySelectorAll('[title]')]) el.title = full;
  });
})();
