"""boss_core: Bellman Optimal Step-size Straightening (BOSS) for flow-matching models.

The pure library: velocity interface, samplers, cost matrix, Bellman DP, schedules, models,
data and training. It never imports prefect, mlflow or dvc, and never hard-codes a path.

Conventions (fixed for the whole project): t in [0, 1], t = 0 is noise, t = 1 is data;
a velocity model is any callable ``v(x, t, **extras)`` with x of shape (B, ...) and t of
shape (B,); schedules are strictly increasing float64 grids 0 = t_0 < ... < t_K = 1.
"""

__version__ = "0.1.0"
