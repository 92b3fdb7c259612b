"""Titanic server: control plane, planner and round logic."""
