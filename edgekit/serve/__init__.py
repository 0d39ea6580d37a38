"""``edgekit serve``: an OpenAI-compatible HTTP server and a chat page for one package.

``create_app(model_or_package, **options)`` returns the ASGI app, to run with uvicorn or to mount in a
FastAPI or Starlette app. The web stack (Starlette, uvicorn) comes with the ``serve`` extra
(``pip install ".[serve]"`` in a clone) and is imported only here, on first use of ``create_app``.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from edgekit.errors import MissingDependencyError

if TYPE_CHECKING:
    from edgekit.serve.app import create_app
    from edgekit.serve.options import ServeOptions

__all__ = ["ServeOptions", "create_app", "require_web_stack"]


def require_web_stack(*modules: str) -> None:
    """Raise ``MissingDependencyError`` naming the extra when Starlette (and ``modules``) are not installed."""
    missing = [name for name in ("starlette", *modules) if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"the server needs {' and '.join(missing)}, which this install lacks",
            fix='pip install ".[serve]" in a clone of edgekit (-e ".[serve]" where it is installed editable)',
        )


def __getattr__(name: str) -> Any:
    if name in ("create_app", "ServeOptions"):
        require_web_stack()
        from edgekit.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'edgekit.serve' has no attribute {name!r}")
