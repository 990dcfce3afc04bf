"""Tests of commflow.train (the trainer)."""
