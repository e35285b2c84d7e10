"""Start the MEL demo and annotation app: `python app.py` (also the Hugging Face Space entry point).

    python app.py                                   # demo KB + demo pool, preset auto, http://127.0.0.1:7860
    python app.py --kb data/wikimel.sqlite --pool data/wikimel-train.jsonl --preset offline
    python app.py --generator gemel                 # GEMEL as in the paper: generates over the whole KB
    MEL_AUTH="alice:secret,bob:pw2" MEL_ADMINS=alice python app.py --host 0.0.0.0

Who annotates:
  MEL_AUTH    "user:password,user2:password2": password login (never put passwords in the repo)
  OAuth       on a Space with `hf_oauth: true` in README front matter (and no MEL_AUTH): HF login
  neither     on 127.0.0.1: everyone is "local" (also admin); on a --share link or a --host other machines
              reach: linking only, no saving (--allow-anonymous: every visitor is "local"); on a Space:
              linking only, no saving
  MEL_ADMINS  comma-separated users who may export training data and manage projects in the app
The "Annotate" tab opens first when the database has annotation projects (python -m mel annotations
import ...; or the "Projects" tab, for admins).
Logins are rate-limited: after 5 failed logins to an account (or 20 from one address) within
5 minutes, that account (address) is refused for 30 s, twice as long at each repeat, up to 1 h.
Where data goes: --data-dir, else $MEL_DATA_DIR, else /data/mel on a Space with persistent
storage, else ./data/app.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time

STARTED = time.perf_counter()


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """MEL_AUTH="user:pass,user2:pass2" -> [(user, pass), ...]; a malformed entry is an error."""
    pairs = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            raise SystemExit("MEL_AUTH must look like 'user:password,user2:password2' (an entry has no user or "
                             "no password)")
        pairs.append((user.strip(), password))
    return pairs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MEL demo and annotation app (Gradio)")
    p.add_argument("--kb", help="a KB built with `python -m mel kb build` (default: the bundled demo KB)")
    p.add_argument("--pool", help="JSONL of Examples for GEMEL's demonstrations (default: the demo pool with the demo KB)")
    p.add_argument("--preset", default=os.environ.get("MEL_PRESET", "auto"), help="auto | offline | small | paper")
    p.add_argument("--device", default=None, help="override the preset's device: cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--data-dir", default=None, help="where annotations.sqlite and the uploaded images are kept")
    p.add_argument("--generator", default=os.environ.get("MEL_GENERATOR", "gemel+bm25"),
                   help="the generative linker (default gemel+bm25, or $MEL_GENERATOR: the LLM scores BM25's top 20, "
                        "more accurate with a small LLM; gemel: GEMEL as in the paper, generates over the whole KB; "
                        "gemel+dense, gemel+dim: the LLM over that linker's top 20; '' = off)")
    p.add_argument("--ranker", default="dim", help="the ranking linker (dim; dense/bm25 for a quick look)")
    p.add_argument("--opt", action="append", default=[],
                   help="linker option ROLE.key=value, ROLE = generator or ranker (e.g. generator.n_demos=8)")
    p.add_argument("--no-live-pool", action="store_true", help="corrections do not join the demonstration pool")
    p.add_argument("--nil", action="store_true",
                   help="a calibrated linker answers NIL when its best candidate's probability is below the "
                        "threshold chosen on train (models/calibration/<linker>@<kb>; mel calibrate)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--allow-anonymous", action="store_true",
                   help="without MEL_AUTH on a --host other machines reach (or with --share), let every visitor "
                        "annotate as 'local', who is also the admin (export, backup) and a reviewer; without this "
                        "flag annotation is off there")
    p.add_argument("--concurrency", type=int, default=4, help="requests handled at once (linking: always 1)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more are refused")
    p.add_argument("--threads", type=int, default=int(os.environ.get("MEL_THREADS", "0")) or None,
                   help="torch CPU threads (default: the library's choice). On a CPU shared with other jobs, "
                        "1 is often much faster: idle OpenMP threads spin while waiting for a busy core")
    return p.parse_args(argv)


def linker_options(items: list[str]) -> tuple[dict, dict]:
    from mel.linkers import option_value
    out = {"generator": {}, "ranker": {}}
    for item in items:
        key, sep, value = item.partition("=")
        role, dot, name = key.partition(".")
        if not sep or not dot or role not in out or not name:
            raise SystemExit(f"--opt {item!r}: expected ROLE.key=value with ROLE generator or ranker")
        out[role][name] = option_value(value)
    return out["generator"], out["ranker"]


def open_access(host: str, share: bool, on_space: bool, allow_anonymous: bool) -> tuple[str | None, str]:
    """Who annotates without a login ("local", who is also the admin, or None: nobody) and what to say.
    Only the person at the machine is "local": on a Space, a --share link or a --host other machines
    reach, anyone could otherwise download the annotation database, unless --allow-anonymous says so."""
    if on_space:
        return None, "annotation is off on this Space until a login is configured"
    reached = "--share" if share else None if _is_loopback(host) else f"--host {host}"
    if reached is None:
        return "local", "every correction is saved as annotator 'local' (set MEL_AUTH to log annotators in)"
    if allow_anonymous:
        return "local", (f"{reached} with --allow-anonymous: every visitor annotates as 'local', "
                         "who may also export and back up the annotation database")
    return None, (f"{reached} lets other machines in, so annotation, export and backup are off: set MEL_AUTH "
                  "(and MEL_ADMINS) to log annotators in, or pass --allow-anonymous to let every visitor in as 'local'")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name or 0.0.0.0 / :: (every interface)
        return False


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    auth = parse_auth(os.environ.get("MEL_AUTH"))
    admins = frozenset(a.strip() for a in os.environ.get("MEL_ADMINS", "").split(",") if a.strip())
    on_space = bool(os.environ.get("SPACE_ID"))
    oauth = on_space and not auth and bool(os.environ.get("OAUTH_CLIENT_ID"))

    if args.threads:
        os.environ["MEL_THREADS"] = str(args.threads)  # read by every backend (configure_cpu_threads)
        import torch
        torch.set_num_threads(args.threads)

    from demo.service import LinkService, ServiceConfig
    from demo.ui import Access, build_demo, launch_options, serve_options
    from mel.errors import MELError

    if auth:
        access = Access("password", admins=admins)
    elif oauth:
        access = Access("oauth", admins=admins)
    else:
        open_annotator, said = open_access(args.host, args.share, on_space, args.allow_anonymous)
        access = Access("open", admins=admins, open_annotator=open_annotator)
        print(f"[app] no MEL_AUTH: {said}", file=sys.stderr)

    from mel.cli_kit import check_device
    try:
        device = check_device(args.device)
    except MELError as exc:
        raise SystemExit(f"[app] cannot start: {exc}") from None
    generator_options, ranker_options = linker_options(args.opt)
    config = ServiceConfig(kb=args.kb, pool=args.pool, preset=args.preset, device=device, data_dir=args.data_dir,
                           generator=args.generator, ranker=args.ranker, generator_options=generator_options,
                           ranker_options=ranker_options, live_pool=not args.no_live_pool, nil=args.nil)
    service = LinkService(config)
    try:
        service.load(progress=lambda f, d: print(f"[app] {f:4.0%} {d}", file=sys.stderr))
    except MELError as exc:  # a missing, locked or foreign KB, an unwritable data dir...: say so, no traceback
        raise SystemExit(f"[app] cannot start: {exc}") from None
    demo = build_demo(service=service, access=access)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    print(f"[app] ready after {time.perf_counter() - STARTED:.1f} s; data in {service.data_dir}", file=sys.stderr)
    # SIGTERM (a Space restarting, `kill`) shuts down as Ctrl+C does: the server closes and the admins'
    # waiting downloads are deleted (SIGKILL leaves them in the system's temporary folder, private to this user).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                    auth_message="Log in with the annotator account you were given." if auth else None,
                    show_error=True, **serve_options(demo, auth or None), **launch_options())
    finally:
        demo.mel_preannotations.stop_all()   # a stopped run resumes where it was: the next start links the rest
        demo.mel_queue.close()
        demo.mel_vault.close()
        service.store.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
