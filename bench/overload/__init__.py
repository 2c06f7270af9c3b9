"""Overload: deadline-aware admission and the memory limit under load, and the malloc settings that
keep RSS within it."""
