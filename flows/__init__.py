"""Prefect only: tasks and flows that call pipeline/."""
