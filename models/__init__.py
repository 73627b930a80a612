"""The network and everything that turns weights into a fast predictor.

Knows nothing of S3, Ray or Prefect: pipeline/ and flows/ build on it, never the other way.
"""
