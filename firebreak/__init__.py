"""Firebreak: firebreak."""
