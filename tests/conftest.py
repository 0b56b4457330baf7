import os

from hypothesis import settings

# Fast by default; BNFOLD_HYPOTHESIS_PROFILE=long explores more examples on demand.
settings.register_profile("default", max_examples=25, deadline=None)
settings.register_profile("long", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("BNFOLD_HYPOTHESIS_PROFILE", "default"))
