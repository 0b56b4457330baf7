import os

import pytest
from hypothesis import settings

# Fast by default; BNFOLD_HYPOTHESIS_PROFILE=long explores more examples on demand.
settings.register_profile("default", max_examples=25, deadline=None)
settings.register_profile("long", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("BNFOLD_HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def fresh_memory_store(monkeypatch):
    """Each test starts with an empty store of new weights: its memory budget is per process, and a
    test that sets the budget to one weight must not find it used up by the tests before it."""
    from bnfold.onnx.io import store

    monkeypatch.setattr(store, "memory", store.MemoryStore())
