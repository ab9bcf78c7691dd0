"""Firebreak: workflows."""
