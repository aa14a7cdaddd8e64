"""Helpers that more than one backend uses (and only backends): one copy each."""
