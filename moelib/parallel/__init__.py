"""Distribution: MPI launch, the process mesh, expert parallelism, pipelines, gradient reduction."""

from moelib.parallel.launch import DistEnv, LaunchError, init, rank_zero_print, shutdown

__all__ = ["DistEnv", "LaunchError", "init", "shutdown", "rank_zero_print"]
