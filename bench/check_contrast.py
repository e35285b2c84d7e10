"""WCAG 2.1 text contrast of the annotation screens, measured in a real browser (Debian's chromium).

    python bench/check_contrast.py --json results/contrast.json

Starts the app (offline preset, bundled demo KB, password login) on 127.0.0.1 with a demo project,
opens the Annotate and Link tabs in light and in dark colour scheme at 1366x768, and for every
visible element that holds text computes the contrast ratio of its computed text colour against
its effective background (the first ancestor with an opaque background colour; alpha blended over
white or the dark page). AA asks for 4.5:1, or 3:1 for large text (24 px, or 18.66 px bold).
Prints the lowest ratios and every failure; exits 1 when anything fails AA.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("MEL_CHROMIUM", "/usr/bin/chromium")
USERS = {"contrast": "contrast-password-1"}  # a throwaway account of this run's own app

# In the page: every visible element with its own text, its colour and its effective background.
MEASURE_JS = r"""
(root) => {
  const parse = (c) => { const m = c.match(/rgba?\(([^)]+)\)/); if (!m) return null;
    const v = m[1].split(/[ ,\/]+/).filter(Boolean).map(Number); return [v[0], v[1], v[2], v.length > 3 ? v[3] : 1]; };
  const blend = (top, under) => { const a = top[3];
    return [0, 1, 2].map(i => top[i] * a + under[i] * (1 - a)).concat([1]); };
  const lum = (c) => { const f = (x) => { x /= 255; return x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  const pageBg = (() => { const b = parse(getComputedStyle(document.body).backgroundColor);
    return b && b[3] > 0 ? blend(b, [255, 255, 255, 1]) : [255, 255, 255, 1]; })();
  const background = (el) => { const layers = [];
    for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
      const b = parse(getComputedStyle(e).backgroundColor);
      if (b && b[3] > 0) { layers.push(b); if (b[3] >= 1) break; } }
    let bg = pageBg; for (let i = layers.length - 1; i >= 0; i--) bg = blend(layers[i], bg); return bg; };
  const out = [];
  for (const el of root.querySelectorAll('*')) {
    const own = [...el.childNodes].filter(n => n.nodeType === 3 && n.textContent.trim()).map(n => n.textContent.trim()).join(' ');
    if (!own) continue;
    const st = getComputedStyle(el), r = el.getBoundingClientRect();
    if (st.visibility === 'hidden' || st.display === 'none' || r.width === 0 || r.height === 0 || el.closest('[hidden]')) continue;
    if (parseFloat(st.opacity) === 0) continue;
    const bg = background(el), fg = blend(parse(st.color), bg);
    const l1 = lum(fg), l2 = lum(bg), ratio = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
    const size = parseFloat(st.fontSize), bold = parseInt(st.fontWeight, 10) >= 700;
    const large = size >= 24 || (bold && size >= 18.66);
    out.push({text: own.slice(0, 60), tag: el.tagName.toLowerCase(), cls: String(el.className).slice(0, 60),
              ratio: Math.round(ratio * 100) / 100, needed: large ? 3 : 4.5, size});
  }
  return out;
}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the measurements here (e.g. results/contrast.json)")
    args = p.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install chromium (see the Makefile's browser target)")
    from playwright.sync_api import sync_playwright

    from mel.linkers import build_linker
    if __package__:  # python -m bench.check_contrast, or imported as bench.check_contrast
        from .app_server import launch_in_process, make_demo_project
    else:  # python bench/check_contrast.py: bench/ itself is sys.path[0]
        from app_server import launch_in_process, make_demo_project

    data = Path(tempfile.mkdtemp(prefix="mel-contrast-"))
    app = launch_in_process(data / "app", users=USERS)
    svc = app.service

    def linkers(project):  # BM25 in the GEMEL slot: seconds instead of minutes; colours do not depend on it
        return {"gemel": build_linker("bm25", svc.kb, svc.preset), "dim": svc.project_linkers(project)["dim"]}
    make_demo_project(svc, "contrast", n=4, linkers=linkers, folder=data / "tasks")
    report: dict = {"command": "python bench/check_contrast.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "viewport": "1366x768", "screens": {}}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            for scheme in ("light", "dark"):
                page = browser.new_page(viewport={"width": 1366, "height": 768}, color_scheme=scheme)
                page.set_default_timeout(60_000)
                page.goto(app.url + ("?__theme=dark" if scheme == "dark" else "?__theme=light"), wait_until="load")
                page.locator("input[type=text]").first.fill("contrast")
                page.locator("input[type=password]").first.fill(USERS["contrast"])
                page.keyboard.press("Enter")
                page.wait_for_selector("#mel-q-view[data-state=task]")
                page.wait_for_timeout(500)
                report["screens"][f"annotate-{scheme}"] = page.evaluate(MEASURE_JS, page.locator("body").element_handle())
                page.get_by_role("tab", name="Link").click()
                page.wait_for_timeout(800)
                report["screens"][f"link-{scheme}"] = page.evaluate(MEASURE_JS, page.locator("body").element_handle())
                page.close()
            browser.close()
    finally:
        app.close()
    failures = 0
    for screen, rows in report["screens"].items():
        bad = [r for r in rows if r["ratio"] < r["needed"]]
        failures += len(bad)
        lowest = min(rows, key=lambda r: r["ratio"] / r["needed"]) if rows else None
        print(f"{screen}: {len(rows)} text elements, {len(bad)} below AA"
              + (f"; lowest {lowest['ratio']}:1 (needs {lowest['needed']}) {lowest['text']!r}" if lowest else ""))
        for r in bad[:15]:
            print(f"   {r['ratio']}:1 < {r['needed']}  <{r['tag']} class={r['cls']!r}> {r['text']!r}")
    report["failures"] = failures
    if args.json:
        from mel.bench import save_json
        save_json(args.json, report)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
