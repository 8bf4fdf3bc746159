"""The cluster suite: a real control plane (see conftest.py). A package, so its fixtures of package
scope stop the control plane after the last test here, not at the end of the whole session."""
