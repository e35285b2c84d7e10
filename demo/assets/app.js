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
    // Ctrl+Enter links from wherever the annotator is; the caret then leaves the text box, so the
    // next key is a decision (g, d, 1-9 ...) and not a letter typed over the selected mention.
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      if (press('mel-link')) { e.preventDefault(); if (typing) t.blur(); }
      return;
    }
    if (e.key === 'Escape' && typing) {  // back to the keys from any text box, as in Annotate
      t.blur(); e.preventDefault(); return;
    }
    if (e.key === 'ArrowDown' && typing && t.closest('#mel-search')) {  // to the results, as in Annotate
      const first = document.querySelector('#mel-search-results input[type=radio]');
      if (first) { first.focus(); e.preventDefault(); }
      return;
    }
    // ↓ / ↑ among the results: Gradio names each radio apart, so the browser's own arrows stay on one
    if ((e.key === 'ArrowDown' || e.key === 'ArrowUp') && t && t.type === 'radio' && t.closest('#mel-search-results')) {
      const radios = [...document.querySelectorAll('#mel-search-results input[type=radio]')];
      const next = radios[radios.indexOf(t) + (e.key === 'ArrowDown' ? 1 : -1)];
      if (next) next.focus();
      e.preventDefault(); return;
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
// Gradio's Textbox sends its .input event on key presses only: a paste, cut, drop, Backspace or Delete
// in the caption or the mention box changed the text and left the offsets where they were (the
// mention "bar" with the offsets of "Collins"). Such an edit is passed on as the key press Gradio
// listens to, after the box has taken the new text; a typed character has sent one already.
(() => {
  if (window.__melEditsAsInput) return;
  window.__melEditsAsInput = true;
  let lastKeyPress = -1;
  document.addEventListener('keypress', (e) => { if (e.isTrusted) lastKeyPress = e.timeStamp; }, true);
  document.addEventListener('input', (e) => {
    const t = e.target;
    if (!(t instanceof Element) || !t.closest('#mel-caption, #mel-mention')) return;
    if (e.inputType === 'insertText' && e.timeStamp - lastKeyPress < 100) return;  // sent by its key press
    t.dispatchEvent(new KeyboardEvent('keypress', {bubbles: true}));
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
// A file that is not an image, dropped on the Link tab's image (or chosen for it), is dropped by
// Gradio's upload without a word, and the status line kept whatever it said before. Say it there, as
// the server says it for an upload it refuses; the next drop, upload or link takes the message away.
(() => {
  if (window.__melImageCheck) return;
  window.__melImageCheck = true;
  const MESSAGE_ID = 'mel-drop-refused';
  const clear = () => { const old = document.getElementById(MESSAGE_ID); if (old) old.remove(); };
  const check = (files) => {
    clear();
    const list = [...(files || [])];
    const status = document.getElementById('mel-link-status');
    if (!status || !list.length || list.some((f) => f.type.startsWith('image/'))) return;
    for (const earlier of status.querySelectorAll('.mel-refusal')) earlier.style.display = 'none';
    const f = list[0];
    const div = document.createElement('div');
    div.id = MESSAGE_ID;
    div.className = 'mel-refusal mel-error';
    div.setAttribute('role', 'alert');
    div.textContent = `${f.name} is not an image (${f.type || 'unknown type'}): upload a photo in ` +
      `${window.__melImageFormats || 'JPEG or PNG'} format (your caption and mention are kept)`;
    status.appendChild(div);
    div.scrollIntoView({block: 'nearest'});  // the status line is below the Link button: off screen at 768 px
  };
  // the server's refusal of an upload (a file PIL cannot read) is brought on screen the same way (a
  // second refusal in a row is the same element with a new data-n)
  let shown = '';
  new MutationObserver(() => {
    const refusal = document.getElementById('mel-upload-refused');
    const n = refusal ? refusal.dataset.n || '' : '';
    if (refusal && n !== shown) { shown = n; refusal.scrollIntoView({block: 'nearest'}); }
  }).observe(document.documentElement, {childList: true, subtree: true, attributes: true, attributeFilter: ['data-n']});
  const inImage = (t) => t instanceof Element && t.closest('#mel-image');
  document.addEventListener('drop', (e) => { if (inImage(e.target)) check(e.dataTransfer && e.dataTransfer.files); }, true);
  document.addEventListener('change', (e) => {
    if (inImage(e.target) && e.target.type === 'file') check(e.target.files);
  }, true);
  document.addEventListener('click', (e) => {
    if (e.target instanceof Element && e.target.closest('#mel-link')) clear();
  }, true);
})();
