"""The deployment files against their documentation, docs/DEPLOYMENT.md."""

from __future__ import annotations

from deploy_support import (
    DEPLOYMENT_DOC,
    _compose_vars,
    compose,  # noqa: F401  (fixture)
)


def test_compose_variables_are_documented(compose):
    """Host-side variables (GPU ids, folders, image names) must be in docs/DEPLOYMENT.md, and so must every
    container setting compose passes through."""
    doc = DEPLOYMENT_DOC.read_text()
    names = _compose_vars(compose)
    for svc in compose["services"].values():
        names |= set((svc.get("environment") or {}).keys())
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/DEPLOYMENT.md does not document: {missing}"
