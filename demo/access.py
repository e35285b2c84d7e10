"""Who is acting, and what they may do: the app's access rules, and the one decorator that turns
library refusals into messages for the user.

Access: with `auth` (password login) the Gradio username; on a Hugging Face Space with OAuth the
HF username; with neither, locally, everyone is `open_annotator` ("local"), who is also the admin.
Without any login on a Space, annotation is refused (open_annotator=None).

`guarded(fn)` wraps every event handler: refusals (MELError, PermissionError) become escaped
gr.Errors; anything else is logged and reported without its text.
"""
from __future__ import annotations

import functools
import html
import logging
from dataclasses import dataclass, field

import gradio as gr

from mel.errors import MELError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Access:
    mode: str = "open"                      # "open" | "password" | "oauth"
    admins: frozenset[str] = field(default_factory=frozenset)
    open_annotator: str | None = "local"    # who annotates in open mode; None = nobody may annotate

    def annotator(self, request: gr.Request | None, profile: gr.OAuthProfile | None = None) -> str | None:
        if self.mode == "password":
            return getattr(request, "username", None) or None
        if self.mode == "oauth":
            return profile.username if profile is not None else None
        return self.open_annotator

    def is_admin(self, annotator: str | None) -> bool:
        if not annotator:
            return False
        if self.mode == "open":
            return annotator == self.open_annotator  # the person at the machine owns the data
        return annotator in self.admins

    def annotator_of_scope(self, scope) -> str | None:
        """Who sent a plain HTTP request (outside Gradio's events): the same rules as `annotator`."""
        if self.mode == "password":
            from starlette.requests import Request
            app = scope.get("app")
            cookie_id, tokens = getattr(app, "cookie_id", None), getattr(app, "tokens", None)
            if cookie_id is None or not isinstance(tokens, dict):
                return None
            cookies = Request(scope).cookies
            token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
            return tokens.get(token) if token else None
        if self.mode == "oauth":
            session = scope.get("session") or {}
            info = (session.get("oauth_info") or {}).get("userinfo") or {}
            return info.get("preferred_username") or None
        return self.open_annotator


def esc_message(text) -> str:
    """An error or notice for Gradio's modal, which renders HTML: the text shows as typed."""
    return html.escape("" if text is None else str(text), quote=False)


def user_error(exc: BaseException) -> gr.Error:
    """A gr.Error for a refused input or action, its message escaped (it may quote the user's text)."""
    return gr.Error(esc_message(exc), print_exception=False)


def guarded(fn):
    """Wrap an event handler: refusals (MELError, PermissionError) become escaped gr.Errors; anything
    else is logged and reported without its text (which may hold user input or paths)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (MELError, PermissionError) as exc:
            raise user_error(exc) from None
        except Exception as exc:
            log.exception("%s failed", getattr(fn, "__name__", "a handler"))
            raise gr.Error(f"the server failed ({type(exc).__name__}); it is logged there. Try again, and tell "
                           f"the admin if it happens again") from None
    return wrapper


__all__ = ["Access", "esc_message", "user_error", "guarded"]
