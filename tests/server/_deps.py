"""Each server test module starts with ``require()``: without the serve extra the module skips."""
import pytest


def require() -> None:
    for mod in ("fastapi", "uvicorn", "pydantic", "httpx"):
        pytest.importorskip(mod, exc_type=ImportError, reason=f"server tests need {mod} (pip install -e '.[serve]' or '.[test]')")
