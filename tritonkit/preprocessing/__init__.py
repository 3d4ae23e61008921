"""Preprocessing shared by the served models and by tests."""
