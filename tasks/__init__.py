"""Prefect tasks: one per pipeline step (read inputs, call boss_core, write outputs, log).

Run from the repository root as ``python -m tasks.<step>``; not installed as a package.
"""
