"""The Gradio demo and annotation app: `demo.ui.build_demo()` builds it, `demo.service.LinkService`
does the work, `demo.bundled` holds the demo KB, pool and examples, `demo.spans` turns browser
selections into mention spans. `python app.py` starts it."""
from .service import LinkService, ServiceConfig

__all__ = ["LinkService", "ServiceConfig", "build_demo"]


def build_demo(*args, **kwargs):
    """demo.ui.build_demo, imported lazily (gradio is a heavy import)."""
    from .ui import build_demo as build
    return build(*args, **kwargs)
