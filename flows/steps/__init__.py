"""Plain, typed pipeline steps by stage, no Prefect here: `embedding`, `training`,
`finetuning` and `inference`. Each module imports only what its stage needs, so `search` and
`info` start without MLflow, scikit-learn or skops."""
