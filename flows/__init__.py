"""Prefect flows that chain the tasks in ``tasks/`` and pass paths between them."""
