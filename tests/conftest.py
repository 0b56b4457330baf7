import os

import pytest
from hypothesis import settings

# Fast and reproducible by default: the same examples on every run, so a CI result does not depend on
# the draw. BNFOLD_HYPOTHESIS_PROFILE=explore draws fresh examples (run it to hunt for new failures,
# then pin what it finds as a plain test); =long explores 500 examples per test.
settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=100, deadline=None)
settings.register_profile("long", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("BNFOLD_HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def python_default_interrupt_handler():
    """Ctrl-C raises KeyboardInterrupt in every test, whatever the suite was started under.

    A shell that runs a job in the background (``cmd &``, nohup) starts it with SIGINT ignored, and
    Python then keeps it ignored; the tests that send themselves SIGINT check bnfold's handling of
    the signal and need Python's usual handler in place. Restored afterwards.
    """
    import signal

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
