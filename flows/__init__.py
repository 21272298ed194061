"""flows: the runs behind each command (runs.py) over their steps (steps/), the same runs as
Prefect flows (pipeline.py) and deployments, the CLI (cli/), and two wings: MLflow tracking
(tracking/) and the search service (web/)."""

import extractors  # noqa: F401 (first: it decides whether bytecode is kept)
