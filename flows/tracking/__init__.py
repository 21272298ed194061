"""flows.tracking: MLflow: the tracking store, runs and their logging, logged models, the
champion rule."""
