"""Worklist: the priority policy, worklist items built from positive predictions, scheduler jobs."""
