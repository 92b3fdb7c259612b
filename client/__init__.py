"""Titanic client daemon for edge devices."""
