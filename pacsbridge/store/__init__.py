"""Persistence: SQLAlchemy models, engine/session set-up and spool files.

Knows nothing of the network or the model.  The database is the hand-off between stages: each
stage reads rows in the state it consumes and writes the next state in one transaction.
"""
