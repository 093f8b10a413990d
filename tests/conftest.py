import os

# Two cores on CI: keep torch from oversubscribing when pytest runs helpers in parallel.
os.environ.setdefault("OMP_NUM_THREADS", "2")
