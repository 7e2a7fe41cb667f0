"""The example server: FastAPI + uvicorn around one ``Engine`` (``pip install 'detcompile[serve]'``).

    detcompile serve --model demo --port 30000

``app.create_app(Server(engine))`` builds the app (its routes); ``state`` holds what they share
(the ``Server``, requests in flight, errors, SSE); ``native_api`` is ``/generate``, ``openai_api``
the ``/v1`` endpoints; ``engine_loop`` the thread that owns the engine; ``protocol`` the request
bodies; ``fingerprint`` the reproducibility fingerprint; ``checker`` the ``detcompile check-server``
client. See docs/server.md.
"""


def __getattr__(name):
    # Lazy: importing detcompile.server (e.g. for the CLI) must not need fastapi.
    if name in ("Server", "create_app"):
        from . import app, state

        return getattr(app if name == "create_app" else state, name)
    raise AttributeError(name)


__all__ = ["Server", "create_app"]
