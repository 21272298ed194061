"""flows: Prefect flows, the plain steps they run, MLflow tracking and the CLI."""

import os
from pathlib import Path

DEFAULT_WORKSPACE = Path(os.environ.get("HEADSTART_HOME", "data"))
