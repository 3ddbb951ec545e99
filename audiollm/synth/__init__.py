"""Offline spoken corpora for tests and the CPU demo: libespeak-ng speech (``espeak``) and the manifests built
from it (``corpus``; ``audiollm data synth``)."""
