"""Firebreak: demo."""
