"""Data plane: shards in, predictions out. Builds on models/; knows nothing of Prefect."""
