"""Firebreak: activities."""
