from hypothesis import settings

# Compiled (numba) code pays its compile time on first call; time limits per example only add noise.
settings.register_profile("flashback", deadline=None)
settings.load_profile("flashback")
