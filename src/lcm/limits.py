"""The bounds of every size a user can ask for, in one place: far beyond any real use, and well inside what memory,
counters and the operating system can hold, so that a mistyped number is refused in one line instead of allocating
hundreds of gigabytes or spawning a hundred thousand processes."""

MAX_IMAGE_SIDE = 8192  # pixels a side, of images made or trained on
MAX_BATCH = 1 << 16  # samples per batch
MAX_IMAGES = 1_000_000  # images one command makes or evaluates
MAX_SEED = 2**32 - 1  # seeds (an image's seed, seed + i, included)
MAX_STEPS = 10**8  # optimiser steps of one run
MAX_WORKERS = 256  # data-loading worker processes
