"""Launch the real app (offline preset, bundled demo KB) on 127.0.0.1 and a free port, for tests."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

USERS = {"alice": "alice-pw-1", "bob": "bob-pw-2"}  # test-only accounts; the app reads real ones from MEL_AUTH
ADMINS = frozenset({"alice"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    demo: object
    service: object
    url: str
    data_dir: Path

    def close(self) -> None:
        self.demo.close()
        self.service.store.close()


def launch_app(data_dir: Path, *, auth: bool = True) -> RunningApp:
    from demo.service import LinkService, ServiceConfig
    from demo.ui import Access, build_demo, launch_options

    service = LinkService(ServiceConfig(preset="offline", data_dir=str(data_dir)))
    access = Access("password", admins=ADMINS) if auth else Access("open")
    demo = build_demo(service=service, access=access)
    demo.queue(default_concurrency_limit=4, max_size=32)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                auth=list(USERS.items()) if auth else None, **launch_options())
    return RunningApp(demo, service, f"http://127.0.0.1:{port}/", data_dir)
