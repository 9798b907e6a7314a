"""Prefect flows that chain the tasks in ``tasks/`` and pass paths between them.

pipeline      the ``boss-pipeline`` flow (prepare .. report in ``runs/<flow run name>/``)
serve         ``python -m flows.serve``: the deployment ``boss-pipeline/<name>``
local_server  ``python -m flows.local_server --serve``: a local Prefect server plus the above
"""
