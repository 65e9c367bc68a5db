"""Distributed setup, logging, schedules and checkpoint I/O."""
